"""The batch fold (fused.py) against the parametrization path it replaces: same values, grads, u."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sn_lightning.spectral import (
    apply_spectral_norm,
    bounded_spectral_norm,
    freeze_spectral_norm,
    fused,
    remove_spectral_norm,
)

LAYERS = [
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 7, 7)),
    (lambda: nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False), (6, 5, 4)),
    (lambda: nn.Conv2d(8, 8, 3, padding="same"), (8, 5, 5)),
    (lambda: nn.Conv2d(128, 64, 3, padding=1), (128, 2, 2)),  # im2col + GEMM adjoint
    (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2), (4, 9)),
    (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 3, 3, 3)),
    (lambda: nn.Linear(5, 7), None),
]
IDS = ["strided", "dilated", "same", "gemm", "conv1d", "conv3d", "linear"]
DEFAULT_RATIO = fused.FOLD_RATIO


@pytest.fixture(autouse=True)
def _fold_every_layer(monkeypatch):
    """Test layers are tiny next to their batches: fold them all (the ratio rule has its test)."""
    monkeypatch.setattr(fused, "FOLD_RATIO", math.inf)


def _pair(make, shape, **kw):
    """(folding layer, the same layer forced onto the parametrization path)."""
    folded = bounded_spectral_norm(make(), input_shape=shape, **kw)
    param = copy.deepcopy(folded)
    param.parametrizations.weight[0].batch_fold = False
    return folded, param


def _input(layer, shape, batch=3):
    if isinstance(layer, nn.Linear):
        return torch.randn(batch, 2, layer.in_features, requires_grad=True)  # token dim too
    return torch.randn(batch, *shape, requires_grad=True)


def _params(layer):
    ps = [layer.parametrizations.weight.original]
    return ps + ([layer.bias] if layer.bias is not None else [])


@pytest.mark.parametrize(("make", "shape"), LAYERS, ids=IDS)
@pytest.mark.parametrize("beta", [0.1, 100.0], ids=["clamped", "within"])
def test_fold_equals_the_parametrization(make, shape, beta):
    torch.manual_seed(0)
    folded, param = _pair(make, shape, beta=beta)
    x = _input(folded, shape)
    y, y_ref = folded(x), param(x)
    assert type(y.grad_fn).__name__ == "_FoldedLayerBackward"
    assert type(y_ref.grad_fn).__name__ != "_FoldedLayerBackward"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *_params(folded)], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *_params(param)], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # u advanced by the same half round (the fold takes it from the input-gradient product)
    u, u_ref = folded.parametrizations.weight[0].u, param.parametrizations.weight[0].u
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-6)
    assert float(u.norm()) == pytest.approx(1.0, rel=1e-5)


def test_grouped_convolutions_take_the_parametrization():
    """Per-group power iteration (ops Note [blocks]): no fold; u holds a unit vector per group."""
    torch.manual_seed(0)
    layer = bounded_spectral_norm(
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4), input_shape=(8, 5, 5), beta=0.1
    )
    assert layer.parametrizations.weight[0]._fold_geometry is None
    y = layer(torch.randn(3, 8, 5, 5, requires_grad=True))
    assert type(y.grad_fn).__name__ != "_FoldedLayerBackward"
    y.sum().backward()
    u = layer.parametrizations.weight[0].u
    torch.testing.assert_close(u.reshape(4, -1).norm(dim=1), torch.ones(4))


@pytest.mark.parametrize(("make", "shape"), LAYERS[:1] + LAYERS[-1:], ids=["conv", "linear"])
def test_double_backward_equals_the_parametrization(make, shape):
    """Exact DataGrad differentiates the input gradient: the fold recomputes with autograd."""
    torch.manual_seed(1)
    folded, param = _pair(make, shape, beta=0.1)
    out = []
    x0 = _input(folded, shape).detach()
    for layer in (folded, param):
        x = x0.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad((layer(x) ** 2).sum(), x, create_graph=True)
        out.append(torch.autograd.grad((gx**2).sum(), _params(layer)))
        out.append(layer.parametrizations.weight[0].u.clone())
    for a, b in zip(out[:2], out[2:], strict=True):
        if isinstance(a, tuple):
            for p, q in zip(a, b, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_n_power_iterations_and_no_grad_training_forward():
    torch.manual_seed(2)
    folded, param = _pair(lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 6, 6), beta=0.1,
                          n_power_iterations=3, init_iterations=0)  # fmt: skip
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():  # no backward follows: u advances in the forward itself
        torch.testing.assert_close(folded(x), param(x))
    torch.testing.assert_close(
        folded.parametrizations.weight[0].u, param.parametrizations.weight[0].u
    )
    x.requires_grad_(True)
    torch.testing.assert_close(folded(x), param(x), rtol=1e-5, atol=1e-6)


def test_output_can_be_modified_in_place_and_two_forwards_share_a_backward():
    """ReLU(inplace=True) on the fold's output; a clean and an adversarial pass, one backward.

    Both passes estimate sigma from the stored u (u advances in the backward), so the reference
    is the parametrization path with u reset to its stored value before the second pass.
    """
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    apply_spectral_norm(net, beta=0.5, input_shape=(6,))
    ref = copy.deepcopy(net)
    norms = [m.parametrizations.weight[0] for m in (ref[0], ref[2])]
    for p in norms:
        p.batch_fold = False
    x = torch.randn(5, 6)
    (net(x).square().sum() + net(2 * x).square().sum()).backward()
    stored = [p.u.clone() for p in norms]
    first = ref(x).square().sum()
    for p, u in zip(norms, stored, strict=True):
        p.u.copy_(u)
    (first + ref(2 * x).square().sum()).backward()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    for m, p in zip((net[0], net[2]), norms, strict=True):
        torch.testing.assert_close(m.parametrizations.weight[0].u, p.u, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["eval", "frozen", "autocast", "first-layer", "resolution"])
def test_fold_steps_aside(case):
    """Forwards the fold does not cover run the parametrization (same values, no fold node)."""
    torch.manual_seed(4)
    layer = bounded_spectral_norm(nn.Conv2d(3, 4, 3, padding=1), input_shape=(3, 6, 6), beta=0.1)
    x = torch.randn(2, 3, 6, 6, requires_grad=case != "first-layer")
    if case == "resolution":
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
    if case == "eval":
        layer.eval()
    u0 = layer.parametrizations.weight[0].u.clone()
    if case == "frozen":
        with freeze_spectral_norm(layer):
            y = layer(x)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    else:
        y = layer(x)
    assert type(y.grad_fn).__name__ != "_FoldedLayerBackward"
    updates = case not in ("eval", "frozen")
    assert torch.equal(layer.parametrizations.weight[0].u, u0) is not updates


def test_copies_removal_and_state_dict_keep_working():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    apply_spectral_norm(net, beta=0.5, input_shape=(3, 6, 6))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    clone = copy.deepcopy(net)
    assert clone[2].forward.__func__ is fused.fused_forward  # the copy keeps the fast forward
    y = clone(x)
    assert type(y.grad_fn).__name__ == "_FoldedLayerBackward"
    y.sum().backward()
    assert net[2].parametrizations.weight.original.grad is None  # the copy is independent
    assert not torch.equal(
        clone[2].parametrizations.weight[0].u, net[2].parametrizations.weight[0].u
    )
    net.load_state_dict(clone.state_dict())
    net.eval(), clone.eval()
    torch.testing.assert_close(net(x), clone(x))
    remove_spectral_norm(clone)
    assert type(clone[2]) is nn.Conv2d and type(clone[2]).forward is nn.Conv2d.forward


def test_fold_ratio_keeps_wide_outputs_on_the_parametrization(monkeypatch):
    """A layer whose batch output dwarfs its weight rescales the weight instead (FOLD_RATIO)."""
    monkeypatch.setattr(fused, "FOLD_RATIO", DEFAULT_RATIO)
    layer = bounded_spectral_norm(nn.Conv2d(2, 2, 1), input_shape=(2, 16, 16), beta=0.1)
    x = torch.randn(4, 2, 16, 16, requires_grad=True)  # 2048 outputs, 6 weights
    assert fused.FOLD_RATIO * layer.parametrizations.weight.original.numel() < 4 * 2 * 16 * 16
    assert type(layer(x).grad_fn).__name__ != "_FoldedLayerBackward"
    lin = bounded_spectral_norm(nn.Linear(64, 64), beta=0.1)  # 8 x 64 outputs, 4096 weights
    assert type(lin(torch.randn(8, 64, requires_grad=True)).grad_fn).__name__ == (
        "_FoldedLayerBackward"
    )


def test_training_matches_the_parametrization_over_sgd_steps():
    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4),
    )  # fmt: skip
    apply_spectral_norm(net, beta=0.7, input_shape=(3, 8, 8))
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if hasattr(m, "parametrizations"):
            m.parametrizations.weight[0].batch_fold = False
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for model in (net, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factor", [5.0, 1 + 5e-5])
def test_a_non_unit_vector_gives_the_parametrization_values(factor):
    """A loaded (or re-typed) u need not be unit: both paths estimate from u / ||u||."""
    torch.manual_seed(7)
    folded, param = _pair(lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 5, 5), beta=0.1)
    state = folded.state_dict()
    state["parametrizations.weight.0.u"] = factor * state["parametrizations.weight.0.u"]
    for layer in (folded, param):
        layer.load_state_dict(state)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    y, y_ref = folded(x), param(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *_params(folded)], g)
    for a, b in zip(grads, torch.autograd.grad(y_ref, [x, *_params(param)], g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_edge_inputs_empty_batch_subclass_and_forward_ad():
    torch.manual_seed(8)
    folded, param = _pair(lambda: nn.Linear(5, 7), None, beta=0.1)
    empty = torch.randn(0, 5, requires_grad=True)
    for layer in (folded, param):  # an empty batch: zero gradients, u still advances
        layer(empty).sum().backward()
        assert torch.equal(layer.parametrizations.weight.original.grad, torch.zeros(7, 5))
    torch.testing.assert_close(
        folded.parametrizations.weight[0].u, param.parametrizations.weight[0].u
    )

    class Scaled(nn.Conv2d):  # overrides only _conv_forward: a different operator
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, 2 * w, b)

    assert not fused.supports_fold(Scaled(2, 2, 3))
    # nor is its operator known: normalizing it would bound the wrong map
    with pytest.raises(ValueError, match="Scaled changes the forward of Conv2d"):
        bounded_spectral_norm(Scaled(2, 2, 3), input_shape=(2, 5, 5), beta=0.1)

    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        dual = fwad.make_dual(torch.randn(3, 5), torch.randn(3, 5))
        out, tangent = fwad.unpack_dual(folded(dual))
        out_ref, tangent_ref = fwad.unpack_dual(param(dual))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tangent, tangent_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "parametrization"])
def test_a_zero_initialized_weight_is_bounded_once_training_grows_it(fold):
    """A zero weight maps every u to 0. Normalizing that 0 stored u = 0 for good (at the
    registration check already): sigma then stayed 0 and the layer unbounded however large
    training made its weight. Both paths keep the random unit u instead."""
    torch.manual_seed(9)
    layer = nn.Linear(6, 4).double()
    nn.init.zeros_(layer.weight)
    bounded_spectral_norm(layer, beta=0.5, batch_fold=fold)
    u = layer.parametrizations.weight[0].u
    assert float(torch.linalg.vector_norm(u)) == pytest.approx(1.0)
    x = torch.randn(32, 6, dtype=torch.float64)
    target = x @ (3 * torch.randn(6, 4, dtype=torch.float64))  # wants a weight far above beta
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        (layer(x) - target).pow(2).mean().backward()
        opt.step()
    assert (
        float(torch.linalg.matrix_norm(layer.parametrizations.weight.original, 2)) > 1.0
    )  # 2 beta
    for _ in range(30):  # one round a step lags behind training: more rounds on the final weight
        layer(x).sum().backward()
    layer.eval()
    assert float(torch.linalg.matrix_norm(layer.weight, 2)) <= 0.5 * (1 + 1e-2)


def test_a_zero_operator_folds_like_the_parametrization_double_backward_included():
    """Every tap of this conv reads padding (A = 0): the fold took sigma = 1 from 0 / 0 and
    scaled by beta, and its double backward divided by sigma = 0 (NaN)."""
    torch.manual_seed(10)
    make = lambda: nn.Conv1d(2, 3, 1, stride=2, padding=1).double()  # noqa: E731
    folded, param = _pair(make, (2, 1), beta=0.5)
    grads = []
    for layer in (folded, param):
        torch.manual_seed(11)
        x = torch.randn(4, 2, 1, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        (gx,) = torch.autograd.grad(y.pow(2).sum() + y.sum(), x, create_graph=True)
        (y.sum() + gx.pow(2).sum()).backward()
        grads.append([layer.bias.grad, layer.parametrizations.weight.original.grad, y.detach()])
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_a_zero_u_in_a_checkpoint_restarts_at_load():
    """Checkpoints of zero-weight layers saved before the fix hold u = 0: loading restarts those
    blocks at the uniform unit vector (the others load bit for bit), so sigma can grow again."""
    torch.manual_seed(18)
    layer = bounded_spectral_norm(nn.Conv2d(4, 4, 3, padding=1, groups=2), input_shape=(4, 5, 5))
    state = layer.state_dict()
    key = "parametrizations.weight.0.u"
    u = state[key].clone()
    state[key] = u.clone()
    state[key][:, :2] = 0  # the first group's part
    layer.load_state_dict(state)
    loaded = layer.parametrizations.weight[0].u
    torch.testing.assert_close(loaded[:, :2], torch.full_like(u[:, :2], 50**-0.5))
    assert torch.equal(loaded[:, 2:], u[:, 2:])
    single = bounded_spectral_norm(nn.Linear(3, 2), beta=0.1)
    single.load_state_dict({**single.state_dict(), key: torch.zeros(1, 3)})
    torch.testing.assert_close(single.parametrizations.weight[0].u, torch.full((1, 3), 3**-0.5))
    x = torch.randn(4, 3, requires_grad=True)
    for _ in range(30):  # training rounds from the restarted u (a zero one stayed 0: unbounded)
        single(x).sum().backward()
    single.eval()
    assert float(torch.linalg.matrix_norm(single.weight.detach(), 2)) <= 0.1 * (1 + 1e-4)
