"""Tests of sn_lightning.lipschitz against independent oracles (Jacobians, brute force, hand math)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sn_lightning.lipschitz import (
    activation_slopes,
    certified_accuracy,
    certified_logits,
    certified_radius,
    crm_loss,
    liplt_bound,
    max_pool_overlap,
    naive_bound,
    parse_model,
)
from sn_lightning.models.normalize import InputNormalize
from sn_lightning.models.small import c4f3
from sn_lightning.spectral import apply_spectral_norm


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def _mlp() -> tuple[nn.Sequential, tuple[int, ...]]:
    return (
        nn.Sequential(
            InputNormalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]),
            nn.Flatten(),
            nn.Linear(12, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        ),
        (3, 2, 2),
    )


def _conv() -> tuple[nn.Sequential, tuple[int, ...]]:
    return (
        nn.Sequential(
            InputNormalize([0.5, 0.5], [0.5, 0.3]),
            nn.Conv2d(2, 4, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.Tanh()),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(16, 6),
            nn.ELU(),
            nn.Linear(6, 4),
        ),
        (2, 6, 6),
    )


def _sigmoid() -> tuple[nn.Sequential, tuple[int, ...]]:
    return (
        nn.Sequential(
            nn.Linear(6, 10), nn.Sigmoid(), nn.Linear(10, 10), nn.Softplus(), nn.Linear(10, 3)
        ),
        (6,),
    )


def _pooled() -> tuple[nn.Sequential, tuple[int, ...]]:
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ELU(),
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
            nn.Flatten(),
            nn.Linear(16, 3),
        ),
        (2, 8, 8),
    )


def _leaky_negative() -> tuple[nn.Sequential, tuple[int, ...]]:
    # slopes [-1.5, 1]: a = -0.25 < 0, so the recursion must use |a|
    return (
        nn.Sequential(
            nn.Linear(6, 10),
            nn.LeakyReLU(-1.5),
            nn.Linear(10, 10),
            nn.LeakyReLU(-1.5),
            nn.Linear(10, 3),
        ),
        (6,),
    )


def _maxpool() -> tuple[nn.Sequential, tuple[int, ...]]:
    # activation before a non-overlapping pool (the first segment ends with phi_trail)
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 5),
        ),
        (2, 8, 8),
    )


def _maxpool_overlap() -> tuple[nn.Sequential, tuple[int, ...]]:
    # overlapping windows (k=3, s=2, pad=1: overlap 4), LeakyReLU before, ELU later
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ELU(),
            nn.Flatten(),
            nn.Linear(64, 4),
        ),
        (2, 8, 8),
    )


def _maxpool1d() -> tuple[nn.Sequential, tuple[int, ...]]:
    return (
        nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool1d(3, stride=2, padding=1, dilation=2),
            nn.Conv1d(4, 3, 3),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Flatten(),
            nn.Linear(6, 4),
        ),
        (2, 16),
    )


def _pool_then_act() -> tuple[nn.Sequential, tuple[int, ...]]:
    # activation after the pool (the second segment starts with phi_lead), adaptive pool
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.AdaptiveMaxPool2d(3),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, 4),
        ),
        (2, 8, 8),
    )


def _two_pools() -> tuple[nn.Sequential, tuple[int, ...]]:
    return (
        nn.Sequential(
            InputNormalize([0.5, 0.5], [0.5, 0.3]),
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 8),
            nn.ReLU(),
            nn.Linear(8, 5),
        ),
        (2, 8, 8),
    )


NETS = {
    "mlp": _mlp,
    "conv": _conv,
    "sigmoid": _sigmoid,
    "pooled": _pooled,
    "leaky_negative": _leaky_negative,
    "maxpool": _maxpool,
    "maxpool_overlap": _maxpool_overlap,
    "maxpool1d": _maxpool1d,
    "pool_then_act": _pool_then_act,
    "two_pools": _two_pools,
}


def _jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(C, n_in) Jacobian of the model at one input x (shape input_shape)."""
    J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], x)
    return J.reshape(J.shape[0], -1).detach()


def _pushed(model: nn.Module, x: torch.Tensor, steps: int = 15, lr: float = 0.3) -> torch.Tensor:
    """x moved by gradient ascent on ||J(x)||_2 (plus small noise where the gradient vanishes)."""
    x = x.clone()
    for _ in range(steps):
        z = x.clone().requires_grad_(True)
        J = torch.autograd.functional.jacobian(lambda t: model(t[None])[0], z, create_graph=True)
        s = torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), ord=2)
        (g,) = torch.autograd.grad(s, z, allow_unused=True)
        g = torch.zeros_like(x) if g is None else g
        x = x + lr * g / g.norm().clamp_min(1e-12) + 0.05 * torch.randn_like(x)
    return x.detach()


def _inputs(model: nn.Module, shape: tuple[int, ...]) -> list[torch.Tensor]:
    xs = [torch.rand(shape) for _ in range(10)]  # data-like
    xs += [3 * torch.randn(shape) for _ in range(10)]  # noise
    xs += [_pushed(model, torch.rand(shape)) for _ in range(3)]
    return xs


@pytest.mark.parametrize("name", sorted(NETS))
def test_sound_against_jacobian_global_and_pairwise(name):
    model, shape = NETS[name]()
    model.eval()
    glob = float(liplt_bound(model, shape, certify=True))
    naive = naive_bound(model, shape)
    assert naive_bound(model, shape, certify=False) <= naive * (1 + 1e-6)
    L = liplt_bound(model, shape, pairwise=True, certify=True)
    C = L.shape[0]
    worst_g, worst_p = 0.0, 0.0
    for x in _inputs(model, shape):
        J = _jacobian(model, x).double()
        g = float(torch.linalg.matrix_norm(J, ord=2))
        assert g <= glob * (1 + 1e-6), (g, glob)
        worst_g = max(worst_g, g / glob)
        for p, q in itertools.combinations(range(C), 2):
            r = float((J[p] - J[q]).norm())
            assert r <= float(L[p, q]) * (1 + 1e-6), (p, q, r, float(L[p, q]))
            worst_p = max(worst_p, r / float(L[p, q]))
    # large dense products get a certified bound, up to ~1e-6 above the exact norm
    assert glob <= naive * (1 + 1e-6)
    assert 0 < worst_g <= 1
    assert 0 < worst_p <= 1


def test_linear_model_exact_with_normalize_folded():
    norm = InputNormalize([0.1, 0.2], [0.5, 0.25])
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(8, 3))
    W = model[2].weight.detach().double()
    scale = (1 / norm.std.double()).repeat_interleave(4)  # channel-major flatten of (2, 2, 2)
    exact = float(torch.linalg.matrix_norm(W * scale, ord=2))
    assert float(liplt_bound(model, (2, 2, 2), certify=True)) == pytest.approx(exact, rel=1e-8)
    assert naive_bound(model, (2, 2, 2)) >= exact
    L = liplt_bound(model, (2, 2, 2), pairwise=True, certify=True)
    ref = ((W[:, None] - W[None]) * scale).norm(dim=-1)
    torch.testing.assert_close(L, ref, rtol=1e-8, atol=1e-12)


def test_pairwise_symmetric_zero_diagonal_and_below_sqrt2_global():
    model, shape = _mlp()
    L = liplt_bound(model, shape, pairwise=True, certify=True)
    assert L.shape == (5, 5)
    torch.testing.assert_close(L, L.T)
    assert torch.all(torch.diagonal(L) == 0)
    off = L[~torch.eye(5, dtype=torch.bool)]
    assert torch.all(off > 0)
    glob = float(liplt_bound(model, shape, certify=True))
    assert float(off.max()) <= math.sqrt(2) * glob * (1 + 1e-9)


def test_liplt_strictly_tighter_than_naive_on_relu_mlp():
    model = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    lt = float(liplt_bound(model, (20,), certify=True))
    nv = naive_bound(model, (20,))
    # Independent naive: product of matrix norms (ReLU slope 1).
    ref = math.prod(
        float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)) for m in model[::2]
    )
    assert nv == pytest.approx(ref, rel=1e-9)
    assert lt < 0.9 * nv


def test_two_layer_relu_brute_force():
    torch.manual_seed(3)
    h, d, c = 8, 10, 4
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))
    W1, W2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    brute = max(
        float(torch.linalg.matrix_norm(W2 @ torch.diag(torch.tensor(D).double()) @ W1, ord=2))
        for D in itertools.product([0.0, 1.0], repeat=h)
    )
    lt = float(liplt_bound(model, (d,), certify=True))
    n2 = lambda A: float(torch.linalg.matrix_norm(A, ord=2))  # noqa: E731
    formula = 0.5 * n2(W2 @ W1) + 0.5 * n2(W2) * n2(W1)
    assert lt == pytest.approx(formula, rel=1e-6)
    assert lt >= brute * (1 - 1e-9)
    assert lt <= naive_bound(model, (d,)) * (1 + 1e-9)
    # d > h: every pattern is realizable, so brute is the true constant; Jacobians stay below it.
    for _ in range(50):
        J = _jacobian(model, 3 * torch.randn(d)).double()
        assert n2(J) <= brute * (1 + 1e-9)


def test_negative_slope_brute_force_needs_abs_a():
    # LeakyReLU(-1.5): slopes [-1.5, 1], a = -0.25. With W2 = W1^T, ||W2 W1|| = ||W2|| ||W1||, and
    # the all-negative pattern gives 1.5 ||W2 W1||; a signed a would give only 1.0 ||W2 W1||.
    torch.manual_seed(4)
    h, d = 6, 9
    model = nn.Sequential(nn.Linear(d, h), nn.LeakyReLU(-1.5), nn.Linear(h, d))
    with torch.no_grad():
        model[2].weight.copy_(model[0].weight.T)
    W1, W2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    n2 = lambda A: float(torch.linalg.matrix_norm(A, ord=2))  # noqa: E731
    brute = max(  # d > h: every pattern is realizable, so this is the true constant
        n2(W2 @ torch.diag(torch.tensor(D).double()) @ W1)
        for D in itertools.product([1.0, -1.5], repeat=h)
    )
    assert brute >= 1.5 * n2(W2 @ W1) * (1 - 1e-9)
    lt = float(liplt_bound(model, (d,), certify=True))
    assert lt == pytest.approx(0.25 * n2(W2 @ W1) + 1.25 * n2(W2) * n2(W1), rel=1e-6)
    assert lt >= brute * (1 - 1e-9)
    assert naive_bound(model, (d,)) >= brute * (1 - 1e-9)  # max(|alpha|, |beta|) = 1.5


def test_training_path_matches_certify_and_state_persists():
    model, shape = _conv()
    exact = float(liplt_bound(model, shape, certify=True))  # tiny net: all products exact
    state: dict = {}
    est = [float(liplt_bound(model, shape, n_iter=3, state=state).detach()) for _ in range(40)]
    assert set(state["u"]) == {0, 1, 2, 3}
    assert all(e <= exact * (1 + 1e-4) for e in est)
    assert est[-1] == pytest.approx(exact, rel=1e-3)
    fresh = float(liplt_bound(model, shape, n_iter=3).detach())
    assert fresh <= est[-1] + 1e-6


def test_training_path_differentiable_pairwise():
    model, shape = _mlp()
    model.train()
    L = liplt_bound(model, shape, pairwise=True, n_iter=5, state={})
    assert L.requires_grad
    L.sum().backward()
    for m in model:
        if isinstance(m, nn.Linear):
            assert m.weight.grad is not None
            assert torch.isfinite(m.weight.grad).all()
            assert m.weight.grad.abs().sum() > 0


def test_pairwise_fallback_many_classes_sound():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 105))
    L = liplt_bound(model, (4,), pairwise=True, certify=True)
    W2 = model[2].weight.detach().double()
    m0 = float(torch.linalg.matrix_norm(model[0].weight.detach().double(), ord=2))
    ref = (W2[:, None] - W2[None]).norm(dim=-1) * m0
    torch.testing.assert_close(L, ref, rtol=1e-6, atol=1e-9)
    for _ in range(5):
        J = _jacobian(model, torch.randn(4)).double()
        D = (J[:, None] - J[None]).norm(dim=-1)
        assert torch.all(D <= L * (1 + 1e-6) + 1e-12)


def test_pairwise_fallback_keeps_near_equal_rows_apart():
    """Above 101 classes ||r_p - r_q|| came from the Gram matrix, d_p + d_q - 2 G_pq, which
    cancels to 0 for rows 2^-22 apart in a row of norm ~40: a pair certified at any radius."""
    torch.manual_seed(4)
    f1, f2 = nn.Linear(16, 16), nn.Linear(16, 102)
    with torch.no_grad():
        f1.weight.copy_(torch.eye(16))
        w = torch.randn(102, 16) * 10
        w[1] = w[0]
        w[1, 3] += 2.0**-22
        f2.weight.copy_(w)
    model = nn.Sequential(f1, nn.ReLU(), f2).eval()
    L = liplt_bound(model, (16,), pairwise=True, certify=True)
    true = (w.double()[:, None] - w.double()[None]).norm(dim=-1)  # Lip of f_p - f_q (f1 = I)
    assert float(L[0, 1]) >= 2.0**-22
    assert torch.all(true * (1 - 1e-9) <= L)
    torch.testing.assert_close(L, true, rtol=1e-6, atol=1e-9)


def test_certified_dense_products_cover_cancellation():
    """(1e8 + y - 1e8) x = y x: the float64 product of the two layers cancels, and a relative
    margin on the computed norm left the certificate below |y| (9.98378e-7 for 1e-6)."""
    from fractions import Fraction

    for i in range(8):
        y = float(torch.tensor(1e-6 * (1 + i / 7), dtype=torch.float32))
        a, b = nn.Linear(1, 3, bias=False), nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            a.weight.copy_(torch.tensor([[1e8], [y], [-1e8]]))
            b.weight.fill_(1.0)
        exact = abs(sum(Fraction(float(w)) for w in a.weight[:, 0]))  # b = (1, 1, 1)
        L = float(liplt_bound(nn.Sequential(a, b).eval(), (1,), certify=True))
        assert Fraction(L) >= exact
        # the rounding term: gamma_5 || |b| |a| ||_F = 5 x 2^-53 x 2e8, about 1.1e-7
        assert float(exact) + 2e-7 > L


def test_radii_keep_a_float64_certificate_above_float32_rounding():
    """L = 1 + 2^-30 rounds to 1.0 in float32: the radius margin / L must not use the rounded L."""
    L = torch.full((2, 2), 1 + 2.0**-30, dtype=torch.float64).fill_diagonal_(0)
    logits = torch.tensor([[1.0, 0.0]])
    r = certified_radius(logits, torch.tensor([0]), L)
    assert float(r[0]) <= 1 / (1 + 2.0**-30)
    assert float(r[0]) < 1.0


def test_layers_whose_map_changes_outside_forward_are_refused():
    """``_output_padding`` (transposed convolutions) and ``_conv_forward`` overridden on the
    class or patched on an instance change the layer's map without touching forward."""

    class ExtraRow(nn.ConvTranspose2d):
        def _output_padding(self, *args: object, **kwargs: object) -> list[int]:
            return [1, 1]

    class Scaled(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return F.conv2d(x, 10 * w, b, self.stride, self.padding)

    patched = nn.Conv2d(1, 1, 3, padding=1)
    patched._conv_forward = lambda x, w, b: F.conv2d(x, 10 * w, b, padding=1)
    for layer, needle in (
        (ExtraRow(1, 1, 3, stride=2, padding=1), "ExtraRow changes its map"),
        (Scaled(1, 1, 3, padding=1), "Scaled changes its map"),
        (patched, "instance-level _conv_forward"),
    ):
        with pytest.raises(ValueError, match=needle):
            liplt_bound(nn.Sequential(layer, nn.Flatten(), nn.Linear(16, 3)), (1, 4, 4))


def _dense_matrix(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    basis = torch.eye(math.prod(shape), dtype=torch.float64).reshape(-1, *shape)
    return module(basis).reshape(basis.shape[0], -1).T


@pytest.mark.parametrize(
    ("pool", "shape", "exact"),
    [
        (nn.AvgPool2d(2), (3, 6, 6), True),  # non-overlapping: the bound is the norm, 1/2
        (nn.AdaptiveAvgPool2d(1), (2, 5, 5), True),  # global: 1/5
        (nn.AvgPool2d(3, stride=1, padding=1), (1, 5, 5), False),
        (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 7, 7), False),
        (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7), False),
        (nn.AvgPool1d(4, stride=3), (2, 11), False),
    ],
)
def test_average_pooling_bound_is_sound_against_the_dense_matrix(pool, shape, exact):
    from sn_lightning.lipschitz import _pool_upper_bound

    norm = float(torch.linalg.matrix_norm(_dense_matrix(pool, shape), ord=2))
    bound = _pool_upper_bound(pool, shape)
    assert bound >= norm * (1 - 1e-12)
    if exact:
        assert bound == pytest.approx(norm, rel=1e-8)
    else:
        assert bound <= 2.5 * norm  # Hoelder's bound is not loose by more than the overlap
    # inside a model: the whole pipeline (dense product path) agrees with the dense matrix
    model = nn.Sequential(pool, nn.Flatten())
    lin = nn.Linear(math.prod(pool(torch.zeros(1, *shape)).shape[1:]), 3)
    net = nn.Sequential(*model, lin).double()
    J = lin.weight.detach().double() @ _dense_matrix(pool, shape)
    assert float(liplt_bound(net, shape, certify=True)) == pytest.approx(
        float(torch.linalg.matrix_norm(J, ord=2)), rel=1e-6
    )


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (nn.BatchNorm2d(2), "BatchNorm2d"),
        (nn.GELU(), "GELU"),
        (nn.FractionalMaxPool2d(2, output_size=2), "FractionalMaxPool2d"),
        (nn.LPPool2d(2, 2), "LPPool2d"),
        (nn.MaxPool2d(2, return_indices=True), "MaxPool2d"),
    ],
)
def test_unsupported_modules_raise(module, name):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), module, nn.Flatten(), nn.Linear(8, 2))
    shape = (2, 4, 4)
    with pytest.raises(ValueError, match=name) as err:
        naive_bound(model, shape)
    assert "supported" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=name):
        liplt_bound(model, shape)
    with pytest.raises(ValueError, match=name):
        liplt_bound(model, shape, pairwise=True, certify=True)


def test_max_pool_chains_that_raise():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    with pytest.raises(ValueError, match="end") as err:  # nothing bounds the logits' layer
        parse_model(nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2)), (1, 4, 4))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="end"):
        parse_model(nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU()), (1, 4, 4))
    with pytest.raises(ValueError, match="Tanh"):  # two activations at one end of a segment
        parse_model(
            nn.Sequential(
                conv, nn.ReLU(), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)
            ),
            (1, 4, 4),
        )
    with pytest.raises(ValueError, match="Tanh"):
        parse_model(
            nn.Sequential(
                conv, nn.MaxPool2d(2), nn.ReLU(), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)
            ),
            (1, 4, 4),
        )

    class MyPool(nn.MaxPool2d):
        def forward(self, x):
            return 3 * super().forward(x)

    with pytest.raises(ValueError, match="MyPool overrides forward"):
        parse_model(nn.Sequential(conv, MyPool(2), nn.Flatten(), nn.Linear(8, 2)), (1, 4, 4))


def test_residual_and_bad_chains_raise():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    with pytest.raises(ValueError, match="Res"):
        parse_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Res()), (4,))
    with pytest.raises(ValueError, match="Res"):
        parse_model(Res(), (4,))
    with pytest.raises(ValueError, match="ReLU"):
        parse_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 2)), (4,))
    with pytest.raises(ValueError, match="end"):
        parse_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (4,))


def test_parse_folds_normalize_and_flatten():
    model, shape = _conv()
    parsed = parse_model(model, shape)
    assert len(parsed.segments) == 1
    assert parsed.pools == []
    net = parsed.segments[0]
    assert (net.lead, net.trail, net.offset) == (None, None, 0)
    assert len(net.stages) == 4
    assert [p.kind for p in net.stages[0].pieces] == ["scale", "layer"]
    assert [p.kind for p in net.stages[2].pieces] == ["reshape", "layer"]
    assert net.slopes == [(0.1, 1.0), (0.0, 1.0), (0.0, 1.0)]
    assert net.a == pytest.approx([0.55, 0.5, 0.5])
    assert net.b == pytest.approx([0.45, 0.5, 0.5])


def test_certified_radius_and_accuracy_by_hand():
    L = torch.full((3, 3), 2.0).fill_diagonal_(0)
    L[0, 2] = L[2, 0] = 4.0
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.5, 0.9]])
    y = torch.tensor([0, 0, 0])
    R = certified_radius(logits, y, L)
    # row 0: min((3-1)/2, (3-0)/4) = 0.75; row 1: min((0-2)/2, (0-1)/4) = -1; row 2: min(.25, .025)
    torch.testing.assert_close(R, torch.tensor([0.75, -1.0, 0.025]))
    assert certified_accuracy(logits, y, L, 0.5) == pytest.approx(1 / 3)
    assert certified_accuracy(logits, y, L, 0.01) == pytest.approx(2 / 3)
    assert certified_accuracy(logits, y, L, 1.0) == 0.0


def test_crm_loss_by_hand():
    L = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    y = torch.tensor([0, 0, 0, 1])
    lam, R0, t = 2.0, 1.0, 3.0
    ce = F.cross_entropy(logits, y)
    # row 0 correct, r = (1.0, 0.75), R = 0.75 < 1 -> penalized; row 1 wrong; row 2 R = 1.25 >= R0;
    # row 3 correct (y_hat = 1), r = (0.1/2, 0.1/1) -> penalized.
    term0 = math.log(math.exp(-t * 1.0) + math.exp(-t * 0.75)) / t
    term3 = math.log(math.exp(-t * 0.05) + math.exp(-t * 0.1)) / t
    expected = float(ce) + lam * (term0 + term3) / 4
    got = crm_loss(logits, y, L, lam, R0, t)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # nothing penalized -> plain CE
    assert float(crm_loss(logits, y, L, lam, 0.01, t)) == pytest.approx(float(ce), rel=1e-6)
    # gradients flow into L
    Lg = L.clone().requires_grad_(True)
    crm_loss(logits, y, Lg, lam, R0, t).backward()
    assert Lg.grad is not None
    assert Lg.grad.abs().sum() > 0


def test_spectral_norm_parametrized_model():
    model, shape = _mlp()
    apply_spectral_norm(model, beta=0.5, input_shape=shape, init_iterations=50)
    model.eval()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    expected = (
        1
        / 0.2
        * math.prod(
            float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)) for m in layers
        )
    )
    nv = naive_bound(model, shape)
    assert nv == pytest.approx(expected, rel=1e-6)
    assert nv <= 1 / 0.2 * 0.5**3 * 1.01  # normalized weights are read
    lt = float(liplt_bound(model, shape, certify=True))
    assert lt <= nv * (1 + 1e-9)
    for x in _inputs(model, shape)[:12]:
        J = _jacobian(model, x).double()
        assert float(torch.linalg.matrix_norm(J, ord=2)) <= lt * (1 + 1e-6)


def test_c4f3_liplt_tighter_than_naive_at_init():
    model = c4f3()
    nv = naive_bound(model, (1, 28, 28))
    lt = float(liplt_bound(model, (1, 28, 28), certify=True))
    # Measured 3.24 with the sound path (the reference reports 4.07 with power iteration).
    assert nv / lt > 1.5, (nv, lt)


# --------------------------------------------------------------------------- max pooling


def test_parse_segments_at_max_pools():
    model, shape = _two_pools()
    net = parse_model(model, shape)
    assert len(net.segments) == 3
    assert [p.overlap for p in net.pools] == [1, 1]
    first, mid, last = net.segments
    assert [p.kind for p in first.stages[0].pieces] == ["scale", "layer"]
    assert (first.lead, first.trail, first.offset, len(first.stages)) == (None, (0.0, 1.0), 0, 1)
    assert (mid.lead, mid.trail, mid.offset, len(mid.stages)) == (None, (0.0, 1.0), 1, 1)
    assert (last.lead, last.trail, last.offset, len(last.stages)) == (None, None, 2, 2)
    assert last.slopes == [(0.0, 1.0)]
    assert len(net.stages) == 4
    model, shape = _pool_then_act()
    net = parse_model(model, shape)
    assert net.segments[0].trail is None and net.segments[1].lead == (0.0, 1.0)
    assert net.pools[0].overlap == 4  # AdaptiveMaxPool2d 8 -> 3: windows [0,3), [2,6), [5,8)
    assert net.pools[0].lipschitz == 2.0
    # a pool right after a pool: an empty segment in between, factor 1
    model = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    net = parse_model(model, (1, 4, 4))
    assert [len(s.stages) for s in net.segments] == [0, 0, 1]
    assert [p.overlap for p in net.pools] == [9, 1]
    W = model[3].weight.detach().double()
    bound, exact = (
        float(liplt_bound(model, (1, 4, 4), certify=True)),
        3 * float(torch.linalg.matrix_norm(W, ord=2)),
    )
    assert exact <= bound == pytest.approx(exact, rel=2e-9)  # tight, never below


def _spatial_dims(pool: nn.Module) -> int:
    return int(type(pool).__name__[-2])


def _brute_overlap(pool: nn.Module, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Max count of windows holding one position, by enumerating every window's positions.

    The number of windows per dim comes from the module's output shape (ceil_mode); each window's
    positions from the documented rule (j*s - p + t*dil, inside the input; adaptive:
    [floor(j n / o), ceil((j + 1) n / o))). Returns the count and a position attaining it.
    """
    d = _spatial_dims(pool)
    spatial = shape[-d:]
    out = pool(torch.zeros(1, *shape)).shape[-d:]
    wins = []
    for i, (n, o) in enumerate(zip(spatial, out, strict=True)):
        if "Adaptive" in type(pool).__name__:
            wins.append([list(range(j * n // o, -(-(j + 1) * n // o))) for j in range(o)])
        else:
            k, s, p, dil = (
                v[i] if isinstance(v, tuple) else v
                for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
            )
            taps = [[j * s - p + t * dil for t in range(k)] for j in range(o)]
            wins.append([[x for x in w if 0 <= x < n] for w in taps])
    counts = torch.zeros(spatial, dtype=torch.int64)
    for window in itertools.product(*wins):
        for pos in itertools.product(*window):
            counts[pos] += 1
    flat = int(counts.argmax())
    return int(counts.max()), tuple(
        int(i) for i in torch.unravel_index(torch.tensor(flat), spatial)
    )


@pytest.mark.parametrize(
    ("pool", "shape", "expected"),
    [
        (nn.MaxPool2d(2), (3, 6, 6), 1),
        (nn.MaxPool2d(3, stride=2, padding=1), (2, 7, 7), 4),
        (nn.MaxPool2d(3, stride=1, padding=1), (1, 5, 5), 9),
        (nn.MaxPool2d(3, stride=2, ceil_mode=True), (1, 8, 8), 4),
        (nn.MaxPool2d((2, 3), stride=(2, 1), dilation=(1, 2)), (1, 6, 9), 3),
        (nn.MaxPool2d(2, stride=1, padding=1, dilation=2), (2, 6, 6), 4),
        (nn.MaxPool1d(4, stride=3), (2, 11), 2),
        (nn.MaxPool1d(3, stride=1, padding=1, dilation=2), (1, 10), 3),
        (nn.MaxPool1d(5, stride=2, padding=2, ceil_mode=True), (1, 9), 3),
        (nn.MaxPool3d(2, stride=1), (1, 4, 4, 4), 8),
        (nn.MaxPool3d((3, 1, 2), stride=(2, 1, 2), padding=(1, 0, 0)), (2, 5, 3, 6), 2),
        (nn.AdaptiveMaxPool2d(3), (1, 8, 8), 4),
        (nn.AdaptiveMaxPool2d((2, None)), (1, 5, 7), 2),
        (nn.AdaptiveMaxPool2d(1), (3, 5, 5), 1),
        (nn.AdaptiveMaxPool1d(4), (2, 10), 2),
        (nn.AdaptiveMaxPool1d(7), (1, 5), 3),
        (nn.AdaptiveMaxPool3d((2, 1, 3)), (1, 4, 5, 7), 2),
    ],
)
def test_max_pool_overlap_matches_brute_force_and_jacobian(pool, shape, expected):
    brute, witness = _brute_overlap(pool, shape)
    assert brute == expected
    assert max_pool_overlap(pool, shape) == brute
    # sqrt(overlap) is the pool's exact l2 Lipschitz constant: attained at a one-hot input on the
    # most covered position (its Jacobian has one 1 per window, c of them in that column) ...
    x = torch.zeros(shape, dtype=torch.float64)
    x[(0, *witness)] = 1.0
    J = torch.autograd.functional.jacobian(lambda z: pool(z[None])[0], x)
    J = J.reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(J, ord=2)) == pytest.approx(math.sqrt(brute), rel=1e-9)
    # ... and never exceeded
    for _ in range(5):
        J = torch.autograd.functional.jacobian(lambda z: pool(z[None])[0], torch.randn(shape))
        assert float(torch.linalg.matrix_norm(J.reshape(-1, x.numel()), ord=2)) <= math.sqrt(
            brute
        ) * (1 + 1e-6)


def test_max_pool_bound_is_tight_with_an_identity_head():
    # Lip(pool) = 3 (each pixel in 9 windows); an identity head adds nothing
    model = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Flatten(), nn.Linear(25, 25))
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(25))
        model[2].bias.zero_()
    shape = (1, 5, 5)
    lt = float(liplt_bound(model, shape, certify=True))
    assert 3.0 <= lt == pytest.approx(3.0, rel=2e-9)  # tight, never below
    assert naive_bound(model, shape) == pytest.approx(3.0, rel=1e-6)
    x = torch.zeros(shape)
    x[0, 2, 2] = 1.0
    J = _jacobian(model, x).double()
    assert float(torch.linalg.matrix_norm(J, ord=2)) == pytest.approx(3.0, rel=1e-6)
    # pairwise: (e_p - e_q) W = e_p - e_q, so L_pq = 3 sqrt(2)
    L = liplt_bound(model, shape, pairwise=True, certify=True)
    off = L[~torch.eye(25, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, 3 * math.sqrt(2)), rtol=1e-8, atol=0)


def test_leading_activation_factor_equals_an_identity_stage():
    # Note [max pooling]: a leading activation as a factor max(|alpha|, |beta|) gives the same
    # bound as LipLT with an identity stage before it.
    torch.manual_seed(5)
    head = [nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)]
    eye = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(6))
    for act in (nn.LeakyReLU(0.1), nn.LeakyReLU(-1.5), nn.ELU(2.0)):
        lead = float(liplt_bound(nn.Sequential(act, *head), (6,), certify=True))
        stage = float(liplt_bound(nn.Sequential(eye, act, *head), (6,), certify=True))
        assert lead == pytest.approx(stage, rel=1e-9)


def test_pooled_training_path_keeps_warm_vectors_per_stage():
    model, shape = _two_pools()
    exact = float(liplt_bound(model, shape, certify=True))  # tiny net: all products exact
    state: dict = {}
    est = [float(liplt_bound(model, shape, n_iter=1, state=state).detach()) for _ in range(60)]
    # one key per stage over all segments (global index), stable across calls
    assert list(state["u"]) == [0, 1, 2, 3]
    shapes = {k: tuple(u.shape) for k, u in state["u"].items()}
    assert shapes == {0: (1, 2, 8, 8), 1: (1, 4, 4, 4), 2: (2, 4, 2, 2), 3: (1, 8)}
    assert all(e <= exact * (1 + 1e-4) for e in est)
    # one iteration per call converges only because every segment's vectors persist
    assert est[-1] == pytest.approx(exact, rel=1e-3)
    L_exact = liplt_bound(model, shape, pairwise=True, certify=True)
    pstate: dict = {}
    for _ in range(40):
        L = liplt_bound(model, shape, pairwise=True, n_iter=2, state=pstate)
    assert list(pstate["u"]) == [0, 1, 2]
    torch.testing.assert_close(L.detach().double(), L_exact, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["two_pools", "maxpool1d", "pool_then_act"])
def test_crm_loss_backward_through_pooled_bound(name):
    model, shape = NETS[name]()
    model.train()
    state: dict = {}
    x = torch.rand(16, *shape)
    for _ in range(2):  # second call: warm vectors from the state
        model.zero_grad()
        L = liplt_bound(model, shape, pairwise=True, n_iter=3, state=state)
        assert L.requires_grad
        logits = model(x)
        y = logits.argmax(1).detach()  # all correct: every point enters the CRM term
        crm_loss(logits, y, L, lam=1.0, R0=1e9, t=5.0).backward()
        weights = [m.weight for m in model if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
        for w in weights:
            assert w.grad is not None
            assert torch.isfinite(w.grad).all()
            assert w.grad.abs().sum() > 0
    # the bound alone reaches the weights of every segment
    model.zero_grad()
    liplt_bound(model, shape, pairwise=True, n_iter=3, state=state).sum().backward()
    for w in weights:
        assert w.grad is not None and w.grad.abs().sum() > 0


def test_builtin_digits_cnn_with_max_pool_is_bounded_and_accepted_for_crm():
    from sn_lightning.lit import SNClassifier
    from sn_lightning.models import create_backbone

    model = create_backbone(
        "sn_lightning:digits_cnn", num_classes=10, in_chans=1, input_size=(8, 8)
    ).eval()
    shape = (1, 8, 8)
    glob = float(liplt_bound(model, shape, certify=True))
    assert glob <= naive_bound(model, shape) * (1 + 1e-9)
    L = liplt_bound(model, shape, pairwise=True, certify=True)
    for x in [torch.rand(shape) for _ in range(4)] + [_pushed(model, torch.rand(shape), steps=5)]:
        J = _jacobian(model, x).double()
        assert float(torch.linalg.matrix_norm(J, ord=2)) <= glob * (1 + 1e-6)
        D = (J[:, None] - J[None]).norm(dim=-1)
        assert torch.all(D <= L * (1 + 1e-6) + 1e-12)
    # the classifier's up-front LipLT check accepts it (it raised on MaxPool2d before)
    SNClassifier(backbone="digits_cnn", input_shape=shape, crm_lambda=1.0, certify_eps=[0.1])


class _ScaledReLU(nn.ReLU):
    """A ReLU subclass that is not a ReLU: 10 * relu(x) (its Lipschitz constant is 10, not 1)."""

    def forward(self, x):
        return 10 * super().forward(x)


class _Block(nn.Module):
    """A container (multi-line repr) that is not a supported leaf."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.b(self.a(x))


def test_subclasses_that_override_forward_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), _ScaledReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"_ScaledReLU overrides forward.*ReLU") as err:
        liplt_bound(model, (4,), certify=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="overrides forward"):
        naive_bound(model, (4,))
    # the plain subclass that keeps forward (ReLU6 is a Hardtanh) is still accepted
    ok = nn.Sequential(nn.Linear(4, 4), nn.ReLU6(), nn.Linear(4, 2))
    assert float(liplt_bound(ok, (4,), certify=True)) > 0


def test_unsupported_container_error_is_one_line():
    model = nn.Sequential(nn.Linear(4, 4), _Block(), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="unsupported module _Block") as err:
        naive_bound(model, (4,))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- activation parameters


def _act_net(act: nn.Module, width: int = 10) -> nn.Sequential:
    """Linear -> act -> Linear -> act -> Linear (the activation module is shared)."""
    return nn.Sequential(
        nn.Linear(6, width), act, nn.Linear(width, width), act, nn.Linear(width, 3)
    ).double()


def _rrelu(lower: float, upper: float, training: bool) -> nn.RReLU:
    act = nn.RReLU(lower, upper)
    act.train(training)
    return act


SLOPED = {
    "leaky_-2": (lambda: nn.LeakyReLU(-2.0), (-2.0, 1.0)),
    "leaky_3": (lambda: nn.LeakyReLU(3.0), (1.0, 3.0)),
    "leaky_0.5": (lambda: nn.LeakyReLU(0.5), (0.5, 1.0)),
    "elu_-3": (lambda: nn.ELU(alpha=-3.0), (-3.0, 1.0)),
    "elu_-0.5": (lambda: nn.ELU(alpha=-0.5), (-0.5, 1.0)),
    "elu_2": (lambda: nn.ELU(alpha=2.0), (0.0, 2.0)),
    "rrelu_-2_3_eval": (lambda: _rrelu(-2.0, 3.0, False), (-2.0, 3.0)),
    "softplus_beta_-2": (lambda: nn.Softplus(beta=-2.0), (0.0, 1.0)),
    "softplus_beta_0.3": (lambda: nn.Softplus(beta=0.3), (0.0, 1.0)),
    "hardtanh_-2_3": (lambda: nn.Hardtanh(-2.0, 3.0), (0.0, 1.0)),
    "relu6": (nn.ReLU6, (0.0, 1.0)),
}


@pytest.mark.parametrize("name", sorted(SLOPED))
def test_activation_slopes_contain_every_difference_quotient(name):
    make, expected = SLOPED[name]
    act = make()
    lo, hi = activation_slopes(act)
    assert (lo, hi) == pytest.approx(expected)
    x = 6 * torch.randn(200_000, dtype=torch.float64)
    y = torch.cat([x[:100_000] + 1e-3 * torch.randn(100_000, dtype=torch.float64), x[100_000:]])
    keep = (x - y).abs() > 1e-9
    q = ((act(x) - act(y)) / (x - y))[keep]  # the oracle: slopes of the real module
    assert float(q.min()) >= lo - 1e-6
    assert float(q.max()) <= hi + 1e-6
    if not isinstance(act, nn.RReLU):  # eval RReLU: slope (l + u) / 2; the range is training's
        assert float(q.min()) <= lo + 0.05 * (hi - lo) + 0.05  # the interval is not loose
        assert float(q.max()) >= hi - 0.05 * (hi - lo) - 0.05


@pytest.mark.parametrize(
    "make",
    [*(v[0] for v in SLOPED.values()), lambda: _rrelu(-2.0, 3.0, True)],
    ids=[*SLOPED, "rrelu_train"],
)
def test_parametrized_activations_bound_above_the_jacobian(make):
    model = _act_net(make())
    bound = float(liplt_bound(model, (6,), certify=True))
    assert naive_bound(model, (6,)) >= bound * (1 - 1e-9)
    xs = [3 * torch.randn(6, dtype=torch.float64) for _ in range(200)]
    worst = max(float(torch.linalg.matrix_norm(_jacobian(model, x), ord=2)) for x in xs)
    assert 0 < worst <= bound * (1 + 1e-9)


def test_elu_with_negative_alpha_is_bounded_by_its_largest_slope():
    # ELU(alpha=-3) between identities: the Jacobian is diag(-3 e^x) for x < 0, norm -> 3.
    model = nn.Sequential(nn.Linear(4, 4), nn.ELU(alpha=-3.0), nn.Linear(4, 4)).double()
    for lin in (model[0], model[2]):
        nn.init.eye_(lin.weight)
        nn.init.zeros_(lin.bias)
    J = _jacobian(model, torch.full((4,), -1e-6, dtype=torch.float64))
    measured = float(torch.linalg.matrix_norm(J, ord=2))
    assert measured == pytest.approx(3.0, rel=1e-5)
    assert float(liplt_bound(model, (4,), certify=True)) >= measured
    assert naive_bound(model, (4,)) >= measured


def _jump(act: nn.Module, at: float) -> float:
    """|f(at + h) - f(at - h)| for a tiny h: > 0 at a discontinuity (the refusal's witness)."""
    x = torch.tensor([at - 1e-12, at + 1e-12], dtype=torch.float64)
    y = act(x)
    return float((y[1] - y[0]).abs())


def _bad_hardtanh() -> nn.Hardtanh:
    act = nn.Hardtanh()
    act.min_val, act.max_val = 1.0, -1.0  # the constructor refuses it; attributes do not
    return act


@pytest.mark.parametrize(
    ("make", "match", "witness"),
    [
        (lambda: nn.Softplus(threshold=1.0), "not continuous", 1.0),
        (lambda: nn.Softplus(beta=2.0, threshold=-3.0), "not continuous", -1.5),
        (lambda: nn.Softplus(beta=0.0), "beta=0", None),
        (lambda: nn.LeakyReLU(float("nan")), "finite", None),
        (lambda: nn.ELU(alpha=float("inf")), "finite", None),
        (_bad_hardtanh, "min_val <= max_val", None),
        (lambda: nn.Threshold(0.5, 2.0), "unsupported module Threshold", 0.5),
        (lambda: nn.Hardshrink(0.5), "unsupported module Hardshrink", 0.5),
        (lambda: nn.CELU(alpha=-1.0), "unsupported module CELU", None),
    ],
    ids=str,
)
def test_activations_that_are_not_lipschitz_are_refused(make, match, witness):
    act = make()
    if witness is not None:  # the oracle: a jump, so no Lipschitz constant exists
        assert _jump(act, witness) > 1e-3
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 2))
    for bound in (
        lambda: liplt_bound(model, (4,), certify=True),
        lambda: liplt_bound(model, (4,), pairwise=True),
        lambda: naive_bound(model, (4,)),
    ):
        with pytest.raises(ValueError, match=match) as err:
            bound()
        assert "\n" not in str(err.value)


def test_softplus_default_threshold_is_accepted():
    act = nn.Softplus()  # beta 1, threshold 20: a jump of 2e-9 at x = 20, below float32 rounding
    assert _jump(act, 20.0) < 20.0 * 2.0**-24
    assert activation_slopes(act) == (0.0, 1.0)


# --------------------------------------------------------------------------- forward hooks


def _identity_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).double()
    for lin in (model[0], model[2]):
        nn.init.eye_(lin.weight)
    return model


def _scale_output(m, args, out):
    return out * 100


def _scale_input(m, args):
    return (args[0] * 100,)


def test_forward_hooks_that_change_values_are_refused():
    # The oracle: with the hook the model's Jacobian norm is 100; the weights alone say 1.
    model = _identity_mlp()
    handle = model[0].register_forward_hook(_scale_output)
    J = _jacobian(model, torch.rand(4, dtype=torch.float64) + 0.1)
    assert float(torch.linalg.matrix_norm(J, ord=2)) == pytest.approx(100.0)
    for bound in (
        lambda: liplt_bound(model, (4,), certify=True),
        lambda: liplt_bound(model, (4,), pairwise=True, certify=True),
        lambda: naive_bound(model, (4,)),
        lambda: parse_model(model, (4,)),
    ):
        with pytest.raises(ValueError, match=r"module '0' \(Linear\) has a forward hook") as err:
            bound()
        assert "\n" not in str(err.value)
    handle.remove()
    assert float(liplt_bound(model, (4,), certify=True)) == pytest.approx(1.0)


def test_hooks_anywhere_and_global_hooks_are_refused():
    model = _identity_mlp()
    state: dict = {}
    liplt_bound(model, (4,), state=state)  # the parse is cached in state ...
    handle = model[2].register_forward_pre_hook(_scale_input)
    with pytest.raises(ValueError, match=r"module '2' \(Linear\) has a forward pre-hook"):
        liplt_bound(model, (4,), state=state)  # ... and the hooks are checked on every call
    handle.remove()
    handle = model.register_forward_hook(_scale_output)  # on the container
    with pytest.raises(ValueError, match="module '<root>' \\(Sequential\\)"):
        liplt_bound(model, (4,), certify=True)
    handle.remove()
    model[1].forward = lambda x: 100 * torch.relu(x)  # an instance-level forward
    with pytest.raises(ValueError, match="instance-level forward"):
        liplt_bound(model, (4,), certify=True)
    del model[1].forward
    for register in (
        torch.nn.modules.module.register_module_forward_hook,
        torch.nn.modules.module.register_module_forward_pre_hook,
    ):
        handle = register(lambda *args: None)
        try:
            with pytest.raises(ValueError, match="global module forward hook"):
                liplt_bound(model, (4,), certify=True)
        finally:
            handle.remove()
    assert float(liplt_bound(model, (4,), certify=True)) == pytest.approx(1.0)


def test_layerwise_perturbation_hooks_are_allowed():
    from sn_lightning.attacks import LayerwisePerturbation

    model, shape = _mlp()
    before = float(liplt_bound(model, shape, certify=True))
    layerwise = LayerwisePerturbation(model, layers=["3"], eps=0.5)
    try:
        assert model[3]._forward_hooks  # the project's own hook is there
        assert float(liplt_bound(model, shape, certify=True)) == before
        # in training mode it adds a stored delta, input-independent: the Jacobian is unchanged
        model.train()
        x = torch.rand(2, *shape)
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        assert layerwise.deltas
        J = _jacobian(model, x[0])
        with layerwise.paused():
            J_clean = _jacobian(model, x[0])
        torch.testing.assert_close(J, J_clean)
    finally:
        layerwise.remove()


# --------------------------------------------------------------------------- linear pieces


def test_average_pool_with_a_negative_divisor_is_bounded_soundly():
    # divisor_override=-1: every entry of A is -1; max(A 1) picked the smallest |row sum|.
    pool = nn.AvgPool2d(3, stride=2, padding=1, divisor_override=-1)
    model = nn.Sequential(pool, nn.Flatten(), nn.Linear(4, 4)).double()
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(4))
    shape = (1, 4, 4)
    exact = float(torch.linalg.matrix_norm(_dense_matrix(pool, shape), ord=2))
    assert exact == pytest.approx(3.618034)  # the old bound: sqrt(max(-4...) * max(-1...)) = 2
    assert naive_bound(model, shape) >= exact * (1 - 1e-9)
    assert float(liplt_bound(model, shape, certify=True)) >= exact * (1 - 1e-9)


def test_input_normalize_with_a_loaded_negative_or_zero_std():
    norm = InputNormalize([0.0, 0.0], [0.5, 0.25])
    norm.std.copy_(torch.tensor([-0.1, 0.5]))  # a state dict can hold any value
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(8, 3))
    W = model[2].weight.detach().double()
    exact = float(torch.linalg.matrix_norm(W / norm.std.double().repeat_interleave(4), ord=2))
    assert naive_bound(model, (2, 2, 2)) >= exact * (1 - 1e-9)
    assert float(liplt_bound(model, (2, 2, 2), certify=True)) == pytest.approx(exact, rel=1e-8)
    norm.std.copy_(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="not Lipschitz"):
        naive_bound(model, (2, 2, 2))


def test_the_training_bound_ignores_autocast():
    """Under bf16 AMP the bound and its stored vectors stay float32 (bf16 products were 1.4% off)."""
    torch.manual_seed(0)
    model = c4f3(input_size=(8, 8))
    plain, amp = {}, {}
    for _ in range(2):
        want = liplt_bound(model, (1, 8, 8), pairwise=True, n_iter=3, state=plain)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = liplt_bound(model, (1, 8, 8), pairwise=True, n_iter=3, state=amp)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert all(u.dtype == torch.float32 for u in amp["u"].values())


def test_a_shared_state_never_serves_another_models_parse():
    """The parse was cached under id(model): a replaced layer (or a new model at a freed model's
    id) got the old model's bound, an unsound certificate."""
    import copy
    import pickle

    def make(scale):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
        return m

    shape, state = (1, 4, 4), {}
    for scale in (1.0, 10.0, 100.0):  # one state over models, each freed after use
        model = make(scale)
        shared = float(liplt_bound(model, shape, certify=True, state=state))
        assert shared == pytest.approx(float(liplt_bound(model, shape, certify=True)), rel=1e-6)
        del model
    model = make(1.0)
    before = float(liplt_bound(model, shape, certify=True, state=state))
    model[3] = nn.Linear(8, 3)
    with torch.no_grad():
        model[3].weight.mul_(1000)
    after = float(liplt_bound(model, shape, certify=True, state=state))
    assert after == pytest.approx(float(liplt_bound(model, shape, certify=True)), rel=1e-6)
    assert after > 10 * before
    # the same modules keep their parse; a copied or pickled state (whose parse refers to copies
    # of the modules) parses again, even for the model it was made from
    net = state["net"][1]
    liplt_bound(model, shape, certify=True, state=state)
    assert state["net"][1] is net and state["net"][0].matches(model, shape)
    for other in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert not other["net"][0].matches(model, shape)
        again = float(liplt_bound(model, shape, certify=True, state=other))
        assert again == pytest.approx(after, rel=1e-6) and other["net"][1] is not net


def test_certified_logits_run_without_autocast_or_tf32_in_the_models_dtype():
    """Certificate margins: bf16 autocast logits are off by ~1e-1, TF32 ones by ~1e-3."""
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            seen.append(
                (
                    x.dtype,
                    torch.is_autocast_enabled("cpu"),
                    torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32,
                    torch.is_grad_enabled(),
                )
            )
            return self.fc(x)

    model = Probe()
    x = torch.rand(5, 4)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = certified_logits(model, x)
        assert seen[-1] == (torch.float32, False, False, False, False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # back
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    torch.testing.assert_close(logits, model(x).detach(), rtol=0, atol=0)
    double = model.double()
    assert certified_logits(double, x).dtype == torch.float64  # 64-true: the batch is cast
    assert seen[-1][0] == torch.float64
