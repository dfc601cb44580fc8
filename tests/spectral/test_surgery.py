"""apply_spectral_norm on real timm / torchvision backbones; export and round trips."""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import Conv2dSame
from timm.layers import Linear as TimmLinear
from torch import nn

from sn_lightning.errors import ConfigError
from sn_lightning.models.normalize import InputNormalize
from sn_lightning.spectral import (
    BoundedBatchNormScale,
    BoundedSpectralNorm,
    apply_spectral_norm,
    freeze_spectral_norm,
    network_lipschitz_bound,
    normalized_layers,
    operator_norm,
    plain_state_dict,
    remove_spectral_norm,
    spectral_norms,
)

SHAPE = (3, 32, 32)


def wrap(net: nn.Module) -> nn.Sequential:
    """The lead's backbone layout: Sequential(normalize=InputNormalize, net=backbone)."""
    return nn.Sequential(
        OrderedDict(normalize=InputNormalize([0.5, 0.4, 0.3], [0.25, 0.2, 0.3]), net=net)
    )


class TinyConvNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


BACKBONES = {
    "tiny": lambda: TinyConvNet(),
    "timm:resnet18": lambda: timm.create_model("resnet18", num_classes=10, pretrained=False),
    "torchvision:resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision:mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "timm:convnext_atto": lambda: timm.create_model(
        "convnext_atto", num_classes=10, pretrained=False
    ),
    "timm:vit_tiny": lambda: timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, pretrained=False, img_size=32
    ),
    "timm:regnetx_002": lambda: timm.create_model("regnetx_002", num_classes=10, pretrained=False),
    # TensorFlow port: timm's Conv2dSame (dynamic 'SAME' padding) and timm's Linear head
    "timm:tf_mobilenetv3_small_minimal_100": lambda: timm.create_model(
        "tf_mobilenetv3_small_minimal_100", num_classes=10, pretrained=False
    ),
}
SLOW_BACKBONES = {
    "torchvision:densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "torchvision:vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "torchvision:wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(num_classes=10),
    "timm:efficientnet_b0": lambda: timm.create_model(
        "efficientnet_b0", num_classes=10, pretrained=False
    ),
    # split/cat blocks and timm's BatchNormAct2d in the network bound
    "timm:res2net50_26w_4s": lambda: timm.create_model(
        "res2net50_26w_4s", num_classes=10, pretrained=False
    ),
    "timm:cspresnet50": lambda: timm.create_model("cspresnet50", num_classes=10, pretrained=False),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return wrap({**BACKBONES, **SLOW_BACKBONES}[name]())


def _u(model):
    return {n: p.u.clone() for n, (_, p) in normalized_layers(model).items() if hasattr(p, "u")}


def _check_backbone(name: str, forwards: int = 25) -> nn.Module:
    beta = 0.8
    model = build(name)
    # Random init has tiny spectral gaps (slow power iteration): a longer warm-up than the default.
    apply_spectral_norm(
        model, beta=beta, input_shape=SHAPE, n_power_iterations=5, init_iterations=100
    )
    layers = normalized_layers(model)
    plain = (nn.Conv2d.forward, nn.Linear.forward, Conv2dSame.forward, TimmLinear.forward)
    n_layers = sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) and type(m).forward in plain
        for m in build(name).modules()
    )
    assert len(layers) == n_layers  # every plain Conv/Linear and timm's known subclasses
    x = torch.rand(2, *SHAPE)

    # eval forwards change no buffer
    model.eval()
    u0 = _u(model)
    with torch.no_grad():
        y_eval = model(x)
    assert all(torch.equal(u0[k], v) for k, v in _u(model).items())
    # frozen training forwards change no buffer either
    model.train()
    with freeze_spectral_norm(model), torch.no_grad():
        model(x)
    assert all(torch.equal(u0[k], v) for k, v in _u(model).items())

    # training forwards: every layer's true norm ends up <= beta (1 + 1e-2)
    with torch.no_grad():
        for _ in range(forwards):
            model(x)
    for lname, (layer, p) in layers.items():
        shape = p.spec.input_shape if isinstance(layer, nn.Linear) else p.input_shape
        truth = operator_norm(layer, shape, n_iter=300)
        assert truth <= beta * (1 + 1e-2), (lname, truth)

    # export: plain weights load strictly into the unmodified backbone and reproduce outputs
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    fresh = build(name, seed=1).eval()
    fresh.load_state_dict(plain_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_eval, rtol=1e-5, atol=1e-5)
    assert normalized_layers(model)  # plain_state_dict left the model normalized

    # state dict round trip into a freshly built and normalized model
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = apply_spectral_norm(
        build(name, seed=2), beta=beta, input_shape=SHAPE, n_power_iterations=5, init_iterations=0
    ).eval()
    other.load_state_dict(torch.load(buffer), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(x), y_eval, rtol=0, atol=0)
    return model


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_layers_are_bounded_and_export(name):
    _check_backbone(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_BACKBONES))
def test_slow_backbones(name):
    model = _check_backbone(name, forwards=80)
    # the sound network bound (eval mode) is above the Jacobian norm at random inputs
    bound, reason = network_lipschitz_bound(model)
    if name == "timm:efficientnet_b0":  # squeeze-excitation: x * sigmoid(fc(pool(x)))
        assert bound is None and reason.endswith("product of a tensor and a tensor")
        return
    assert bound is not None, reason
    model.eval()
    for _ in range(2):
        x = torch.rand(*SHAPE)
        J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0))[0], x)
        assert float(torch.linalg.matrix_norm(J.reshape(len(J), -1), ord=2)) <= bound


@pytest.mark.parametrize(
    "name", ["torchvision:resnet18", "timm:vit_tiny", "timm:tf_mobilenetv3_small_minimal_100"]
)
def test_plain_checkpoints_load_after_apply(name):
    """A plain backbone's state dict loads strictly into a normalized one (parametrization Note
    [plain load]) and gives the model that normalizing after loading gives."""
    plain = build(name, seed=1)
    model = apply_spectral_norm(build(name), beta=0.8, input_shape=SHAPE, batchnorm="bound")
    model.load_state_dict(plain.state_dict(), strict=True)
    ref = apply_spectral_norm(
        copy.deepcopy(plain), beta=0.8, input_shape=SHAPE, batchnorm="bound", init_iterations=50
    )
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        expected = ref.eval()(x)
        got = model.eval()(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    assert got.abs().max() > 0


def test_plain_state_dict_keeps_the_module_versions():
    """torchvision's MNASNet refuses a state dict without its version (``_metadata``)."""
    net = torchvision.models.mnasnet0_5(num_classes=10)
    fresh = copy.deepcopy(net)
    apply_spectral_norm(net, beta=1.0, input_shape=SHAPE)
    plain = plain_state_dict(net)
    assert plain._metadata["layers.0"] == fresh.state_dict()._metadata["layers.0"]
    assert not [k for k in plain._metadata if "parametrizations" in k]
    assert set(plain._metadata) == set(fresh.state_dict()._metadata)
    fresh.load_state_dict(plain, strict=True)
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_timm_same_padding_layers_are_normalized_at_their_padding():
    """Conv2dSame: u has the real input size; the operator includes the dynamic 'SAME' padding."""
    from sn_lightning.spectral.ops import tf_same_padding

    model = build("timm:tf_mobilenetv3_small_minimal_100")
    same = {n for n, m in model.named_modules() if type(m) is Conv2dSame}
    assert len(same) == 5
    apply_spectral_norm(model, beta=1.0, input_shape=SHAPE)
    layers = normalized_layers(model)
    assert same <= set(layers) and type(layers["net.classifier"][0]).__bases__[0] is TimmLinear
    _, p = layers["net.conv_stem"]  # 3x3 stride 2 on 32x32: TF pads (0, 1) per dim
    assert p.input_shape == SHAPE and p.spec.padding == ((0, 1), (0, 1))
    assert tf_same_padding((32, 32), (3, 3), (2, 2), (1, 1)) == ((0, 1), (0, 1))


def test_recorded_shapes_are_the_real_resolutions():
    model = apply_spectral_norm(build("torchvision:resnet18"), beta=1.0, input_shape=SHAPE)
    layers = normalized_layers(model)
    assert layers["net.conv1"][1].input_shape == (3, 32, 32)
    assert layers["net.layer1.0.conv1"][1].input_shape == (64, 8, 8)
    assert layers["net.layer4.1.conv2"][1].input_shape == (512, 1, 1)
    assert layers["net.layer4.1.conv2"][1].u.shape == (1, 512, 1, 1)
    assert layers["net.fc"][1].u.shape == (1, 512)
    assert model.training  # the dry forward restored the mode


def test_deepcopy_and_remove_spectral_norm():
    torch.manual_seed(0)
    model = apply_spectral_norm(build("tiny"), beta=0.5, input_shape=SHAPE)
    x = torch.rand(3, *SHAPE)
    clone = copy.deepcopy(model)
    model.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    clone.train()
    clone(x)  # updates only the clone
    assert not all(
        torch.equal(a, b) for a, b in zip(_u(clone).values(), _u(model).values(), strict=True)
    )
    expected = model(x)
    params = {id(p) for p in model.parameters()}
    remove_spectral_norm(model)
    assert not normalized_layers(model)
    assert type(model.net.conv1) is nn.Conv2d
    assert {id(p) for p in model.parameters()} == params
    torch.testing.assert_close(model(x), expected)
    fresh = build("tiny", seed=3).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), expected)
    # the copy still works, and keeps its own normalization (the classes were shared)
    assert normalized_layers(clone)
    clone.eval()
    torch.testing.assert_close(clone(x), copy.deepcopy(clone)(x), rtol=0, atol=0)
    remove_spectral_norm(copy.deepcopy(clone))
    clone.train()
    clone(x).sum().backward()  # training forward and backward: the fused path, too


@pytest.mark.parametrize("backbone", ["tiny", "torchvision:resnet18"])
def test_removal_on_a_copy_leaves_the_original_normalized(backbone):
    torch.manual_seed(0)
    model = apply_spectral_norm(build(backbone), beta=0.5, input_shape=SHAPE, batchnorm="bound")
    x = torch.rand(2, *SHAPE)
    expected = model.eval()(x)
    export = remove_spectral_norm(copy.deepcopy(model))
    torch.testing.assert_close(export(x), expected)
    assert len(normalized_layers(model)) > 0
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model = apply_spectral_norm(
        build("torchvision:resnet18"),
        beta={"net.layer1.*": 0.5, "net.layer*": 2.0, "net.fc": math.inf},
        input_shape=SHAPE,
    )
    betas = {n: p.beta for n, (_, p) in normalized_layers(model).items()}
    assert betas["net.layer1.0.conv1"] == 0.5
    assert betas["net.layer2.0.downsample.0"] == 2.0
    assert betas["net.fc"] == math.inf
    assert "net.conv1" not in betas  # matches no pattern: left alone
    assert not hasattr(model.net.conv1, "parametrizations")


def test_batchnorm_bound_on_timm_batchnorm_act():
    """timm's BatchNormAct2d (RegNet, EfficientNet, MobileNetV3, ...) is BatchNorm then an
    activation: batchnorm="bound" bounds its scale like a plain BatchNorm's, and the network
    bound reads the bounded scale."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", num_classes=10, pretrained=False)
    bns = {n: m for n, m in model.named_modules() if type(m) is BatchNormAct2d}
    assert len(bns) == 44
    for bn in bns.values():
        bn.weight.data.uniform_(2.0, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped
        apply_spectral_norm(model, beta=0.9, input_shape=SHAPE, batchnorm="bound")
    model.train()
    with torch.no_grad():
        model(torch.rand(8, *SHAPE) * 0.1)  # new running statistics
    model.eval()
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        y = model(x)
    for name, bn in bns.items():
        assert isinstance(bn.parametrizations.weight[0], BoundedBatchNormScale), name
        scale = float((bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max().detach())
        assert scale <= 0.9 * (1 + 1e-5), name
    # export: the plain weights reproduce the bounded model in the unmodified backbone
    fresh = timm.create_model("regnetx_002", num_classes=10, pretrained=False).eval()
    fresh.load_state_dict(plain_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
    # the network bound is computed with the bounded scales
    bound, reason = network_lipschitz_bound(model)
    assert reason == ""
    bound_fresh, reason = network_lipschitz_bound(fresh, input_shape=SHAPE)
    assert reason == ""
    assert bound == pytest.approx(bound_fresh, rel=1e-4)


def test_include_exclude_and_method():
    model = apply_spectral_norm(
        build("torchvision:resnet18"),
        beta=1.0,
        input_shape=SHAPE,
        include=("net.layer3.*", "net.fc"),
        exclude=("*downsample*",),
        method="matrix",
    )
    names = set(normalized_layers(model))
    assert names == {"net.layer3.0.conv1", "net.layer3.0.conv2", "net.layer3.1.conv1",
                     "net.layer3.1.conv2", "net.fc"}  # fmt: skip
    assert {p.method for _, p in normalized_layers(model).values()} == {"matrix"}
    assert normalized_layers(model)["net.layer3.0.conv1"][1].input_shape == (128, 4, 4)


def test_batchnorm_bound():
    torch.manual_seed(0)
    model = build("tiny")
    model.train()
    with torch.no_grad():  # move the running stats away from 1
        for _ in range(5):
            model(torch.rand(8, *SHAPE) * 0.1)
    model.net.bn1.weight.data.uniform_(2.0, 3.0)
    apply_spectral_norm(model, beta=0.9, input_shape=SHAPE, batchnorm="bound")
    bn = model.net.bn1
    assert isinstance(bn.parametrizations.weight[0], BoundedBatchNormScale)
    model.eval()
    x = torch.rand(2, *SHAPE)
    y = model(x)
    scale = float((bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max().detach())
    assert scale == pytest.approx(0.9, rel=1e-5)
    assert spectral_norms(model, normalized=True)["net.bn1"] == pytest.approx(0.9, rel=1e-5)
    assert spectral_norms(model)["net.bn1"] > 0.9
    # training updates the running stats; the bound follows them
    model.train()
    with torch.no_grad():
        model(torch.rand(8, *SHAPE))
    model.eval()
    model(x)
    scale = float((bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max().detach())
    assert scale <= 0.9 * (1 + 1e-5)
    # export
    fresh = build("tiny", seed=4).eval()
    fresh.load_state_dict(plain_state_dict(model), strict=True)
    torch.testing.assert_close(fresh(x), model(x))
    remove_spectral_norm(model)
    assert not bn._forward_pre_hooks
    assert type(bn) is nn.BatchNorm2d
    del y


def _bn_expected(bn: nn.Module, beta: float) -> torch.Tensor:
    """gamma / max(1, s / beta) from the BatchNorm's current running_var (the oracle)."""
    gamma = bn.parametrizations.weight.original.detach()
    s = (gamma.abs() / torch.sqrt(bn.running_var + bn.eps)).max()
    return gamma / torch.clamp(s / beta, min=1.0)


def test_batchnorm_bound_weight_reads_the_current_running_var():
    """``bn.weight`` read right after training (no forward since) uses the variance the last
    training forward left, also after ``.double()`` and an ``assign=True`` load (before: a copy
    refreshed only before each forward, one batch behind)."""
    torch.manual_seed(0)
    model = apply_spectral_norm(build("tiny"), beta=0.9, input_shape=SHAPE, batchnorm="bound")
    bn = model.net.bn1
    with torch.no_grad():
        bn.parametrizations.weight.original.uniform_(2.0, 3.0)
        model(torch.rand(8, *SHAPE) * 0.1)
        model(torch.rand(8, *SHAPE) * 5.0)  # the last batch moves running_var a lot
    torch.testing.assert_close(bn.weight, _bn_expected(bn, 0.9), rtol=1e-6, atol=0)
    model.double()
    with torch.no_grad():
        model(torch.rand(8, *SHAPE, dtype=torch.float64) * 9.0)
    torch.testing.assert_close(bn.weight, _bn_expected(bn, 0.9), rtol=1e-12, atol=0)
    state = {
        k: v.clone() * (3.0 if k.endswith("running_var") else 1.0)
        for k, v in model.state_dict().items()
    }
    model.load_state_dict(state, assign=True)
    assert torch.equal(bn.running_var, state["net.bn1.running_var"])
    torch.testing.assert_close(bn.weight, _bn_expected(bn, 0.9), rtol=1e-12, atol=0)
    clone = copy.deepcopy(model)  # the copy shares within itself, not with the original
    with torch.no_grad():
        clone(torch.rand(8, *SHAPE, dtype=torch.float64) * 0.01)
    torch.testing.assert_close(
        clone.net.bn1.weight, _bn_expected(clone.net.bn1, 0.9), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(bn.weight, _bn_expected(bn, 0.9), rtol=1e-12, atol=0)
    assert "net.bn1.parametrizations.weight.0.running_var" not in model.state_dict()


def test_spectral_norms_are_cheap_estimates_without_side_effects():
    model = apply_spectral_norm(build("tiny"), beta=0.5, input_shape=SHAPE, init_iterations=100)
    u0 = _u(model)
    sigmas = spectral_norms(model)
    assert set(sigmas) == {"net.conv1", "net.conv2", "net.fc"}
    assert all(isinstance(v, float) for v in sigmas.values())
    for name, (layer, p) in normalized_layers(model).items():
        converged = float(p.sigma(layer.parametrizations.weight.original, 500))
        assert 0.97 * converged <= sigmas[name] <= converged * (1 + 1e-5)
    normalized = spectral_norms(model, normalized=True)
    assert all(normalized[k] == min(sigmas[k], 0.5) for k in sigmas)
    assert all(torch.equal(u0[k], v) for k, v in _u(model).items())


def test_model_to_dtype_keeps_working():
    model = apply_spectral_norm(build("tiny"), beta=0.5, input_shape=SHAPE)
    model.double()
    y = model(torch.rand(2, *SHAPE, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert all(p.u.dtype == torch.float64 for _, p in normalized_layers(model).values())


class AuxHeadNet(nn.Module):
    """A head that only training runs (torchvision's GoogLeNet/Inception ``aux_logits``)."""

    def __init__(self, aux_kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.aux = nn.Conv2d(4, 2, aux_kernel, stride=2)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.drop(torch.relu(self.bn(self.conv(x))))
        out = self.fc(y.mean((2, 3)))
        return (out, self.aux(y).mean()) if self.training else out


@pytest.mark.parametrize("training", [True, False])
def test_layers_only_training_runs_are_normalized_and_the_dry_forward_keeps_the_state(training):
    torch.manual_seed(0)
    model = AuxHeadNet().train(training)
    with torch.no_grad():
        model.aux.weight.mul_(20)  # well above beta
        model.bn.running_mean.uniform_(-1, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping 'aux'"
        apply_spectral_norm(model, beta=0.5, input_shape=(3, 8, 8))
    assert set(normalized_layers(model)) == {"conv", "aux", "fc"}
    assert model.aux.parametrizations.weight[0].u.shape == (1, 4, 8, 8)  # its real input
    modes = {n: m.training for n, m in model.named_modules() if "parametrizations" not in n}
    assert set(modes.values()) == {training}, modes
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(model.state_dict()[key], state[key]), key
    # the dense operator of the head's normalized weight at its input: at beta
    model.eval()
    with torch.no_grad():
        weight = model.aux.weight
        basis = torch.eye(4 * 8 * 8, dtype=torch.float64).reshape(-1, 4, 8, 8)
        dense = F.conv2d(basis, weight.double(), stride=2).flatten(1)
    truth = torch.linalg.matrix_norm(dense, ord=2).item()
    assert truth == pytest.approx(0.5, rel=1e-3)


def test_a_training_forward_that_fails_skips_its_layers_with_a_warning():
    model = AuxHeadNet(aux_kernel=9)  # larger than its 8x8 input: training cannot run
    with pytest.warns(UserWarning, match=r"skipping 'aux': not called in the dry forward"):
        apply_spectral_norm(model, beta=0.5, input_shape=(3, 8, 8))
    assert set(normalized_layers(model)) == {"conv", "fc"}


def test_overridden_forward_is_skipped_with_a_warning():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(ScaledConv(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, *SHAPE))
    with pytest.warns(UserWarning, match="skipping 1 layer\\(s\\) .*: '0' \\(ScaledConv\\)$"):
        apply_spectral_norm(model, beta=1.0, input_shape=SHAPE)
    assert set(normalized_layers(model)) == {"2"}


def test_weight_standardized_convolutions_are_skipped_in_one_warning_that_says_why():
    """BiT (timm's ResNetV2 with StdConv2d): one warning, not one per layer; the head is bounded."""
    model = timm.create_model("resnetv2_50x1_bit", num_classes=10, pretrained=False)
    convs = [n for n, m in model.named_modules() if type(m).__name__ == "StdConv2d"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_spectral_norm(model, beta=1.0, input_shape=SHAPE)
    (message,) = [str(w.message) for w in seen if "skipping" in str(w.message)]
    assert message.startswith(
        f"skipping {len(convs)} layer(s) whose forward differs from their base class's, so their "
        f"operator is unknown: 'stem.conv' (StdConv2d), '{convs[1]}' (StdConv2d), '{convs[2]}' "
        f"(StdConv2d) and {len(convs) - 3} more; weight-standardized convolutions"
    )
    assert set(normalized_layers(model)) == {"head.fc"}  # a 1x1 Conv2d head


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "power"}, r"unknown method 'power'; valid: \('operator', 'matrix'\)"),
        ({"beta": 0}, "beta must be a number > 0"),
        ({"beta": -2.0}, "beta must be a number > 0"),
        ({"beta": {"*": 0.0}}, "beta must be a number > 0"),
        ({"batchnorm": "fold"}, r"unknown batchnorm policy 'fold'; valid: \('leave', 'bound'\)"),
        ({"include": "net.*"}, "include/exclude must be sequences"),
        (
            {"include": ("net.conv1",), "exclude": ("net.*",)},
            "no Linear/Conv/ConvTranspose layer matched",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    kwargs = {"beta": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        apply_spectral_norm(build("tiny"), input_shape=SHAPE, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": ("nothing*",)}, "include pattern 'nothing\\*' matches no"),
        ({"include": ("net.conv1", "net.cnov2")}, "include pattern 'net.cnov2' matches no"),
        ({"exclude": ("net.fcc",)}, "exclude pattern 'net.fcc' matches no"),
        ({"exclude": ("net",)}, "exclude pattern 'net' matches no"),  # names are full paths
        ({"beta": {"net.conv*": 1.0, "head": 2.0}}, "beta pattern 'head' matches no"),
    ],
)
def test_patterns_that_match_no_layer_raise_and_name_the_layers(kwargs, message):
    model = build("tiny")
    before = copy.deepcopy(model.state_dict())
    kwargs = {"beta": 1.0, **kwargs}
    with pytest.raises(ConfigError, match=message) as err:
        apply_spectral_norm(model, input_shape=SHAPE, **kwargs)
    assert "net.conv1, net.conv2, net.fc" in str(err.value)
    assert not normalized_layers(model)  # raised before any surgery
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("input_shape", "message"),
    [
        (None, "input_shape must be a sequence of positive ints"),
        (3.0, "input_shape must be a sequence of positive ints"),
        ((3, 0, 8), "got \\(3, 0, 8\\)"),
        ((3, 8.0, 8), "input_shape must be a sequence of positive ints"),
        ((), "input_shape must be a sequence of positive ints"),
        ((2, 8, 8), "the model cannot take input_shape \\(2, 8, 8\\)"),  # 3 channels expected
        ((3, 8), "the model cannot take input_shape \\(3, 8\\)"),
    ],
)
def test_bad_input_shape_raises_one_line_naming_it(input_shape, message):
    with pytest.raises(ConfigError, match=message) as err:
        apply_spectral_norm(build("tiny"), beta=1.0, input_shape=input_shape)
    assert "\n" not in str(err.value)


def test_twice_raises_and_shared_layers_with_two_shapes_raise():
    model = apply_spectral_norm(build("tiny"), beta=1.0, input_shape=SHAPE)
    with pytest.raises(ValueError, match="already has a bounded spectral norm"):
        apply_spectral_norm(model, beta=1.0, input_shape=SHAPE)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x)[..., ::2, ::2])

    with pytest.raises(ValueError, match="several input shapes"):
        apply_spectral_norm(Twice(), beta=1.0, input_shape=SHAPE)

    class Decoder(nn.Module):  # U-Net style: output_size sets the layer's output_padding
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.up = nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(self.conv(x), output_size=[2 * x.shape[-2], 2 * x.shape[-1]])

    with pytest.raises(
        ConfigError, match=r"layer 'up' \(ConvTranspose2d\) is called with .*output_size"
    ):
        apply_spectral_norm(Decoder(), beta=1.0, input_shape=SHAPE)
    model = apply_spectral_norm(Decoder(), beta=1.0, input_shape=SHAPE, exclude=["up"])
    assert list(normalized_layers(model)) == ["conv"]
    assert isinstance(BoundedSpectralNorm, type)


def test_batchnorms_that_cannot_be_bounded_get_one_warning():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, affine=False),
        nn.BatchNorm2d(4, track_running_stats=False),
        FrozenBatchNorm2d(4),
        nn.BatchNorm2d(4),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_spectral_norm(model, beta=0.5, input_shape=SHAPE, batchnorm="bound")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(
        "not bounding 3 BatchNorm(s): '1' (BatchNorm2d), '2' (BatchNorm2d), '3' (FrozenBatchNorm2d)"
    )
    assert "frozen BatchNorms (FrozenBatchNorm2d) keep their scale in buffers" in messages[0]
    assert set(normalized_layers(model)) == {"0", "4"}


def _two_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def test_tied_weights_are_refused():
    """Each tied layer would get its own normalized weight; the export wrote one into both."""
    net = _two_convs()
    net[2] = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    net.add_module("extra", nn.Conv2d(8, 8, 3, padding=1))
    net.extra.weight = net[2].weight
    with pytest.raises(ConfigError, match=r"layers '2' and 'extra' share one weight Parameter"):
        apply_spectral_norm(net, beta=1.0, input_shape=(3, 8, 8))
    assert not normalized_layers(net)


def test_beta_pattern_that_never_applies_is_refused():
    net = _two_convs()
    with pytest.raises(
        ConfigError, match=r"beta pattern '5' never applies: .* earlier pattern '\*'"
    ):
        apply_spectral_norm(net, beta={"*": 1.0, "5": math.inf}, input_shape=(3, 8, 8))
    apply_spectral_norm(net, beta={"5": math.inf, "*": 1.0}, input_shape=(3, 8, 8))
    assert normalized_layers(net)["5"][1].beta == math.inf
    assert normalized_layers(net)["0"][1].beta == 1.0


def test_bad_value_in_a_beta_mapping_names_its_pattern():
    with pytest.raises(ValueError, match=r"beta\['2'\]: beta must be a number > 0 .* got 0"):
        apply_spectral_norm(_two_convs(), beta={"2": 0}, input_shape=(3, 8, 8))


def test_conv_like_modules_that_are_not_torch_layers_warn():
    """Like timm's CondConv2d (its weight holds the experts' kernels; it went unmentioned)."""

    class ExpertConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)

        def forward(self, x):
            return nn.functional.conv2d(x, self.weight, padding=1)

    net = _two_convs()
    net[2] = ExpertConv()
    with pytest.warns(UserWarning, match=r"skipping 1 convolution-like .* '2' \(ExpertConv\)"):
        apply_spectral_norm(net, beta=1.0, input_shape=(3, 8, 8))
    assert sorted(normalized_layers(net)) == ["0", "5"]


def test_another_resolution_warns_once_per_model():
    """The bound is the operator's at input_shape: at 64 px ResNet-18's layer4 reached 1.88 beta."""
    net = _two_convs()
    apply_spectral_norm(net, beta=1.0, input_shape=(3, 8, 8))
    twin = copy.deepcopy(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.train()(torch.rand(2, 3, 8, 8))
        net.eval()(torch.rand(1, 3, 8, 8))
        assert not caught
        net(torch.rand(2, 3, 16, 16))
        net.train()(torch.rand(2, 3, 16, 16))
        twin.eval()(torch.rand(3, 16, 16)[None])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # one for the model, one for its copy
    assert messages[0].startswith("layer '0' was normalized for inputs 3x8x8 but now sees 3x16x16")


def test_distributed_wrapper_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped = nn.parallel.DistributedDataParallel(_two_convs())
        with pytest.raises(ConfigError, match="apply it to the module before wrapping"):
            apply_spectral_norm(wrapped, beta=1.0, input_shape=(3, 8, 8))
    finally:
        dist.destroy_process_group()
