import pytest
import torch
from torch import nn

from sn_lightning.errors import ConfigError
from sn_lightning.models import InputNormalize, create_backbone, list_backbones, parse_backbone
from sn_lightning.models.backbones import _adapt_first_conv

BUILTIN_SHAPES = {
    "digits_cnn": (1, 8, 8),
    "mini_alexnet": (3, 28, 28),
    "elu_net": (1, 28, 28),
    "mlp1": (1, 28, 28),
    "mlp2": (1, 28, 28),
    "c4f3": (1, 28, 28),
    "c6f2": (3, 32, 32),
    "c8f2": (3, 64, 64),
}


def test_every_builtin_is_covered():
    assert sorted(BUILTIN_SHAPES) == sorted(s.split(":")[1] for s in list_backbones("sn_lightning"))


@pytest.mark.parametrize("name", sorted(BUILTIN_SHAPES))
def test_builtin_shapes_and_normalization_first(name):
    c, h, w = BUILTIN_SHAPES[name]
    model = create_backbone(f"sn_lightning:{name}", num_classes=7, in_chans=c, input_size=(h, w))
    assert isinstance(model[0], InputNormalize)
    assert model(torch.rand(2, c, h, w)).shape == (2, 7)


def test_reference_architectures():
    elu = create_backbone("elu_net", num_classes=10, in_chans=1, input_size=(28, 28)).net
    convs = [m for m in elu if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in convs] == [
        (64, 8, 2),
        (128, 6, 2),
        (128, 5, 1),
    ]
    assert any(isinstance(m, nn.ELU) for m in elu)
    mlp = create_backbone("mlp2", num_classes=10, in_chans=1, input_size=(28, 28)).net
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [512, 512, 10]
    alex = create_backbone("mini_alexnet", num_classes=10, in_chans=3, input_size=(28, 28)).net
    assert [m.out_features for m in alex if isinstance(m, nn.Linear)] == [384, 192, 10]
    with pytest.raises(ConfigError, match=r"^mini_alexnet act 'tanh' is not one of relu, elu$"):
        create_backbone("mini_alexnet", num_classes=10, act="tanh")
    c4 = create_backbone("c4f3", num_classes=10, in_chans=1, input_size=(28, 28)).net
    assert [m.in_features for m in c4 if isinstance(m, nn.Linear)] == [3136, 512, 512]


def test_normalization_values():
    model = create_backbone(
        "mlp1", num_classes=3, in_chans=1, input_size=(2, 2), mean=[0.5], std=[0.25]
    )
    x = torch.rand(1, 1, 2, 2)
    assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)
    assert model.normalize.lipschitz() == pytest.approx(4.0)


def test_timm_backbone_classes_and_channels():
    model = create_backbone("timm:resnet18", num_classes=5, in_chans=1, input_size=(32, 32))
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 5
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 5)
    assert parse_backbone("resnet18") == ("timm", "resnet18")  # bare name: timm, as timm does
    assert parse_backbone("digits_cnn") == ("sn_lightning", "digits_cnn")


def test_timm_kwargs_reach_the_model():
    model = create_backbone(
        "timm:vit_tiny_patch16_224", num_classes=4, in_chans=3, img_size=32, patch_size=8, depth=1
    )
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_torchvision_backbone_gray_input_adapts_first_conv():
    model = create_backbone("torchvision:resnet18", num_classes=10, in_chans=1, input_size=(28, 28))
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 10
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_adapted_conv_on_gray_equals_rgb_conv_on_replicated_gray():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    rgb_conv = nn.Conv2d(3, 4, 3, padding=1)
    rgb_conv.load_state_dict(net[0].state_dict())
    _adapt_first_conv(net, 1)
    gray = torch.rand(2, 1, 6, 6)
    assert torch.allclose(net[0](gray), rgb_conv(gray.expand(-1, 3, -1, -1)), atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("timm:resnet1800", r"unknown backbone 'resnet1800' \(not a built-in or timm model\); did"),
        ("digitscnn", "did you mean digits_cnn"),  # a bare name: built-ins are suggested too
        (
            "torchvision:resnt18",
            "unknown torchvision classification backbone 'resnt18'; did you mean resnet18",
        ),
        (
            "foo:bar",
            "unknown backbone source 'foo' .* valid sources: timm, torchvision, sn_lightning",
        ),
        ("sn_lightning:digit_cnn", "did you mean digits_cnn"),
        ("", "non-empty string"),
    ],
)
def test_unknown_backbones(spec, match):
    with pytest.raises(ConfigError, match=match):
        create_backbone(spec, num_classes=10)


def test_bad_kwargs_and_classes():
    with pytest.raises(ConfigError, match="rejected its arguments"):
        create_backbone("digits_cnn", num_classes=10, in_chans=1, input_size=(8, 8), depth=3)
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        create_backbone("digits_cnn", num_classes=0)


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_weights_that_cannot_be_fetched_are_one_config_error(monkeypatch, name):
    """No network (the weights' download raises OSError): one line naming the way out."""
    import timm
    import torchvision

    def offline(*args, **kwargs):
        if kwargs.get("pretrained") or kwargs.get("weights"):
            raise OSError("[Errno -2] Name or service not known")
        return real(*args, **kwargs)

    module, attr = (
        (timm, "create_model") if name.startswith("timm") else (torchvision.models, "get_model")
    )
    real = getattr(module, attr)
    monkeypatch.setattr(module, attr, offline)
    with pytest.raises(ConfigError) as info:
        create_backbone(name, num_classes=10, pretrained=True)
    assert str(info.value) == (
        f"pretrained weights of {name!r} could not be loaded ([Errno -2] Name or service not "
        "known); they need network access or a filled cache, or pass --model.pretrained=false"
    )
    assert isinstance(info.value.__cause__, OSError)
    assert create_backbone(name, num_classes=10)[1] is not None  # without weights: no download


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("resnet18", ["fc"]),
        ("squeezenet1_1", ["classifier.1"]),  # a 1x1 Conv2d head
        ("googlenet", ["fc"]),  # the auxiliary heads are dropped after loading (aux_logits off)
    ],
)
def test_pretrained_torchvision_weights_get_a_new_head_for_the_classes(monkeypatch, name, heads):
    """torchvision refuses ``num_classes`` != 1000 with weights; the backbone keeps the weights
    and gets new heads (here the "download" hands out a seeded model's state_dict)."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(0)
    kwargs = {"aux_logits": True, "init_weights": True} if name == "googlenet" else {}
    source = torchvision.models.get_model(name, weights=None, num_classes=1000, **kwargs)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: source.state_dict())
    net = create_backbone(f"torchvision:{name}", num_classes=7, pretrained=True).net
    x = torch.rand(2, 3, 64, 64)
    assert net.eval()(x).shape == (2, 7)
    mine, theirs = net.state_dict(), source.state_dict()
    changed = sorted({k.rsplit(".", 1)[0] for k in mine if not torch.equal(mine[k], theirs[k])})
    assert changed == heads  # every other weight is the pretrained one
    for head in heads:
        layer = net.get_submodule(head)
        assert (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == 7


@pytest.mark.parametrize(("name", "size"), [("googlenet", 32), ("inception_v3", 80)])
def test_torchvision_aux_head_models_train_on_a_tensor_of_logits(name, size):
    """Their training forward returned GoogLeNetOutputs / InceptionOutputs (aux_logits on by
    default without weights): the classifier's loss got a named tuple after the eval check passed."""
    torch.manual_seed(0)
    net = create_backbone(f"torchvision:{name}", num_classes=5, in_chans=1).net
    assert not net.aux_logits and not net.transform_input
    out = net.train()(torch.rand(2, 1, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    for key, value in (("aux_logits", True), ("transform_input", True)):
        with pytest.raises(ConfigError, match=rf"torchvision {name} with {key}=true .*; leave "):
            create_backbone(f"torchvision:{name}", num_classes=5, in_chans=1, **{key: value})
    # 3 channels: transform_input is the user's to choose
    net = create_backbone(f"torchvision:{name}", num_classes=5, transform_input=True).net
    assert net.transform_input


def test_pretrained_googlenet_takes_one_channel(monkeypatch):
    """Its weights switch on transform_input, which read channels 0-2 of a 1-channel input."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(0)
    source = torchvision.models.get_model(
        "googlenet", weights=None, num_classes=1000, aux_logits=True, init_weights=True
    )
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: source.state_dict())
    net = create_backbone("torchvision:googlenet", num_classes=4, in_chans=1, pretrained=True).net
    assert not net.transform_input and net.conv1.conv.in_channels == 1
    assert net.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    # the normalize layer normalizes; with 3 channels the weights' ImageNet remap stays off too
    net3 = create_backbone("torchvision:googlenet", num_classes=4, pretrained=True).net
    assert not net3.transform_input


@pytest.mark.slow
def test_every_torchvision_classifier_has_exactly_its_heads_replaced():
    """The rule behind replace_heads (the layers with 1000 outputs) on every torchvision model."""
    import warnings

    import torchvision

    from sn_lightning.models.backbones import replace_heads

    expected_aux = {
        "googlenet": ["aux1.fc2", "aux2.fc2", "fc"],
        "inception_v3": ["AuxLogits.fc", "fc"],
    }
    for name in torchvision.models.list_models(module=torchvision.models):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GoogLeNet / Inception init notes
            net = torchvision.models.get_model(name, weights=None, num_classes=1000)
        heads = replace_heads(net, 1000, 5)
        assert len(heads) == (len(expected_aux[name]) if name in expected_aux else 1), name
        if name in expected_aux:
            assert heads == expected_aux[name]
        outputs = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        assert getattr(outputs, "out_features", getattr(outputs, "out_channels", None)) == 5, name


def test_timm_weights_come_from_the_cache_only_while_the_hub_is_unreachable(monkeypatch):
    """An uncached download is otherwise retried for about a minute before it fails."""
    import timm
    from huggingface_hub import constants

    import sn_lightning.models.backbones as backbones

    seen = []

    def create_model(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbones, "unreachable_reason", lambda url: f"cannot reach {url}")
    with pytest.raises(ConfigError, match="pretrained weights of 'timm:resnet18' could not be"):
        create_backbone("timm:resnet18", num_classes=10, pretrained=True)
    monkeypatch.setattr(backbones, "unreachable_reason", lambda url: None)
    with pytest.raises(ConfigError):
        create_backbone("timm:resnet18", num_classes=10, pretrained=True)
    assert seen == [True, False] and constants.HF_HUB_OFFLINE is False  # restored


def test_unreachable_reason_is_one_tcp_connection(monkeypatch):
    import socket

    from sn_lightning._net import unreachable_reason

    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert unreachable_reason(f"http://127.0.0.1:{port}") is None
    reason = unreachable_reason(f"http://127.0.0.1:{port}", timeout=1.0)  # closed now
    assert reason is not None and reason.startswith(f"cannot reach http://127.0.0.1:{port} (")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert unreachable_reason(f"http://127.0.0.1:{port}") is None  # the proxy connects, not us
