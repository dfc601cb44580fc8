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
        ("timm:resnet1800", "unknown timm backbone 'resnet1800'; did you mean resnet18"),
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
