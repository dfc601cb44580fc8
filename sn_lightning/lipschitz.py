"""Lipschitz bounds of feed-forward nets (naive, LipLT), certified radii and the CRM loss.

Reference: Fazlyab, Entesari, Roy, Chellappa, "Certified Robustness via Dynamic Margin
Maximization and Improved Lipschitz Regularization", NeurIPS 2023 (arXiv 2310.00116; code
o4lc/CRM-LipLT). PAPERS.md section 2: 2.1 certificate, 2.2 CRM loss, 2.3 LipLT recursion.

The model is parsed into the LipLT form (:func:`parse_model`)::

    y_0 = W_0 x,   y_i = W_i phi_i(y_{i-1}) (i = 1..K),   f = y_K   (biases dropped)

where each W_i is the composition of the linear pieces between two activations (the diagonal
scaling of :class:`~sn_lightning.models.normalize.InputNormalize`, Flatten, Conv/Linear) and each
``phi_i`` is an elementwise activation with slopes in ``[alpha_i, beta_i]``. The loop
transformation ``phi_i = a_i I + b_i psi_i`` with ``a_i = (alpha_i + beta_i)/2``,
``b_i = (beta_i - alpha_i)/2`` and ``psi_i`` 1-Lipschitz gives, per layer (derived by unrolling
``y_i = a_i W_i y_{i-1} + b_i W_i psi_i(y_{i-1})``; equal to PAPERS 2.3 when all ``a_i = a``)::

    m_0 = n(0->0)
    m_i = A(1..i) n(0->i) + sum_{j=1..i} b_{i-j+1} A(i-j+2..i) n(i-j+1 -> i) m_{i-j}
    Lip(f) <= m_K,      A(s..e) = prod_{k=s..e} a_k (empty product 1),
    n(s->e) = ||W_e ... W_s||_2.

Note [which path is sound]
    Power iteration gives ``||A^T v|| <= ||A||``: a LOWER estimate of each product norm, so the
    default (training) path of :func:`liplt_bound` is differentiable but NOT a certificate.
    ``certify=True`` replaces every product norm by a guaranteed upper bound: the minimum of the
    exact norm of the dense product (float64 eigen-decomposition of its Gram matrix, used when
    the product is small, see :data:`DENSE_BUDGET`) and the product of the individual layers'
    sound upper bounds (:func:`~sn_lightning.spectral.ops.operator_norm_upper_bound`;
    ``||AB|| <= ||A|| ||B||``). The recursion is monotone in every ``n(s->e)`` (all coefficients
    are >= 0), so the result is a sound upper bound on the l2 Lipschitz constant. The pairwise
    rows ``||c^T W_K ... W_s||`` are exact in both paths (the dense rows are built by the adjoint
    chain), computed in float64 when certifying. :func:`naive_bound` with ``certify=True`` is
    sound for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sn_lightning.models.normalize import InputNormalize
from sn_lightning.spectral.ops import (
    SUPPORTED_LAYERS,
    LinearOp,
    OperatorSpec,
    operator_norm,
    operator_norm_upper_bound,
)

__all__ = [
    "DENSE_BUDGET",
    "LipLTNet",
    "Stage",
    "activation_slopes",
    "certified_accuracy",
    "certified_radius",
    "crm_loss",
    "crm_penalty",
    "liplt_bound",
    "naive_bound",
    "parse_model",
]

# The exact dense product norm is used when min(n_in, n_out) <= DENSE_MAX_DIM and the basis
# pushed through the chain has at most DENSE_BUDGET float64 entries at its widest point.
DENSE_MAX_DIM = 2048
DENSE_BUDGET = 1 << 25
# Above this many classes the pairwise bound uses ||c^T W_K|| * Lip(phi_K) * m_{K-1}.
PAIRWISE_MAX_CLASSES = 101
_IDENTITY = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
# Average pooling is linear with a nonnegative matrix A: its norm is bounded soundly by
# sqrt(||A||_1 ||A||_inf), the largest column and row sums, read off A^T 1 and A 1 (Note [pooling]).
_AVG_POOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


# --------------------------------------------------------------------------- parsing


def activation_slopes(module: nn.Module) -> tuple[float, float] | None:
    """Slope range ``[alpha, beta]`` of an elementwise activation, or None if not one.

    ReLU/ReLU6/Hardtanh [0, 1]; LeakyReLU(s) [min(s, 1), max(s, 1)]; ELU(alpha) [0, max(1, alpha)];
    Tanh [0, 1]; Sigmoid [0, 1/4]; Softplus [0, 1].
    """
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Softplus)):
        return 0.0, 1.0
    if isinstance(module, nn.LeakyReLU):
        s = float(module.negative_slope)
        return min(s, 1.0), max(s, 1.0)
    if isinstance(module, nn.ELU):
        if module.alpha < 0:
            return None
        return 0.0, max(1.0, float(module.alpha))
    if isinstance(module, nn.Sigmoid):
        return 0.0, 0.25
    return None


_SUPPORTED_TEXT = (
    "nn.Sequential (nested ones are flattened) of InputNormalize, "
    + ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
    + ", AvgPool1d/2d/3d, AdaptiveAvgPool1d/2d/3d, Flatten, Dropout/Identity (identity in eval), "
    "and elementwise activations ReLU, ReLU6, Hardtanh, LeakyReLU, ELU, Tanh, Sigmoid, Softplus "
    "between linear layers"
)


@dataclass
class _Piece:
    """One linear piece of a stage: 'scale', 'reshape', 'pool' (average pooling) or 'layer'."""

    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    module: nn.Module | None = None
    spec: OperatorSpec | None = None


@dataclass
class Stage:
    """A linear map W_i of the LipLT form: the composition of its pieces, bias dropped.

    Attributes:
        pieces: the linear pieces, applied in order.
        in_shape: one input's shape (no batch dim).
        out_shape: one output's shape (no batch dim).
    """

    pieces: list[_Piece]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class LipLTNet:
    """A model in the LipLT form: stages W_0..W_K and the slopes of phi_1..phi_K.

    Attributes:
        stages: ``K + 1`` linear stages.
        slopes: ``K`` slope ranges ``(alpha_i, beta_i)``; ``slopes[i - 1]`` is phi_i, applied
            between stage ``i - 1`` and stage ``i``.
    """

    stages: list[Stage]
    slopes: list[tuple[float, float]] = field(default_factory=list)

    @property
    def a(self) -> list[float]:
        """``a_i = (alpha_i + beta_i) / 2`` per activation."""
        return [(lo + hi) / 2 for lo, hi in self.slopes]

    @property
    def b(self) -> list[float]:
        """``b_i = (beta_i - alpha_i) / 2`` per activation."""
        return [(hi - lo) / 2 for lo, hi in self.slopes]


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if type(module) is nn.Sequential:
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def _unsupported(m: nn.Module) -> ValueError:
    return ValueError(
        f"unsupported module {type(m).__name__} for a Lipschitz bound ({m!r}); supported: "
        f"{_SUPPORTED_TEXT}. Residual blocks, normalization, max pooling (not elementwise, "
        "use average pooling) and attention are not bounded."
    )


def parse_model(model: nn.Module, input_shape: Sequence[int]) -> LipLTNet:
    """Parse a feed-forward ``nn.Sequential`` into the LipLT form.

    One eval-mode, no-grad forward of ``zeros(1, *input_shape)`` records each module's input
    shape (modes are restored).

    Args:
        model: ``nn.Sequential`` (nested Sequentials flattened) of supported modules.
        input_shape: one input's shape, no batch dim (e.g. ``(1, 28, 28)``).

    Returns:
        The :class:`LipLTNet` (module references, shapes and slopes; weights are read later).

    Raises:
        ValueError: a module that is not supported, two activations without a linear layer
            between them, or a model ending in an activation.
    """
    if not isinstance(model, nn.Sequential):
        raise _unsupported(model)
    leaves = list(_leaves(model))
    for m in leaves:
        ok = isinstance(m, (InputNormalize, nn.Flatten, *_AVG_POOLS, *SUPPORTED_LAYERS, *_IDENTITY))
        if not ok and activation_slopes(m) is None:
            raise _unsupported(m)
        base = next((t for t in SUPPORTED_LAYERS if isinstance(m, t)), None)
        if base is not None and type(m).forward is not base.forward:
            raise ValueError(
                f"{type(m).__name__} overrides forward; its operator is not the plain layer's"
            )
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    shapes: list[tuple[int, ...]] = []
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(
            1,
            *input_shape,
            dtype=p.dtype if p is not None else torch.float32,
            device=p.device if p is not None else None,
        )
        with torch.no_grad():
            for m in leaves:
                shapes.append(tuple(x.shape[1:]))
                x = m(x)
        shapes.append(tuple(x.shape[1:]))
    finally:
        for m, mode in modes:
            m.training = mode
    stages: list[Stage] = []
    slopes: list[tuple[float, float]] = []
    pieces: list[_Piece] = []
    in_shape = shapes[0]
    for i, m in enumerate(leaves):
        s_in, s_out = shapes[i], shapes[i + 1]
        if isinstance(m, _IDENTITY):
            continue
        slope = activation_slopes(m)
        if slope is not None:
            if not pieces:
                raise ValueError(
                    f"activation {type(m).__name__} at position {i} is not preceded by a linear "
                    "layer; LipLT needs linear -> activation -> linear ... -> linear"
                )
            stages.append(Stage(pieces, in_shape, s_in))
            slopes.append(slope)
            pieces, in_shape = [], s_out
        elif isinstance(m, InputNormalize):
            pieces.append(_Piece("scale", s_in, s_out, m))
        elif isinstance(m, nn.Flatten):
            pieces.append(_Piece("reshape", s_in, s_out, m))
        elif isinstance(m, _AVG_POOLS):
            pieces.append(_Piece("pool", s_in, s_out, m))
        else:
            pieces.append(_Piece("layer", s_in, s_out, m, OperatorSpec.from_layer(m, s_in)))
    if not pieces:
        raise ValueError("the model must end with a linear layer (logits), not an activation")
    stages.append(Stage(pieces, in_shape, shapes[-1]))
    return LipLTNet(stages, slopes)


# --------------------------------------------------------------------------- operators


def _weight(m: nn.Module, *, grad: bool) -> Tensor:
    """``m.weight`` as the forward pass sees it (parametrizations applied).

    With ``grad=False`` it is read in eval mode without gradients (no parametrization state is
    updated); with ``grad=True`` it is read as is (a parametrized layer in training mode runs its
    own update, as in a forward pass).
    """
    if grad:
        return m.weight
    modes = [(x, x.training) for x in m.modules()]
    m.eval()
    try:
        with torch.no_grad():
            return m.weight.detach()
    finally:
        for x, mode in modes:
            x.training = mode


def _piece_ops(p: _Piece, *, grad: bool, dtype: torch.dtype | None) -> tuple[LinearOp, LinearOp]:
    if p.kind == "reshape":
        i, o = p.in_shape, p.out_shape
        return (lambda x: x.reshape(x.shape[0], *o)), (lambda y: y.reshape(y.shape[0], *i))
    if p.kind == "scale":
        assert isinstance(p.module, InputNormalize)
        inv = 1.0 / p.module.std
        if dtype is not None:
            inv = inv.to(dtype)
        inv = inv.view(-1, *([1] * (len(p.in_shape) - 1)))

        def scale(x: Tensor) -> Tensor:
            return x * inv.to(x.dtype)

        return scale, scale
    if p.kind == "pool":
        assert p.module is not None
        return _pool_ops(p.module, p.in_shape)
    assert p.module is not None
    assert p.spec is not None
    W = _weight(p.module, grad=grad)
    if dtype is not None:
        W = W.to(dtype)
    elif W.dtype in (torch.float16, torch.bfloat16):
        W = W.float()
    return p.spec.operator(W)


def _pool_ops(pool: nn.Module, in_shape: tuple[int, ...]) -> tuple[LinearOp, LinearOp]:
    """Average pooling and its exact adjoint (the vector-Jacobian product of the linear map)."""

    def adjoint(y: Tensor) -> Tensor:
        with torch.enable_grad():
            x = torch.zeros(
                y.shape[0], *in_shape, dtype=y.dtype, device=y.device, requires_grad=True
            )
            (g,) = torch.autograd.grad(pool(x), x, y, create_graph=y.requires_grad)
        return g

    return pool, adjoint


def _pool_upper_bound(pool: nn.Module, in_shape: tuple[int, ...]) -> float:
    """Note [pooling]: ``||A||_2 <= sqrt(||A||_1 ||A||_inf)`` for average pooling A >= 0.

    The largest row sum is ``max(A 1)`` and the largest column sum ``max(A^T 1)``, both exact
    for a nonnegative matrix (float64, times 1 + 1e-9 for rounding). Equal to the norm for
    non-overlapping windows (k = s: ``1 / sqrt(k^d)``) and global pooling (``1 / sqrt(HW)``).
    """
    op, adjoint = _pool_ops(pool, in_shape)
    with torch.no_grad():
        row_sums = op(torch.ones(1, *in_shape, dtype=torch.float64))
    col_sums = adjoint(torch.ones_like(row_sums))
    return math.sqrt(float(row_sums.max()) * float(col_sums.max())) * (1 + 1e-9)


def _piece_upper_bound(p: _Piece) -> float:
    """A sound upper bound on one piece's operator norm."""
    if p.kind == "reshape":
        return 1.0
    if p.kind == "pool":
        assert p.module is not None
        return _pool_upper_bound(p.module, p.in_shape)
    if p.kind == "scale":
        assert isinstance(p.module, InputNormalize)
        return p.module.lipschitz()
    assert p.module is not None
    return operator_norm_upper_bound(p.module, p.in_shape)


def _stage_ops(stage: Stage, *, grad: bool, dtype: torch.dtype | None) -> tuple[LinearOp, LinearOp]:
    ops = [_piece_ops(p, grad=grad, dtype=dtype) for p in stage.pieces]

    def op(x: Tensor) -> Tensor:
        for f, _ in ops:
            x = f(x)
        return x

    def adjoint(y: Tensor) -> Tensor:
        for _, g in reversed(ops):
            y = g(y)
        return y

    return op, adjoint


def _ref_tensor(net: LipLTNet) -> Tensor:
    for st in net.stages:
        for p in st.pieces:
            if p.module is not None:
                for t in (*p.module.parameters(), *p.module.buffers()):
                    return t
    return torch.zeros(())


# --------------------------------------------------------------------------- naive bound


def naive_bound(
    model: nn.Module, input_shape: Sequence[int], *, certify: bool = True, n_iter: int = 100
) -> float:
    """Naive bound: product of the layers' operator norms times the activations' maximal slopes.

    Args:
        model: see :func:`parse_model`.
        input_shape: one input's shape, no batch dim.
        certify: True (default): each layer's guaranteed upper bound
            (:func:`~sn_lightning.spectral.ops.operator_norm_upper_bound`; InputNormalize
            contributes ``1 / min(std)``): a sound bound. False: power-iteration estimates
            (``n_iter`` rounds), a lower estimate of this product, not sound.
        n_iter: power-iteration rounds when ``certify=False``.

    Returns:
        The bound on the l2 Lipschitz constant of ``model``.
    """
    net = parse_model(model, input_shape)
    total = 1.0
    for st in net.stages:
        for p in st.pieces:
            if certify or p.kind != "layer":
                total *= _piece_upper_bound(p)
            else:
                assert p.module is not None
                total *= operator_norm(p.module, p.in_shape, n_iter=n_iter)
    for _, hi in net.slopes:
        total *= max(abs(hi), 0.0)
    return total


# --------------------------------------------------------------------------- product norms


def _power_products(
    net: LipLTNet,
    ops: list[tuple[LinearOp, LinearOp]],
    last: int,
    n_iter: int,
    state: dict[str, Any],
    ref: Tensor,
) -> dict[tuple[int, int], Tensor]:
    """Power-iteration estimates of n(s->e) for 0 <= s <= e <= last, batched per start s.

    For a start s, the vectors u_{s,e} (e = s..last) are one batch: forward through W_s, W_{s+1},
    ... peeling off row e after W_e; backward through the adjoints, prepending the normalized
    row of each end. Vectors persist in ``state["u"]`` (detached between calls).
    """
    store: dict[int, Tensor] = state.setdefault("u", {})
    norm = torch.linalg.vector_norm
    out: dict[tuple[int, int], Tensor] = {}
    for s in range(last + 1):
        n_e = last - s + 1
        shape = (n_e, *net.stages[s].in_shape)
        U = store.get(s)
        if U is None or tuple(U.shape) != shape or U.device != ref.device:
            gen = torch.Generator(device=ref.device).manual_seed(1000 + s)
            U = torch.randn(shape, generator=gen, device=ref.device, dtype=torch.float32)
        U = U.to(ref.dtype if ref.dtype.is_floating_point else torch.float32)

        def rownorm(t: Tensor) -> Tensor:
            return norm(t.reshape(t.shape[0], -1), dim=1).clamp_min(1e-12)

        def bshape(t: Tensor, like: Tensor) -> Tensor:
            return t.view(-1, *([1] * (like.dim() - 1)))

        U = U / bshape(rownorm(U), U)
        sigma = U.new_ones(n_e)
        for _ in range(n_iter):
            h = U
            vs: list[Tensor] = []
            for k in range(s, last + 1):
                h = ops[k][0](h)
                row = h[:1]
                vs.append(row / rownorm(row).view(-1, *([1] * (row.dim() - 1))))
                h = h[1:]
            g = vs[-1]
            for k in range(last, s - 1, -1):
                g = ops[k][1](g)
                if k > s:
                    g = torch.cat([vs[k - 1 - s], g])
            sigma = rownorm(g)
            U = g / bshape(sigma, g)
        store[s] = U.detach()
        for e in range(s, last + 1):
            out[(s, e)] = sigma[e - s]
    return out


def _dense_norm(
    ops: list[tuple[LinearOp, LinearOp]], net: LipLTNet, s: int, e: int
) -> float | None:
    """Exact ||W_e ... W_s|| (float64 ops) from the dense product, or None if too large."""
    n_in = math.prod(net.stages[s].in_shape)
    n_out = math.prod(net.stages[e].out_shape)
    widths = [math.prod(net.stages[k].out_shape) for k in range(s, e + 1)]
    widths += [math.prod(p.out_shape) for k in range(s, e + 1) for p in net.stages[k].pieces]
    n = min(n_in, n_out)
    if n > DENSE_MAX_DIM or n * max([n_in, *widths]) > DENSE_BUDGET:
        return None
    basis = torch.eye(n, dtype=torch.float64, device=_ref_tensor(net).device)
    with torch.no_grad():
        if n_in <= n_out:
            h = basis.reshape(n, *net.stages[s].in_shape)
            for k in range(s, e + 1):
                h = ops[k][0](h)
        else:
            h = basis.reshape(n, *net.stages[e].out_shape)
            for k in range(e, s - 1, -1):
                h = ops[k][1](h)
        J = h.reshape(n, -1)
        G = J @ J.T
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            lam = torch.linalg.eigvalsh(G)[-1].clamp_min(0)
        finally:
            torch.set_num_threads(threads)
    # Rounding margin: relative error of the float64 eigenvalue is ~1e-13.
    return float(lam.sqrt()) * (1 + 1e-9)


def _sound_products(
    net: LipLTNet, ops: list[tuple[LinearOp, LinearOp]], last: int
) -> dict[tuple[int, int], Tensor]:
    """Guaranteed upper bounds of n(s->e): min(exact dense norm, product of layer bounds).

    ``ops`` are the stages' float64 operators with weights read in eval mode.
    """
    ub = [math.prod(_piece_upper_bound(p) for p in st.pieces) for st in net.stages[: last + 1]]
    out: dict[tuple[int, int], Tensor] = {}
    for s in range(last + 1):
        for e in range(s, last + 1):
            bound = math.prod(ub[s : e + 1])
            dense = _dense_norm(ops, net, s, e)
            if dense is not None:
                bound = min(bound, dense)
            out[(s, e)] = torch.tensor(bound, dtype=torch.float64)
    return out


# --------------------------------------------------------------------------- LipLT


def _recursion(net: LipLTNet, n: dict[tuple[int, int], Tensor], last: int) -> list[Tensor]:
    """m_0..m_last of the LipLT recursion (module docstring), per-layer a_i, b_i."""
    a, b = net.a, net.b

    def A(lo: int, hi: int) -> float:  # prod_{k=lo..hi} a_k, activation k is slopes[k - 1]
        return math.prod(a[k - 1] for k in range(lo, hi + 1))

    m = [n[(0, 0)]]
    for i in range(1, last + 1):
        val = A(1, i) * n[(0, i)]
        for j in range(1, i + 1):
            val = val + b[i - j] * A(i - j + 2, i) * n[(i - j + 1, i)] * m[i - j]
        m.append(val)
    return m


def _pair_rows(num_classes: int, ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    p, q = torch.triu_indices(num_classes, num_classes, 1, device=ref.device)
    c = torch.zeros(p.numel(), num_classes, dtype=ref.dtype, device=ref.device)
    idx = torch.arange(p.numel(), device=ref.device)
    c[idx, p] = 1.0
    c[idx, q] = -1.0
    return p, q, c


def liplt_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    pairwise: bool = False,
    n_iter: int = 10,
    state: dict[str, Any] | None = None,
    certify: bool = False,
) -> Tensor:
    """LipLT bound on the l2 Lipschitz constant (PAPERS 2.3), globally or per pair of logits.

    Args:
        model: see :func:`parse_model`; its output has shape ``(N, C)`` when ``pairwise``.
        input_shape: one input's shape, no batch dim.
        pairwise: False: a scalar bound on Lip(f). True: a ``(C, C)`` matrix ``L`` with
            ``L[p, q] >= Lip(f_p - f_q)``, symmetric, zero diagonal. For ``C <= 101`` the rows
            ``||(e_p - e_q)^T W_K ... W_s||`` are exact (adjoint chain on the C(C-1)/2 rows):
            ``L_pq = A(1..K) ||c W_K..W_0|| + sum_j b_{K-j+1} A(K-j+2..K) ||c W_K..W_{K-j+1}|| m_{K-j}``;
            above, ``||c W_K|| * beta_K * m_{K-1}``.
        n_iter: power-iteration rounds per call (training path; reference: 10 MNIST, 5 CIFAR).
        state: a dict holding the persistent power-iteration vectors (mutated in place; pass the
            same dict every step). None: fresh vectors each call.
        certify: False: training path, differentiable in the weights through the unrolled
            iterations, a lower estimate (NOT sound). True: guaranteed upper bound (Note [which
            path is sound]), float64, no gradient.

    Returns:
        A 0-dim tensor, or ``(C, C)`` when ``pairwise``.
    """
    state = {} if state is None else state
    key = (id(model), tuple(int(i) for i in input_shape))
    cached = state.get("net")
    if cached is not None and cached[0] == key:
        net = cached[1]
    else:
        net = parse_model(model, input_shape)
        state["net"] = (key, net)
        state.pop("u", None)
    K = len(net.stages) - 1
    ref = _ref_tensor(net)
    last = K - 1 if pairwise else K
    # Weights are read once per call (a parametrized layer in training mode updates once).
    ops = [
        _stage_ops(st, grad=not certify, dtype=torch.float64 if certify else None)
        for st in net.stages
    ]
    if certify:
        n = _sound_products(net, ops, last) if last >= 0 else {}
    else:
        n = _power_products(net, ops, last, n_iter, state, ref) if last >= 0 else {}
    m = _recursion(net, n, last) if last >= 0 else []
    if not pairwise:
        return m[K]
    out_shape = net.stages[K].out_shape
    if len(out_shape) != 1:
        raise ValueError(f"pairwise bounds need logits of shape (N, C), got (N, *{out_shape})")
    C = out_shape[0]
    dt = torch.float64 if certify else (ref.dtype if ref.dtype.is_floating_point else torch.float32)
    p, q, c = _pair_rows(C, ref.to(dt))
    a, b = net.a, net.b

    def A(lo: int, hi: int) -> float:
        return math.prod(a[k - 1] for k in range(lo, hi + 1))

    ctx = torch.no_grad() if certify else torch.enable_grad()
    with ctx:
        if C > PAIRWISE_MAX_CLASSES and K >= 1:
            rows = ops[K][1](torch.eye(C, dtype=dt, device=ref.device)).reshape(C, -1)
            G = rows @ rows.T
            d = torch.diagonal(G)
            D = (d[:, None] + d[None, :] - 2 * G).clamp_min(0).sqrt()
            L = D * net.slopes[K - 1][1] * m[K - 1]
            L = L * (1 - torch.eye(C, dtype=L.dtype, device=L.device))
            return L.to(torch.float64) * (1 + 1e-9) if certify else L
        g = c
        row_norms: dict[int, Tensor] = {}
        for s in range(K, -1, -1):
            g = ops[s][1](g)
            row_norms[s] = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
        vals = A(1, K) * row_norms[0]
        for j in range(1, K + 1):
            vals = vals + b[K - j] * A(K - j + 2, K) * row_norms[K - j + 1] * m[K - j]
        if certify:
            vals = vals * (1 + 1e-9)
        L = vals.new_zeros(C, C)
        return L.index_put((p, q), vals).index_put((q, p), vals)


# --------------------------------------------------------------------------- certificates, CRM


def _radii(logits: Tensor, y: Tensor, L_pairwise: Tensor) -> Tensor:
    """r_ij = (f_i,y_i - f_ij) / L[y_i, j], +inf at j = y_i; shape (N, C)."""
    fy = logits.gather(1, y[:, None])
    Ly = L_pairwise.to(logits.dtype)[y].clamp_min(torch.finfo(logits.dtype).tiny)
    r = (fy - logits) / Ly
    return r.scatter(1, y[:, None], math.inf)


def certified_radius(logits: Tensor, y: Tensor, L_pairwise: Tensor) -> Tensor:
    """Certified l2 radius ``min_{j != y} (f_y - f_j) / L_yj`` (PAPERS 2.1).

    Args:
        logits: ``(N, C)``.
        y: ``(N,)`` int labels.
        L_pairwise: ``(C, C)`` with ``L[p, q] >= Lip(f_p - f_q)`` (e.g. a sound
            :func:`liplt_bound` with ``pairwise=True, certify=True``).

    Returns:
        ``(N,)``; <= 0 where the point is misclassified (or tied).
    """
    return _radii(logits, y, L_pairwise).amin(dim=1)


def certified_accuracy(logits: Tensor, y: Tensor, L_pairwise: Tensor, eps: float) -> float:
    """Fraction of points correctly classified with certified radius > eps (pairwise rule).

    Args:
        logits: ``(N, C)``.
        y: ``(N,)`` int labels.
        L_pairwise: ``(C, C)``, see :func:`certified_radius`.
        eps: l2 radius (in the model's input units).
    """
    ok = (logits.argmax(dim=1) == y) & (certified_radius(logits, y, L_pairwise) > eps)
    return float(ok.float().mean()) if ok.numel() else 0.0


def crm_penalty(logits: Tensor, y: Tensor, L_pairwise: Tensor, R0: float, t: float) -> Tensor:
    """The robust term of the CRM loss (PAPERS 2.2), without the weight lambda.

    ``(1/B) * sum_{i: y_hat_i = y_i, R_i < R0} (1/t) log sum_{j != y_i} exp(-t r_ij)`` with
    ``y_hat = argmax f``, ``r_ij = (f_i,y_hat - f_ij) / L[y_hat, j]`` and ``R_i = min_j r_ij``
    (the mask is not differentiated; the terms are, in the logits and in ``L_pairwise``).
    ``(1/t) logsumexp(-t r)`` upper-bounds ``-min_j r_j`` within ``log(C - 1) / t``.

    Args:
        logits: ``(B, C)``.
        y: ``(B,)`` int labels.
        L_pairwise: ``(C, C)`` pairwise Lipschitz bounds (training path: with gradients).
        R0: only points with radius below R0 are penalized.
        t: temperature of the soft-min.

    Returns:
        A 0-dim tensor (0 when no point qualifies).
    """
    B = logits.shape[0]
    y_hat = logits.argmax(dim=1)
    r = _radii(logits, y_hat, L_pairwise)  # (B, C), +inf at y_hat
    R = r.amin(dim=1)
    mask = (y_hat == y) & (R.detach() < R0)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    soft = torch.logsumexp(-t * r[mask], dim=1) / t  # exp(-inf) = 0 drops j = y_hat
    return soft.sum() / B


def crm_loss(
    logits: Tensor, y: Tensor, L_pairwise: Tensor, lam: float, R0: float, t: float
) -> Tensor:
    """Certified-radius-maximization loss, softmax variant: ``CE + lam * crm_penalty`` (PAPERS 2.2).

    Args:
        logits: ``(B, C)``.
        y: ``(B,)`` int labels.
        L_pairwise: ``(C, C)`` pairwise Lipschitz bounds (training path: with gradients).
        lam: weight lambda of the robust term.
        R0: only points with radius below R0 are penalized.
        t: temperature of the soft-min.

    Returns:
        A 0-dim tensor.
    """
    return F.cross_entropy(logits, y) + lam * crm_penalty(logits, y, L_pairwise, R0, t)
