"""Golub-Kahan-Lanczos refresh (ops Note [Krylov refresh]) against SVD oracles and power iteration."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sn_lightning.spectral import (
    apply_spectral_norm,
    bounded_spectral_norm,
    linear_operator,
    normalized_layers,
    operator_norm_upper_bound,
    ops,
    refresh_spectral_norm,
)
from sn_lightning.spectral.ops import (
    _krylov_top,
    _power_iteration,
    _top_sigma,
    conv_operator,
)


def _clustered(m: int, n: int, *, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, float]:
    """An ``(m, n)`` matrix whose top singular values nearly tie (1, 0.999, ...); its norm."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    s = torch.cat(
        [
            1 - 1e-3 * torch.arange(10.0, dtype=torch.float64),
            torch.rand(k - 10, generator=gen, dtype=torch.float64) * 0.9,
        ]
    )
    W = (U[:, :k] * s) @ V[:, :k].T
    return W.to(dtype), float(torch.linalg.svdvals(W)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converges_on_a_near_tie_where_power_iteration_stalls(dtype):
    W, truth = _clustered(300, 200, seed=0, dtype=dtype)
    op, adjoint = linear_operator(W)
    u0 = torch.randn(1, 200, generator=torch.Generator().manual_seed(1), dtype=dtype)
    _, _, power = _power_iteration(op, adjoint, u0, 100)
    u = _krylov_top(op, adjoint, u0, 100)
    krylov = float(_top_sigma(op, u))
    assert float(power) < truth * (1 - 5e-4)  # the hard case: power iteration is still off
    assert truth * (1 - 1e-6) <= krylov <= truth * (1 + 1e-6)
    assert float(u.norm()) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("shape", [(5, 7, 7), (5, 3, 3)])
def test_one_cycle_is_never_below_as_many_power_rounds(shape):
    """k steps (k products each way) span K_{k+1}, which holds the power iterate of k rounds;
    one step is one power round. Square and wide (output side larger) operators."""
    torch.manual_seed(2)
    W = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    op, adjoint = conv_operator(W, shape, stride=1, padding=1)
    u0 = torch.randn(1, *shape, dtype=torch.float64)
    _, _, one_round = _power_iteration(op, adjoint, u0, 1)
    u1 = _krylov_top(op, adjoint, u0, 1)
    assert float(_top_sigma(op, u1)) >= float(one_round) * (1 - 1e-12)
    for n in (2, 3, 5, 8, 13, 20):
        power_u, _, _ = _power_iteration(op, adjoint, u0, n)
        power = _top_sigma(op, power_u)  # ||A u_n||, the estimate the next forward takes
        krylov = _top_sigma(op, _krylov_top(op, adjoint, u0, n))
        assert float(krylov) >= float(power) * (1 - 1e-12)


def test_leaves_an_exact_lower_singular_vector():
    """From a right singular vector that is not the top one, power iteration never moves (no
    rounding to amplify); the Krylov step meets an invariant subspace and goes on elsewhere."""
    W = torch.diag(torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))
    op, adjoint = linear_operator(W)
    u0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    _, _, power = _power_iteration(op, adjoint, u0, 50)
    assert float(power) == 1.0
    u = _krylov_top(op, adjoint, u0, 5)
    assert float(_top_sigma(op, u)) == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize(("rows", "cols"), [(5, 3), (3, 5), (1, 4)])
def test_exhausted_space_gives_the_exact_norm(rows, cols):
    """More steps than dimensions: the bidiagonalization ends, the Ritz value is the norm."""
    torch.manual_seed(3)
    W = torch.randn(rows, cols, dtype=torch.float64)
    op, adjoint = linear_operator(W)
    u = _krylov_top(op, adjoint, torch.randn(1, cols, dtype=torch.float64), 40)
    assert torch.isfinite(u).all()
    assert float(u.norm()) == pytest.approx(1.0)
    assert float(_top_sigma(op, u)) == pytest.approx(float(torch.linalg.svdvals(W)[0]), rel=1e-12)


def test_every_block_converges_on_its_own_and_dead_blocks_are_harmless():
    """Grouped conv (Note [blocks]): each group's part of u reaches that group's norm (dense SVD per
    group); a zero group gets a unit vector, a NaN group keeps its part of u."""
    torch.manual_seed(4)
    groups, shape = 4, (8, 6, 6)
    W = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    W[2:4] = 0.0  # group 1
    W[4:6] *= 1e-3  # group 2: far below the others
    op, adjoint = conv_operator(W, shape, stride=1, padding=1, groups=groups)
    u0 = torch.randn(1, *shape, dtype=torch.float64)
    u = _krylov_top(op, adjoint, u0, 60, blocks=groups)
    assert torch.isfinite(u).all()
    for g in range(groups):
        part = u[:, 2 * g : 2 * g + 2]
        assert float(part.norm()) == pytest.approx(1.0)
        Wg = W[2 * g : 2 * g + 2]

        def conv_g(x, Wg=Wg):
            return F.conv2d(x, Wg, padding=1)

        truth = float(ops.dense_operator_norm(conv_g, (2, 6, 6)))
        reached = float(torch.linalg.vector_norm(conv_g(part)))
        assert reached == pytest.approx(truth, rel=1e-9, abs=1e-300)

    W_nan = W.clone()
    W_nan[6, 0, 1, 1] = math.nan  # group 3
    op, adjoint = conv_operator(W_nan, shape, stride=1, padding=1, groups=groups)
    start, _ = ops._unit_blocks(u0, groups, 1e-12)
    u = _krylov_top(op, adjoint, u0, 30, blocks=groups)
    assert torch.equal(u[:, 6:8], start[:, 6:8])
    assert torch.isfinite(u).all()


def test_stops_early_from_a_converged_vector_and_restarts_within_the_memory_cap(monkeypatch):
    W, truth = _clustered(120, 80, seed=5)
    op, adjoint = linear_operator(W)
    calls = []

    def counted(x):
        calls.append(1)
        return op(x)

    u = _krylov_top(counted, adjoint, torch.randn(1, 80, dtype=torch.float64), 100)
    converged = len(calls)
    assert float(_top_sigma(op, u)) == pytest.approx(truth, rel=1e-9)
    calls.clear()
    _krylov_top(counted, adjoint, u, 100)  # nothing left to gain: one cycle
    assert len(calls) == ops.KRYLOV_CYCLE < converged

    monkeypatch.setattr(ops, "KRYLOV_BYTES", 1)  # the shortest cycles: four steps, restarted
    u0 = torch.randn(1, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, _, power = _power_iteration(op, adjoint, u0, 100)
    short = float(_top_sigma(op, _krylov_top(op, adjoint, u0, 100)))
    assert float(power) < truth * (1 - 2e-3) and short > truth * (1 - 1e-3)
    assert float(_top_sigma(op, _krylov_top(op, adjoint, u0, 400))) > truth * (1 - 2e-5)


def test_the_memory_cap_counts_the_output_side(monkeypatch):
    """A wide layer (100 -> 3200): its output-side basis sets the cycle, not the input's."""
    W = torch.randn(3200, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    op, adjoint = linear_operator(W)
    step_bytes = 8 * (100 + 3200)
    monkeypatch.setattr(ops, "KRYLOV_BYTES", 10 * step_bytes)
    u0 = torch.randn(1, 100, dtype=torch.float64)
    _, _, _, steps = ops._krylov_cycle(op, adjoint, u0 / u0.norm(), 50, 1, 0)
    assert steps == 10
    monkeypatch.setattr(ops, "KRYLOV_BYTES", 1)
    assert ops._krylov_cycle(op, adjoint, u0 / u0.norm(), 50, 1, 0)[3] == 4


def test_warm_up_and_operator_norm_use_it():
    W, truth = _clustered(64, 48, seed=6, dtype=torch.float32)
    layer = nn.Linear(48, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    assert ops.operator_norm(layer, None, n_iter=100) == pytest.approx(truth, rel=1e-5)
    bounded_spectral_norm(layer, beta=0.5, init_iterations=100)
    layer.eval()
    assert float(torch.linalg.matrix_norm(layer.weight.detach().double(), 2)) <= 0.5 * (1 + 1e-5)


def test_refresh_brings_a_real_backbone_within_beta():
    """timm ResNet-18 at 16 px after five SGD steps from a one-round warm-up: 100 power rounds
    left ``layer1.1.conv2`` at 1.008 beta; the Krylov refresh puts every layer within 1e-6 of
    beta. Oracle: the exact dense norm of each layer's eval-mode weight (all take the exact path
    at this size; measured with power rounds in place of the Krylov steps when written)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    apply_spectral_norm(model, beta=1.0, input_shape=(3, 16, 16), init_iterations=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(5):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    refresh_spectral_norm(model, n_iter=100)
    model.eval()
    norms = {}
    for name, (layer, norm) in normalized_layers(model).items():
        norms[name] = operator_norm_upper_bound(layer, norm.spec.input_shape)
    assert len(norms) == 21
    assert max(norms.values()) <= 1.0 + 1e-6
    assert max(norms.values()) >= 1.0 - 1e-9  # some layers are at the bound, not below it
