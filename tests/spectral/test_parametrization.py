"""BoundedSpectralNorm: the rule, its state, its gradients, and register/remove round trips."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sn_lightning.spectral import (
    BoundedSpectralNorm,
    apply_spectral_norm,
    bounded_spectral_norm,
    dense_operator_norm,
    freeze_spectral_norm,
    operator_norm,
    parametrization,
    refresh_spectral_norm,
    remove_bounded_spectral_norm,
    remove_spectral_norm,
)
from sn_lightning.spectral.ops import _power_iteration


def _sn(layer, shape, **kw):
    return bounded_spectral_norm(layer, input_shape=shape, **kw)


def _state(layer):
    return layer.parametrizations.weight[0].u.clone()


def test_rule_only_shrinks():
    torch.manual_seed(0)
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=100.0)
    # far below beta: the very same tensor comes back (no copy, no rescale)
    assert layer.weight is layer.parametrizations.weight.original
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=0.1)
    p = layer.parametrizations.weight[0]
    W = layer.parametrizations.weight.original
    layer.eval()
    sigma = float(p.sigma(W))
    assert sigma > 0.1
    torch.testing.assert_close(layer.weight, W / (sigma / 0.1))


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 7, 7)),
        (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 5, 5)),
        (lambda: nn.Conv1d(3, 5, 5, padding=2, padding_mode="circular"), (3, 8)),
        (lambda: nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), (4, 3, 3)),
        (lambda: nn.Linear(8, 5), None),
    ],
    ids=["strided", "depthwise", "conv1d-circular", "transpose", "linear"],
)
def test_training_forwards_bound_the_true_norm(layer, shape):
    torch.manual_seed(1)
    layer = layer()
    nn.init.normal_(layer.weight)
    beta = 0.7
    _sn(layer, shape, beta=beta, init_iterations=5)
    layer.train()
    x = torch.randn(2, *(shape or (8,)))
    for _ in range(200):
        layer(x)
    truth = operator_norm(layer, shape, n_iter=1000)  # of the weight in use
    assert truth <= beta * (1 + 1e-2)
    assert truth >= beta * (1 - 1e-2)  # it was above beta: shrunk to beta, not below


def test_eval_forward_changes_no_buffer_and_is_deterministic():
    torch.manual_seed(2)
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=0.5)
    x = torch.randn(2, 3, 6, 6)
    layer.eval()
    u0 = _state(layer)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(_state(layer), u0)
    assert torch.equal(y1, y2)
    # a training forward uses the same function of (W, u) and then stores the new u
    layer.train()
    y3 = layer(x)
    assert torch.equal(y3, y1)
    assert not torch.equal(_state(layer), u0)


def test_freeze_stops_updates_in_train_mode_and_restores_on_exception():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
    _sn(model[0], (3, 6, 6))
    _sn(model[2], (4, 6, 6))
    model.train()
    x = torch.randn(2, 3, 6, 6)
    before = [_state(model[0]), _state(model[2])]
    with freeze_spectral_norm(model):
        model(x)
        model(x).sum().backward()
    assert torch.equal(_state(model[0]), before[0])
    assert torch.equal(_state(model[2]), before[1])
    with pytest.raises(RuntimeError, match="boom"), freeze_spectral_norm(model):
        raise RuntimeError("boom")
    assert not model[0].parametrizations.weight[0].frozen
    model(x)
    assert not torch.equal(_state(model[0]), before[0])


def test_u_is_in_the_state_dict_with_the_input_shape():
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 9, 7))
    sd = layer.state_dict()
    assert sd["parametrizations.weight.0.u"].shape == (1, 3, 9, 7)
    assert sd["parametrizations.weight.0.u"].dtype == torch.float32
    assert float(sd["parametrizations.weight.0.u"].norm()) == pytest.approx(1.0, rel=1e-5)
    lin = _sn(nn.Linear(6, 2), None)
    assert lin.state_dict()["parametrizations.weight.0.u"].shape == (1, 6)


def test_amp_keeps_power_iteration_in_float32():
    torch.manual_seed(4)
    layer = _sn(nn.Conv2d(3, 8, 3, padding=1), (3, 6, 6), beta=0.3)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.parametrizations.weight[0].u.dtype == torch.float32
    ref(x)  # the same iteration without autocast
    torch.testing.assert_close(_state(layer), _state(ref), rtol=0, atol=0)
    layer.eval()
    ref.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W_amp = layer.weight
    assert W_amp.dtype == torch.float32
    torch.testing.assert_close(W_amp, ref.weight, rtol=0, atol=0)


def _reference_weight(layer, u0):
    """W / max(1, <A u, v>/beta) with u = u0 (unit) and v = A u / ||A u||, by plain autograd.

    A grouped convolution is block diagonal: u0 unit in each group, sigma the largest group's
    ||A_g u_g|| and v that group's unit A_g u_g, zero elsewhere (ops Note [blocks]).
    """
    p = layer.parametrizations.weight[0]
    W = layer.parametrizations.weight.original
    op, _ = p._operator(W)
    groups = layer.groups if p.method == "operator" and not isinstance(layer, nn.Linear) else 1
    u = u0.reshape(groups, -1)
    u = (u / u.norm(dim=1, keepdim=True)).reshape(u0.shape)
    with torch.no_grad():
        Au = op(u).reshape(groups, -1)
        norms = Au.norm(dim=1)
        top = (norms == norms.max()).to(Au.dtype)
        v = (Au / norms[:, None] * top[:, None]).reshape(op(u).shape)
    sigma = torch.sum(op(u) * v)
    return W / torch.clamp(sigma / p.beta, min=1.0)


@pytest.mark.parametrize("method", ["operator", "matrix"])
@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 7, 7)),
        (lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"), (4, 6, 6)),
        (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), (8, 5, 4)),
        (lambda: nn.Conv2d(128, 64, 3, padding=1), (128, 2, 2)),  # im2col + GEMM path
        (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2), (4, 9)),
        (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 3, 3, 3)),
        (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (4, 5, 5)),
        (lambda: nn.Linear(5, 7), None),
    ],
    ids=["strided", "reflect", "grouped", "gemm", "conv1d", "conv3d", "transpose", "linear"],
)
@pytest.mark.parametrize("beta", [0.1, 100.0], ids=["clamped", "within"])
@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_fused_gradient_equals_autograd(layer, shape, method, beta, path, monkeypatch):
    """Both backward paths: CPU (sigma as a number) and accelerator (0-dim tensors, no sync)."""
    if path == "accelerator":
        monkeypatch.setattr(parametrization, "_host_sigma", lambda sigma: None)
    torch.manual_seed(5)
    layer = layer()
    _sn(layer, shape, beta=beta, method=method)
    u0 = _state(layer)
    ref = _reference_weight(layer, u0)
    W_sn = layer.weight  # training forward: one iteration from u0
    torch.testing.assert_close(W_sn, ref)
    g = torch.randn_like(W_sn)
    (grad,) = torch.autograd.grad((W_sn * g).sum(), layer.parametrizations.weight.original)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), layer.parametrizations.weight.original)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 7, 7)),
        (lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"), (4, 6, 6)),
        (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), (8, 5, 4)),
        (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 3, 3, 3)),
        (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (4, 5, 5)),
        (lambda: nn.Linear(5, 7), None),
    ],
    ids=["strided", "reflect", "grouped", "conv3d", "transpose", "linear"],
)
@pytest.mark.parametrize("method", ["operator", "matrix"])
def test_in_place_scaled_sigma_grad_equals_out_of_place(layer, shape, method):
    """The CUDA-graph backward writes into its static gradient buffer (``inplace=True``)."""
    torch.manual_seed(8)
    layer = _sn(layer(), shape, beta=0.1, method=method)
    p = layer.parametrizations.weight[0]
    W = layer.parametrizations.weight.original.detach()
    u, v, _ = _power_iteration(*p._operator(W), p.u, 1)
    g = torch.randn_like(W)
    for b in (0.3, torch.tensor(0.3)):  # CPU numbers and accelerator 0-dim tensors
        expected = p._scaled_sigma_grad(W, g, 0.7, b, u, v)
        buffer = g.clone()
        out = p._scaled_sigma_grad(W, buffer, torch.tensor(0.7), b, u, v, inplace=True)
        torch.testing.assert_close(out, expected)
        assert out.data_ptr() == buffer.data_ptr()  # written in place, no new weight-sized tensor


def test_cuda_graph_option_reaches_every_layer_and_cpu_runs_eagerly():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    off = apply_spectral_norm(
        copy.deepcopy(model), beta=1.0, input_shape=(1, 6, 6), cuda_graph=False
    )
    on = apply_spectral_norm(copy.deepcopy(model), beta=1.0, input_shape=(1, 6, 6))
    assert [m.parametrizations.weight[0].cuda_graph for m in (off[0], off[2])] == [False, False]
    assert [m.parametrizations.weight[0].cuda_graph for m in (on[0], on[2])] == [True, True]
    p, W = on[0].parametrizations.weight[0], on[0].parametrizations.weight.original
    assert parametrization._iteration_graph(p, W, update=True) is None  # CPU: eager


def test_detach_uv_false_lets_gradients_flow_through_the_iteration():
    torch.manual_seed(6)
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 5, 5), beta=0.1, detach_uv=False)
    p = layer.parametrizations.weight[0]
    W = layer.parametrizations.weight.original
    u0 = _state(layer)
    g = torch.randn_like(W)
    (grad,) = torch.autograd.grad((layer.weight * g).sum(), W)
    # reference: autograd through the whole iteration from u0
    _, _, sigma = _power_iteration(*p._operator(W), u0, 1)
    (grad_ref,) = torch.autograd.grad((W / (sigma / 0.1) * g).sum(), W)
    torch.testing.assert_close(grad, grad_ref)
    assert not torch.equal(_state(layer), u0)
    assert not p.u.requires_grad
    # and it differs from the detached gradient
    detached = copy.deepcopy(layer)
    detached.parametrizations.weight[0].detach_uv = True
    detached.parametrizations.weight[0].u.copy_(u0)
    Wd = detached.parametrizations.weight.original
    (grad_detached,) = torch.autograd.grad((detached.weight * g).sum(), Wd)
    assert not torch.allclose(grad, grad_detached)
    # two forwards before one backward (clean + adversarial pass) must work
    loss = layer(torch.randn(1, 3, 5, 5)).sum() + layer(torch.randn(1, 3, 5, 5)).sum()
    loss.backward()


@pytest.mark.parametrize("transposed", [False, True])
def test_matrix_method_is_torch_reshaped_kernel_norm(transposed):
    torch.manual_seed(7)
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    layer = cls(4, 6, 3, stride=2, padding=1)
    nn.init.normal_(layer.weight)
    _sn(layer, (4, 5, 5), beta=0.5, method="matrix", init_iterations=500)
    W_sn = layer.weight.detach()
    M = W_sn.transpose(0, 1) if transposed else W_sn
    assert float(torch.linalg.matrix_norm(M.flatten(1), ord=2)) == pytest.approx(0.5, rel=1e-4)
    # torch's built-in sigma (same dim convention) on the original weight
    ref = cls(4, 6, 3, stride=2, padding=1)
    ref.weight.data.copy_(layer.parametrizations.weight.original.detach())
    torch.nn.utils.parametrizations.spectral_norm(ref, n_power_iterations=500)
    torch_sigma = float((ref.parametrizations.weight.original / ref.weight).detach().flatten()[0])
    p = layer.parametrizations.weight[0]
    assert float(p.sigma(layer.parametrizations.weight.original, 500)) == pytest.approx(
        torch_sigma, rel=1e-4
    )
    # the operator norm of the matrix-normalized layer exceeds beta (PAPERS 1.4)
    assert operator_norm(layer, (4, 5, 5), n_iter=300) > 0.5


def test_deepcopy_and_state_dict_round_trip():
    torch.manual_seed(8)
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=0.5)
    x = torch.randn(2, 3, 6, 6)
    layer.train()
    layer(x)
    clone = copy.deepcopy(layer)
    assert clone.parametrizations.weight[0].u is not layer.parametrizations.weight[0].u
    layer.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    # save / load into a freshly built and parametrized layer
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    fresh = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=0.5).eval()
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


class _ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _trained_plain_net() -> nn.Module:
    """A plain net whose layers sit far above beta 0.7 (as a fine-tuned checkpoint would)."""
    torch.manual_seed(21)
    net = _ConvBnNet()
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(4.0)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("strict", [True, False])
def test_a_plain_checkpoint_loads_into_a_normalized_model(strict):
    """Note [plain load]: ``weight`` keys map onto ``original`` and u is converged for them.

    Before, a strict load raised (missing ``original``/``u``, unexpected ``weight``) and
    ``strict=False`` loaded no weight at all. Oracle: the dense operator's SVD of every layer
    an eval forward uses, and the model normalized after the same weights were loaded.
    """
    shape, beta = (3, 8, 8), 0.7
    trained = _trained_plain_net()
    torch.manual_seed(5)
    model = apply_spectral_norm(_ConvBnNet(), beta=beta, input_shape=shape, batchnorm="bound")
    result = model.load_state_dict(trained.state_dict(), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("conv", "bn", "fc"):
        layer = model.get_submodule(name)
        torch.testing.assert_close(
            layer.parametrizations.weight.original,
            trained.get_submodule(name).weight,
            rtol=0,
            atol=0,
        )
    torch.testing.assert_close(model.bn.running_var, trained.bn.running_var, rtol=0, atol=0)
    model.eval()
    for layer, layer_shape in ((model.conv, shape), (model.fc, (96,))):
        assert _dense_norm(layer, layer_shape) == pytest.approx(beta, rel=1e-4)
    ref = copy.deepcopy(trained)
    apply_spectral_norm(ref, beta=beta, input_shape=shape, batchnorm="bound", init_iterations=100)
    x = torch.rand(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_plain_load_keeps_normalized_checkpoints_copies_and_removal_apart():
    """A normalized checkpoint keeps its own u; a deepcopy loads into itself; after removal the
    hooks do nothing (the plain keys are the module's own again)."""
    shape = (3, 8, 8)
    trained = _trained_plain_net()
    torch.manual_seed(6)
    model = apply_spectral_norm(_ConvBnNet(), beta=0.7, input_shape=shape, init_iterations=3)
    saved = copy.deepcopy(model.state_dict())
    clone = copy.deepcopy(model)
    clone.load_state_dict(trained.state_dict())
    torch.testing.assert_close(clone.conv.parametrizations.weight.original, trained.conv.weight)
    assert torch.equal(
        model.conv.parametrizations.weight.original, saved["conv.parametrizations.weight.original"]
    )
    assert torch.equal(
        model.conv.parametrizations.weight[0].u, saved["conv.parametrizations.weight.0.u"]
    )
    clone.load_state_dict(saved)  # normalized keys: u as saved, not re-converged
    for key in ("conv.parametrizations.weight.0.u", "fc.parametrizations.weight.0.u"):
        assert torch.equal(clone.state_dict()[key], saved[key])
    remove_spectral_norm(clone)
    clone.load_state_dict(trained.state_dict(), strict=True)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), trained.eval()(x), rtol=0, atol=0)


def test_remove_bakes_the_eval_weight_and_restores_the_class():
    torch.manual_seed(9)
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=0.2)
    original = layer.parametrizations.weight.original
    x = torch.randn(2, 3, 6, 6)
    layer.train()
    expected = layer.eval()(x)
    layer.train()
    remove_bounded_spectral_norm(layer)
    assert type(layer) is nn.Conv2d
    assert not parametrize.is_parametrized(layer)
    assert layer.weight is original  # the parameter keeps its identity
    assert layer.training
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="has no BoundedSpectralNorm"):
        remove_bounded_spectral_norm(layer)


def test_dtype_and_device_moves_keep_working():
    torch.manual_seed(10)
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=0.5)
    layer.double()
    assert layer.parametrizations.weight[0].u.dtype == torch.float64
    y = layer(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert y.dtype == torch.float64
    layer.float().to("cpu")
    assert layer(torch.randn(1, 3, 6, 6)).dtype == torch.float32


def test_sigma_has_no_side_effects():
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6))
    u0 = _state(layer)
    p = layer.parametrizations.weight[0]
    s1 = p.sigma(layer.parametrizations.weight.original)
    s50 = p.sigma(layer.parametrizations.weight.original, 50)
    assert torch.equal(_state(layer), u0)
    assert float(s1) <= float(s50) * (1 + 1e-6)


@pytest.mark.parametrize("method", ["operator", "matrix"])
def test_refresh_converges_u_for_moved_weights_and_touches_nothing_else(method):
    """Weights moved after the last power iteration (fast training): the eval weight is over
    beta until ``refresh_spectral_norm``. Oracle: the dense operator / reshaped-kernel SVD."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU())
    model.append(nn.Sequential(nn.Flatten(), nn.Linear(5 * 4 * 4, 3)))
    apply_spectral_norm(model, beta=0.5, input_shape=(3, 8, 8), method=method)
    model.train()
    model(torch.randn(4, 3, 8, 8))  # BatchNorm statistics away from their init
    conv, linear = model[0], model[3][1]
    with torch.no_grad():  # a large step that u has not followed
        for layer in (conv, linear):
            W = layer.parametrizations.weight.original
            W.add_(torch.randn_like(W) * 2.0)

    def true_norm(layer):  # of the weight an eval forward uses
        W = layer.weight.detach().double()
        if method == "matrix" or layer is linear:
            return float(torch.linalg.matrix_norm(W.flatten(1), 2))

        def conv_map(x):
            return F.conv2d(x, W, stride=2, padding=1)

        return float(dense_operator_norm(conv_map, (3, 8, 8)))

    model.eval()
    assert max(true_norm(conv), true_norm(linear)) > 0.5 * 1.05  # the stale u misses the move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert refresh_spectral_norm(model, n_iter=300) is model
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"0.parametrizations.weight.0.u", "3.1.parametrizations.weight.0.u"}
    for layer in (conv, linear):
        assert true_norm(layer) == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError, match="n_iter must be an int >= 1, got 0"):
        refresh_spectral_norm(model, n_iter=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(-1.5)
    with freeze_spectral_norm(model):  # no u updates, also not from a refresh
        refresh_spectral_norm(model)
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items() if k.endswith(".u"))


def test_infinite_beta_never_rescales():
    layer = _sn(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), beta=math.inf)
    assert layer.weight is layer.parametrizations.weight.original


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "fro"}, r"unknown method 'fro'; valid: \('operator', 'matrix'\)"),
        ({"beta": 0.0}, "beta must be a number > 0"),
        ({"beta": -1.0}, "beta must be a number > 0"),
        ({"n_power_iterations": 0}, "n_power_iterations must be an int >= 1, got 0"),
        ({"init_iterations": -1}, "init_iterations must be an int >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _sn(nn.Conv2d(3, 4, 3), (3, 6, 6), **kwargs)


def test_bad_layers_and_names_raise():
    with pytest.raises(ValueError, match="unsupported layer type BatchNorm2d; supported: Linear"):
        bounded_spectral_norm(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="only 'weight'"):
        bounded_spectral_norm(nn.Linear(3, 3), name="bias")
    layer = _sn(nn.Linear(3, 3), None)
    with pytest.raises(ValueError, match="already has a BoundedSpectralNorm"):
        bounded_spectral_norm(layer)
    with pytest.raises(ValueError, match="needs input_shape"):
        bounded_spectral_norm(nn.Conv2d(3, 3, 3))
    assert isinstance(layer.parametrizations.weight[0], BoundedSpectralNorm)


def test_tf32_off_switches_both_flags_and_restores_them():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.allow_tf32, matmul.allow_tf32 = True, True
        seen = []

        def fail() -> None:
            with parametrization._tf32_off():
                seen.append((cudnn.allow_tf32, matmul.allow_tf32))
                raise KeyError  # restored on the way out of an exception too

        with pytest.raises(KeyError):
            fail()
        assert seen == [(False, False)]
        assert cudnn.allow_tf32 and matmul.allow_tf32
        cudnn.allow_tf32, matmul.allow_tf32 = True, False  # a flag that is off stays off
        with parametrization._tf32_off():
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.allow_tf32 and not matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def _dense_norm(layer, shape):
    """||A||_2 of the layer in use (bias removed) from its forward on the identity basis."""
    n = math.prod(shape)
    with torch.no_grad():
        basis = torch.eye(n).reshape(n, *shape)
        J = (layer(basis) - layer(torch.zeros(1, *shape))).reshape(n, -1).double()
    return float(torch.linalg.svdvals(J)[0])


@pytest.mark.parametrize("weights", ["spread", "equal"])
def test_depthwise_groups_keep_their_own_iteration(weights):
    """A block-diagonal conv: no group's part of u dies, and one grown later is found at once.

    One iteration on the whole operator let the weaker channels' part of u underflow to exact
    zeros (16 of 64 after registration here), so a channel grown past the others by training
    stayed invisible and the layer's norm stayed above beta for good (ops Note [blocks]).
    """
    torch.manual_seed(0)
    shape, beta = (16, 4, 4), 1.0
    layer = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    if weights == "spread":
        with torch.no_grad():
            layer.weight.mul_(torch.linspace(0.05, 1.0, 16).view(-1, 1, 1, 1))
    _sn(layer, shape, beta=beta, init_iterations=300)
    p = layer.parametrizations.weight[0]
    blocks = p.u.reshape(16, -1).norm(dim=1)
    torch.testing.assert_close(blocks, torch.ones(16))  # every group alive, unit
    x = torch.randn(4, *shape)
    for channel in (0, 7, 3):  # each in turn grown past the others, as a large SGD step could
        with torch.no_grad():
            layer.parametrizations.weight.original[channel] *= 40
        layer.train()
        with torch.no_grad():
            for _ in range(3):
                layer(x)
        layer.eval()
        assert _dense_norm(layer, shape) <= beta * (1 + 1e-3), channel
        # the estimate is the strongest group's own norm, not a blend of groups
        raw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        with torch.no_grad():
            raw.weight.copy_(layer.parametrizations.weight.original)
        sigma = float(p.sigma(layer.parametrizations.weight.original))
        assert sigma == pytest.approx(_dense_norm(raw, shape), rel=1e-3)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "parametrization"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(fold, reentrant):
    """``torch.utils.checkpoint`` (timm's ``set_grad_checkpointing``) around normalized layers.

    The rescale's backward read its saved tensors twice, which non-reentrant checkpointing
    refuses ("Unpack is being triggered for a tensor that was already unpacked once"). Frozen,
    the recomputed forward is the same function: the gradients equal the plain backward's.
    """
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    apply_spectral_norm(net, beta=0.3, input_shape=(6,), batch_fold=fold)
    ref = copy.deepcopy(net)
    x = torch.randn(5, 6, requires_grad=True)
    with freeze_spectral_norm(net), freeze_spectral_norm(ref):
        torch.utils.checkpoint.checkpoint(net, x, use_reentrant=reentrant).square().sum().backward()
        ref(x).square().sum().backward()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    for m in (net, ref):  # training mode: u converged at registration (6 and 8 dimensions)
        m.zero_grad()
    torch.utils.checkpoint.checkpoint(net, x, use_reentrant=reentrant).square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def _reference_loss(net, plain, x, beta):
    """The model's loss by plain autograd through ``W / clamp(<A_W u, v> / beta, min=1)`` in
    ``plain`` (the same architecture without SN): the unit u each layer of ``net`` holds and
    ``v = A u / ||A u||`` constants (per group: the strongest)."""
    from torch.func import functional_call

    params, consts = {}, {}
    for name, m in net.named_modules():
        if not parametrize.is_parametrized(m, "weight"):
            continue
        norm = m.parametrizations.weight[0]
        W = m.parametrizations.weight.original
        A = norm._operator(W.detach())[0]
        u = norm.u / torch.linalg.vector_norm(norm.u)
        if norm.blocks > 1:  # the strongest group's pair
            Au = A(u).reshape(norm.blocks, -1)
            top = int(torch.linalg.vector_norm(Au, dim=1).argmax())
            mask = torch.zeros(norm.blocks, 1, dtype=u.dtype)
            mask[top] = 1
            u = (u.reshape(norm.blocks, -1) * mask).reshape(u.shape)
            u = u / torch.linalg.vector_norm(u)
        Au = A(u)
        consts[name] = (norm, u, Au / torch.linalg.vector_norm(Au))
        params[name] = W

    def weights(flat):
        out = {}
        for name, (norm, u, v) in consts.items():
            W = flat[name]
            sigma = torch.vdot(norm._operator(W)[0](u).reshape(-1), v.reshape(-1))
            out[f"{name}.weight"] = W / torch.clamp(sigma / beta, min=1.0)
        return out

    def loss(flat, biases):
        return functional_call(plain, {**weights(flat), **biases}, (x,)).square().sum()

    return params, loss


@pytest.mark.parametrize("mode", ["eval", "train", "train-fold"])
@pytest.mark.parametrize("method", ["operator", "matrix"])
def test_second_derivatives_through_the_rescale(mode, method):
    """Hessian-vector products and gradient penalties on the weights differentiate the rescale's
    gradient. Its fused backward was once-differentiable, and PyTorch returned wrong second
    derivatives without an error (weights' HVP 7.4 against 8.9 on a two-layer MLP): under
    ``create_graph`` it now builds the gradient with autograd (oracle: plain autograd)."""

    def make():
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, padding=1, groups=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 9, 3),
        ).double()

    torch.manual_seed(13)
    net = make()
    fold = mode == "train-fold" and method == "operator"  # the CPU fold (fused.py) is operator's
    apply_spectral_norm(net, beta=0.2, input_shape=(2, 5, 5), method=method, batch_fold=fold)
    net.train(mode != "eval")
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    params, ref_loss = _reference_loss(net, make(), x, 0.2)
    biases = {f"{n}": p for n, p in net.named_parameters() if n.endswith("bias")}
    names = list(params)
    with contextlib.nullcontext() if fold else freeze_spectral_norm(net):
        loss = net(x).square().sum()  # frozen or folded: the forward estimates from u as stored
    ws = [params[n] for n in names]
    torch.testing.assert_close(loss, ref_loss(params, biases))
    grads = torch.autograd.grad(loss, ws, create_graph=True)
    ref_grads = torch.autograd.grad(ref_loss(params, biases), ws, create_graph=True)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
    vec = [torch.randn_like(w) for w in ws]
    hvp = torch.autograd.grad(sum((g * e).sum() for g, e in zip(grads, vec, strict=True)), ws)
    ref_hvp = torch.autograd.grad(
        sum((g * e).sum() for g, e in zip(ref_grads, vec, strict=True)), ws
    )
    for a, b in zip(hvp, ref_hvp, strict=True):
        torch.testing.assert_close(a, b)
