import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from sn_lightning import apply_spectral_norm, create_backbone
from sn_lightning.attacks import PGD
from sn_lightning.attacks.fold import FoldedConv, folded_view


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding actually changes weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


def _out_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.logsumexp(dim=1).sum(), x)
    return out.detach(), g


def _folds(view: nn.Module) -> list[FoldedConv]:
    return [m for m in view.modules() if isinstance(m, FoldedConv)]


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.resnet18(num_classes=10))


def test_folded_resnet_matches_outputs_and_input_gradients(resnet):
    x = torch.rand(3, 3, 32, 32)
    view = folded_view(resnet)
    assert view is not resnet
    assert len(_folds(view)) == 20  # every conv of ResNet-18 (incl. downsample) feeds a BatchNorm
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.modules())
    out0, g0 = _out_and_grad(resnet, x)
    out1, g1 = _out_and_grad(view, x)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6 * g0.abs().max().item())


def test_folded_view_of_spectral_normalized_backbone_uses_normalized_weights():
    torch.manual_seed(0)
    model = create_backbone("torchvision:resnet18", num_classes=10, in_chans=3, input_size=(32, 32))
    apply_spectral_norm(model, beta=0.5, input_shape=(3, 32, 32))  # beta < sigma: rescaled
    _randomize_bn(model)
    x = torch.rand(2, 3, 32, 32)
    with parametrize.cached():
        view = folded_view(model)
        out1, g1 = _out_and_grad(view, x)
        out0, g0 = _out_and_grad(model, x)
    assert len(_folds(view)) == 20
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6 * g0.abs().max().item())


def test_view_is_refreshed_on_every_call_and_has_no_parameter_gradients(resnet):
    x = torch.rand(2, 3, 32, 32)
    view = folded_view(resnet)
    assert all(not f.weight.requires_grad for f in _folds(view))
    with torch.no_grad():
        resnet.conv1.weight.mul_(2.0)
        resnet.bn1.running_var.mul_(3.0)
    again = folded_view(resnet)
    assert again is view  # the trace is cached; only the folded constants change
    torch.testing.assert_close(again(x), resnet(x), rtol=1e-5, atol=1e-5)


def test_training_mode_batchnorm_is_not_folded(resnet):
    resnet.train()
    assert folded_view(resnet) is resnet


@pytest.mark.parametrize("where", ["root", "block", "conv"])
def test_models_with_hooks_are_attacked_as_they_are(resnet, where):
    """A view would bypass hooks (of folded layers and of modules traced through)."""
    module = {"root": resnet, "block": resnet.layer1[0], "conv": resnet.layer1[0].conv1}[where]
    handle = module.register_forward_hook(lambda m, i, o: None)
    assert folded_view(resnet) is resnet
    handle.remove()
    assert folded_view(resnet) is not resnet


def test_untraceable_model_is_returned_unchanged():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 2
            return self.bn(self.conv(x)).flatten(1)

    model = Branchy().eval()
    assert folded_view(model) is model


def test_attack_uses_the_folded_view_and_finds_the_same_examples(resnet, monkeypatch):
    """By default no BatchNorm kernel runs inside an eval-mode attack; the examples are those of
    the unfolded model up to sign flips of near-zero gradient entries."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    y = resnet(x).argmax(dim=1)
    calls = []
    real = torch.nn.modules.batchnorm.F.batch_norm
    monkeypatch.setattr(
        torch.nn.modules.batchnorm.F,
        "batch_norm",
        lambda *a, **k: calls.append(1) or real(*a, **k),
    )
    folded = PGD("linf", eps=8 / 255, steps=5)
    folded(resnet, x, y)
    assert len(calls) == 20  # the new view's one check against the model (one forward)
    calls.clear()
    adv_fold = folded(resnet, x, y)  # the cached view
    assert calls == []
    plain = PGD("linf", eps=8 / 255, steps=5)
    plain.fold_batchnorm = False
    adv_plain = plain(resnet, x, y)
    assert len(calls) == 20 * 5  # 20 BatchNorms x one forward per step (true labels)
    same = (adv_plain - adv_fold).abs() < 1e-6
    assert same.float().mean() > 0.99
    with torch.no_grad():
        agree = resnet(adv_fold).argmax(1) == resnet(adv_plain).argmax(1)
    assert agree.float().mean() >= 15 / 16


def _normalized_cnn() -> nn.Module:
    """InputNormalize (traced through: its mean/std are held by the trace) + Conv -> BN."""
    from sn_lightning.models.normalize import InputNormalize

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip
    return _randomize_bn(nn.Sequential(InputNormalize([0.5], [0.25]), net))


def test_view_follows_rebound_buffers_of_traced_through_modules():
    # load_state_dict(assign=True) and model.to(device) rebind buffers to new tensors; a cached
    # trace that kept the old mean/std computed another function (logits off by ~6).
    model = _normalized_cnn()
    x = torch.rand(4, 1, 8, 8)
    assert folded_view(model) is not model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.mean"], state["0.std"] = torch.tensor([0.9]), torch.tensor([0.05])
    model.load_state_dict(state, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(folded_view(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_attack_after_a_device_move_runs_on_the_new_device():
    # Lightning's teardown moves the module to the CPU after a GPU fit; the meta device stands in
    # for the other device here (the cached view held the old device's buffers and raised).
    model = _normalized_cnn()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    PGD("linf", eps=0.1, steps=2)(model, x, y)
    model.to("meta")
    x_adv = PGD("linf", eps=0.1, steps=2)(model, x.to("meta"), y.to("meta"))
    assert x_adv.device.type == "meta" and x_adv.shape == x.shape


def test_float64_model_folds_in_float64():
    model = _normalized_cnn().double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out, ref = folded_view(model)(x), model(x)
    assert (out - ref).abs().max() <= 1e-13 * ref.abs().max()


def _cnn(first: nn.Module, conv: nn.Module | None = None, bn: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    conv = conv if conv is not None else nn.Conv2d(1, 8, 3, padding=1)
    bn = bn if bn is not None else nn.BatchNorm2d(8)
    net = nn.Sequential(first, conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 10))  # fmt: skip
    return _randomize_bn(net)


def test_parametrized_conv_with_its_own_forward_is_not_folded():
    """timm's Conv2dSame pads in its forward; SN's parametrize subclass hid it from fx, and the
    fold's plain convolution computed 3x3 outputs instead of 4x4 (logits off by 0.14)."""
    from timm.layers import create_conv2d

    model = _cnn(nn.Identity(), conv=create_conv2d(1, 8, 3, stride=2, padding="same"))
    apply_spectral_norm(model, beta=10.0, input_shape=(1, 8, 8))
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    with parametrize.cached():
        view = folded_view(model, x)
        assert not _folds(view)
        with torch.no_grad():
            torch.testing.assert_close(view(x), model(x))


def test_batchnorm_subclass_with_an_activation_is_not_folded():
    """timm's BatchNormAct2d applies its activation in its own forward; a parametrization on it
    hid that forward from fx and the fold dropped the ReLU."""
    from timm.layers import BatchNormAct2d

    class Double(nn.Module):
        def forward(self, w):
            return 2.0 * w

    bn = BatchNormAct2d(8, act_layer=nn.ReLU)
    parametrize.register_parametrization(bn, "weight", Double())
    model = _cnn(nn.Identity(), bn=bn)
    x = torch.rand(4, 1, 8, 8)
    view = folded_view(model, x)
    assert not _folds(view)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x))


def test_backward_pre_hook_and_global_hooks_keep_the_model():
    model = _cnn(nn.Identity())
    x = torch.rand(4, 1, 8, 8)
    handle = model[2].register_full_backward_pre_hook(lambda m, g: (g[0].clamp(-1e-3, 1e-3),))
    assert folded_view(model, x) is model
    handle.remove()
    assert folded_view(model, x) is not model
    register = torch.nn.modules.module.register_module_forward_hook
    handle = register(lambda m, i, o: o + 1.0 if isinstance(m, nn.BatchNorm2d) else None)
    try:
        assert folded_view(model, x) is model
    finally:
        handle.remove()


def test_view_that_differs_from_the_model_is_dropped():
    """fx does not record a torch.no_grad() block: the view's input gradients differed by 11%."""

    class Standardize(nn.Module):  # per-image statistics treated as constants
        def forward(self, x):
            with torch.no_grad():
                mu = x.mean(dim=(1, 2, 3), keepdim=True)
                sd = x.std(dim=(1, 2, 3), keepdim=True) + 1e-3
            return (x - mu) / sd

    model = _cnn(Standardize()).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    assert folded_view(model) is not model  # built, not checked: no example
    assert folded_view(model, x) is model  # the first call with an example checks it
    assert folded_view(model) is model
    assert folded_view(_cnn(nn.Identity()).double(), x) is not model  # a plain one folds


def test_view_follows_attribute_changes_of_traced_through_modules():
    """A trace bakes in plain attributes and unregistered tensors; the view is rebuilt."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.factor, self.offset = 1.0, torch.zeros(1)

        def forward(self, x):
            return x * self.factor + self.offset

    model = _cnn(Scale())
    x = torch.rand(4, 1, 8, 8)
    assert folded_view(model, x) is not model
    model[0].factor = 10.0
    model[0].offset = torch.full((1,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(folded_view(model, x)(x), model(x), rtol=1e-5, atol=1e-5)
