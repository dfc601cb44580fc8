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
    Lip(f) <= m_K,      A(s..e) = prod_{k=s..e} |a_k| (empty product 1),
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

Note [max pooling]
    Max pooling is neither linear nor elementwise, so it is not a LipLT piece: the model is cut
    at every ``MaxPool*``/``AdaptiveMaxPool*`` into segments ``g_0, P_1, g_1, ..., P_M, g_M``
    (:func:`parse_model`), and ``Lip(f) <= Lip(g_M) L(P_M) ... L(P_1) Lip(g_0)`` (Lipschitz
    constants of a composition multiply).

    Pool: ``|max_{w} x - max_{w} x'| <= max_{i in w} |x_i - x'_i|``, so
    ``||P x - P x'||^2 <= sum_windows sum_{i in w} (x_i - x'_i)^2 <= c ||x - x'||^2`` with ``c``
    the largest number of windows that contain one input position (:func:`max_pool_overlap`,
    counted exactly on the real input shape, dilation and ceil_mode included; padding is -inf,
    constant and never above a window's real entries, so padded cells count for nothing).
    ``L(P) = sqrt(c)``, rounded up; it is attained (one large input entry), and 1 for
    non-overlapping windows.

    Segment: ``[phi_lead] W_0 phi_1 W_1 ... W_K [phi_trail]``. The chain ``W_0 .. W_K`` is a
    LipLT net (its own recursion, ``m_K``; 1 when it has no linear layer). An activation right
    after a pool (or at the model's start) is ``phi_lead``, one right before a pool is
    ``phi_trail``; each is elementwise with slopes in ``[alpha, beta]``, hence
    ``max(|alpha|, |beta|)``-Lipschitz in l2, and multiplies the segment bound:
    ``Lip(g) <= Lip(phi_trail) m_K Lip(phi_lead)``. This loses nothing against the recursion:
    LipLT with an identity stage prepended for ``phi_lead`` gives exactly ``(|a| + b) m_K``, and
    ``|a| + b = max(|alpha|, |beta|)``; a trailing activation has no next linear layer to share
    a product norm with. What is lost is only the product norms across a pool.

    Pairwise: ``f_p - f_q = c^T g_M(P_M(h))`` with ``h`` everything before the last pool, so
    ``L_pq = (pairwise LipLT of the last chain) * Lip(phi_lead of g_M) * Lip(h)``, the last
    factor being the product of the earlier segments' global bounds and the pools' constants.
    The certified path stays sound: every factor is a guaranteed upper bound. The training path
    stays differentiable (pool constants are constants); the power-iteration vectors of all
    segments live in one flat ``state["u"]`` keyed by the stage's global index (segment offset
    plus index inside the segment), unique and stable across calls.
"""

from __future__ import annotations

import itertools
import math
import types
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from sn_lightning.attacks.layerwise import LayerwisePerturbation
from sn_lightning.models.normalize import InputNormalize
from sn_lightning.modes import eval_mode
from sn_lightning.spectral.fused import fused_forward
from sn_lightning.spectral.grouped import is_group_hook
from sn_lightning.spectral.ops import (
    _MAP_METHODS,
    SUPPORTED_LAYERS,
    LinearOp,
    OperatorSpec,
    _norm_upper_bound,
    forward_kind,
    operator_norm,
    operator_norm_upper_bound,
)
from sn_lightning.spectral.parametrization import _sync_running_var, _tf32_off

__all__ = [
    "DENSE_BUDGET",
    "LipLTNet",
    "MaxPoolCut",
    "SegmentedNet",
    "Stage",
    "activation_slopes",
    "certified_accuracy",
    "certified_logits",
    "certified_radius",
    "crm_loss",
    "crm_penalty",
    "liplt_bound",
    "max_pool_lipschitz",
    "max_pool_overlap",
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


# Note [activation parameters]
#   LipLT needs each activation's slope range: ``alpha <= (phi(x) - phi(y)) / (x - y) <= beta``
#   for all x != y, which holds with [alpha, beta] the range of phi' for a continuous,
#   piecewise-differentiable phi. The range depends on the parameters, with any sign:
#     LeakyReLU(s), RReLU(lower, upper): slopes 1 and s (RReLU: any slope in [lower, upper] in
#       training, (lower + upper) / 2 in eval), so [min(s, 1), max(s, 1)] (s over the range).
#     ELU(alpha): 1 for x > 0, alpha e^x for x <= 0, in (0, alpha] or [alpha, 0):
#       [min(0, alpha), max(1, alpha)]; continuous for every alpha.
#     CELU(alpha): e^(x / alpha) for x <= 0: in (0, 1] for alpha > 0; unbounded for alpha < 0
#       (x -> -inf): not Lipschitz; alpha = 0 raises in torch.
#     Softplus(beta, threshold): sigmoid(beta x) in (0, 1) for every beta != 0, but torch returns
#       x itself where beta x > threshold: a jump of log1p(exp(-threshold)) / |beta| at the switch,
#       so the module is not continuous. Accepted only when the jump is below float32's rounding
#       of the value there (|threshold / beta| 2^-24; relative jump log1p(e^-t) / t <= 2^-24,
#       true for t >= 16, the default 20 included), i.e. smaller than the error any float32
#       forward already makes at that point; refused otherwise (e.g. threshold=1, beta=0).
#     Hardtanh(min_val, max_val) (ReLU6 too): slopes 0 and 1; torch refuses min_val > max_val.
#     Threshold, Hardshrink: discontinuous, not Lipschitz: refused.
#   NaN or infinite parameters are refused (``max(1.0, nan)`` is 1.0 in Python).


def _finite(name: str, **params: float) -> None:
    for key, value in params.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}({key}={value}) has no finite Lipschitz constant")


def _leaky_relu_slopes(negative_slope: float) -> tuple[float, float]:
    """``[min(s, 1), max(s, 1)]`` for LeakyReLU(s), any sign (Note [activation parameters])."""
    s = float(negative_slope)
    _finite("LeakyReLU", negative_slope=s)
    return min(s, 1.0), max(s, 1.0)


def _rrelu_slopes(lower: float, upper: float) -> tuple[float, float]:
    """``[min(lower, upper, 1), max(lower, upper, 1)]``: every RReLU slope, training and eval."""
    lo, hi = float(lower), float(upper)
    _finite("RReLU", lower=lo, upper=hi)
    return min(lo, hi, 1.0), max(lo, hi, 1.0)


def _elu_slopes(alpha: float) -> tuple[float, float]:
    """``[min(0, alpha), max(1, alpha)]`` for ELU(alpha), any sign (Note [activation parameters])."""
    a = float(alpha)
    _finite("ELU", alpha=a)
    return min(0.0, a), max(1.0, a)


def _celu_slopes(alpha: float) -> tuple[float, float]:
    """``[0, 1]`` for CELU(alpha > 0); raises for alpha <= 0 (slope e^(x/alpha) is unbounded)."""
    a = float(alpha)
    _finite("CELU", alpha=a)
    if not a > 0:
        raise ValueError(
            f"CELU(alpha={a}) is not Lipschitz: its slope exp(x / alpha) is unbounded for alpha < 0 "
            "(alpha = 0 divides by zero)"
        )
    return 0.0, 1.0


def _softplus_slopes(beta: float, threshold: float) -> tuple[float, float]:
    """``[0, 1]`` for Softplus(beta != 0) whose identity switch is continuous to float32 rounding.

    Raises:
        ValueError: beta = 0 or not finite, or a threshold whose jump
            ``log1p(exp(-threshold)) / |beta|`` exceeds ``2^-24 |threshold / beta|`` (Note
            [activation parameters]).
    """
    b, t = float(beta), float(threshold)
    _finite("Softplus", beta=b)
    if b == 0.0:
        raise ValueError("Softplus(beta=0) divides by zero")
    jump = max(-t, 0.0) + math.log1p(math.exp(-abs(t)))  # log1p(exp(-t)), no overflow
    if not (t > 0 and jump <= t * 2.0**-24):
        raise ValueError(
            f"Softplus(beta={b}, threshold={t}) is not continuous: torch returns x where "
            f"beta * x > threshold, a jump of {jump / abs(b):.3g} there (a threshold >= 16, "
            "like the default 20, is continuous to float32 rounding)"
        )
    return 0.0, 1.0


def _hardtanh_slopes(min_val: float, max_val: float) -> tuple[float, float]:
    """``[0, 1]`` for Hardtanh(min_val <= max_val) and ReLU6; raises otherwise."""
    lo, hi = float(min_val), float(max_val)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"Hardtanh(min_val={lo}, max_val={hi}) needs min_val <= max_val")
    return 0.0, 1.0


def activation_slopes(module: nn.Module) -> tuple[float, float] | None:
    """Slope range ``[alpha, beta]`` of an elementwise activation, or None if not one.

    ReLU [0, 1]; ReLU6/Hardtanh [0, 1]; LeakyReLU(s) [min(s, 1), max(s, 1)]; RReLU(l, u)
    [min(l, u, 1), max(l, u, 1)]; ELU(alpha) [min(0, alpha), max(1, alpha)]; Tanh [0, 1];
    Sigmoid [0, 1/4]; Softplus [0, 1] (Note [activation parameters]).

    Raises:
        ValueError: a supported activation whose parameters make it not Lipschitz (or not
            continuous), or non-finite parameters.
    """
    if isinstance(module, nn.ReLU):
        return 0.0, 1.0
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return _hardtanh_slopes(module.min_val, module.max_val)
    if isinstance(module, nn.Tanh):
        return 0.0, 1.0
    if isinstance(module, nn.Softplus):
        return _softplus_slopes(module.beta, module.threshold)
    if isinstance(module, nn.LeakyReLU):
        return _leaky_relu_slopes(module.negative_slope)
    if isinstance(module, nn.RReLU):
        return _rrelu_slopes(module.lower, module.upper)
    if isinstance(module, nn.ELU):
        return _elu_slopes(module.alpha)
    if isinstance(module, nn.Sigmoid):
        return 0.0, 0.25
    return None


_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softplus,
    nn.LeakyReLU,
    nn.RReLU,
    nn.ELU,
    nn.Sigmoid,
)
_SUPPORTED_TEXT = (
    "nn.Sequential (nested ones are flattened) of InputNormalize, "
    + ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
    + ", AvgPool1d/2d/3d, AdaptiveAvgPool1d/2d/3d, MaxPool1d/2d/3d, AdaptiveMaxPool1d/2d/3d, "
    "Flatten, Dropout/Identity (identity in eval), and elementwise activations ReLU, ReLU6, "
    "Hardtanh, LeakyReLU, RReLU, ELU, Tanh, Sigmoid, Softplus (between linear layers, or next "
    "to a max pool), without forward hooks"
)


def _slope_lipschitz(slope: tuple[float, float] | None) -> float:
    """``max(|alpha|, |beta|)``: the l2 Lipschitz constant of an elementwise activation (1: none)."""
    return 1.0 if slope is None else max(abs(slope[0]), abs(slope[1]))


def _normalize_lipschitz(m: InputNormalize) -> float:
    """``1 / min |std|``, in float64: InputNormalize's l2 constant for a std of any sign.

    ``InputNormalize.lipschitz`` assumes the constructor's ``std > 0``; a loaded state dict can
    hold any value.

    Raises:
        ValueError: a zero or non-finite std.
    """
    std = m.std.detach().double().abs()
    low = float(std.min()) if std.numel() else 1.0
    if not (low > 0 and math.isfinite(float(std.max()))):
        raise ValueError(f"InputNormalize with std {m.std.tolist()} is not Lipschitz")
    return 1.0 / low


# Note [forward hooks]
#   A forward hook or pre-hook can replace a module's input or output, and an instance-level
#   ``forward`` attribute replaces its class's; none of them is seen by the rules (LipLT reads
#   the weights, torch.fx traces the classes' code and runs no hooks), so a model with one, or
#   with a global module forward hook (``register_module_forward_hook`` / ``_pre_hook``), is
#   refused. Two hooks of this project are allowed because they change no value's Lipschitz
#   constant: the BatchNorm pre-hook ``_sync_running_var`` (shares running_var with its bound,
#   returns None), :class:`~sn_lightning.attacks.LayerwisePerturbation`'s forward hook
#   (in training mode it adds a stored, detached delta that does not depend on the current input,
#   a constant shift; in eval mode it returns None) and the spectral norms' grouped CUDA path
#   (``spectral/grouped.py``: each layer gets the weight its parametrization would compute).


def _is_layerwise_hook(hook: Any) -> bool:
    """True for the forward hook of LayerwisePerturbation (matched by its code object)."""
    code = getattr(hook, "__code__", None)
    consts = LayerwisePerturbation._make_forward_hook.__code__.co_consts
    return any(c is code for c in consts if isinstance(c, types.CodeType))


def _is_own_pre_hook(hook: Any) -> bool:
    return hook is _sync_running_var or is_group_hook(hook)


def _is_own_hook(hook: Any) -> bool:
    return _is_layerwise_hook(hook) or is_group_hook(hook)


def _forward_hook_problem(model: nn.Module) -> str | None:
    """Why ``model``'s forward may differ from its modules' plain forwards, or None.

    Note [forward hooks]: any forward hook or pre-hook (global or on a submodule) other than the
    project's own, or an instance-level ``forward``, makes the Lipschitz rules unsound.
    """
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return (
            "a global module forward hook is registered (register_module_forward_hook / "
            "register_module_forward_pre_hook); it can change any module's output"
        )
    for name, m in model.named_modules():
        where = f"module {name or '<root>'!r} ({type(m).__name__})"
        patched = next((k for k in _MAP_METHODS if k in vars(m)), None)
        if patched is not None:
            return f"{where} has an instance-level {patched}, not its class's"
        for kind, hooks, allowed in (
            ("forward pre-hook", m._forward_pre_hooks, _is_own_pre_hook),
            ("forward hook", m._forward_hooks, _is_own_hook),
        ):
            for hook in hooks.values():
                if not allowed(hook):
                    label = getattr(hook, "__qualname__", type(hook).__name__)
                    return f"{where} has a {kind} ({label}) that can change its input or output"
    return None


def _check_forward_hooks(model: nn.Module) -> None:
    problem = _forward_hook_problem(model)
    if problem is not None:
        raise ValueError(f"no Lipschitz bound: {problem} (the bound reads weights, runs no hooks)")


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
    """One pool-free segment in the LipLT form: stages W_0..W_K, the slopes of phi_1..phi_K.

    Note [max pooling]: ``lead`` and ``trail`` are activations at the segment's ends (after the
    previous max pool / model start, before the next max pool); each multiplies the chain's bound
    by ``max(|alpha|, |beta|)``. A segment may have no stage (a pool right after a pool, or an
    activation between two pools); its chain is the identity.

    Attributes:
        stages: ``K + 1`` linear stages (possibly none).
        slopes: ``K`` slope ranges ``(alpha_i, beta_i)``; ``slopes[i - 1]`` is phi_i, applied
            between stage ``i - 1`` and stage ``i``.
        lead: slope range of an activation before stage 0, or None.
        trail: slope range of an activation after the last stage, or None.
        offset: the global index of ``stages[0]`` over all segments (keys of the persistent
            power-iteration vectors).
    """

    stages: list[Stage]
    slopes: list[tuple[float, float]] = field(default_factory=list)
    lead: tuple[float, float] | None = None
    trail: tuple[float, float] | None = None
    offset: int = 0

    @property
    def a(self) -> list[float]:
        """``a_i = (alpha_i + beta_i) / 2`` per activation."""
        return [(lo + hi) / 2 for lo, hi in self.slopes]

    @property
    def b(self) -> list[float]:
        """``b_i = (beta_i - alpha_i) / 2`` per activation."""
        return [(hi - lo) / 2 for lo, hi in self.slopes]

    @property
    def factor(self) -> float:
        """``Lip(phi_lead) * Lip(phi_trail)`` (1 for an absent one)."""
        return _slope_lipschitz(self.lead) * _slope_lipschitz(self.trail)


@dataclass
class MaxPoolCut:
    """A max pool between two segments (Note [max pooling]).

    Attributes:
        module: the ``MaxPool*`` / ``AdaptiveMaxPool*`` module.
        in_shape: one input's shape (no batch dim).
        out_shape: one output's shape (no batch dim).
        overlap: the largest number of windows that contain one input position.
    """

    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    overlap: int

    @property
    def lipschitz(self) -> float:
        """``sqrt(overlap)`` rounded up to the next float unless exact (a sound l2 constant)."""
        return _sqrt_up(self.overlap)


@dataclass
class SegmentedNet:
    """A model cut at its max pools: ``segments[0], pools[0], segments[1], ..., segments[-1]``.

    Attributes:
        segments: ``M + 1`` pool-free :class:`LipLTNet` segments; the last ends with a linear
            layer (the logits).
        pools: the ``M`` max pools, ``pools[i]`` between ``segments[i]`` and ``segments[i + 1]``.
    """

    segments: list[LipLTNet]
    pools: list[MaxPoolCut] = field(default_factory=list)

    @property
    def stages(self) -> list[Stage]:
        """All linear stages in order (the global index is :attr:`LipLTNet.offset` + local)."""
        return [st for seg in self.segments for st in seg.stages]


_MAX_POOLS = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
_ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


# Every class parse_model accepts, for the "overrides forward" check.
_KNOWN = frozenset(
    (
        *SUPPORTED_LAYERS,
        *_MAX_POOLS,
        *_AVG_POOLS,
        *_IDENTITY,
        *_ACTIVATIONS,
        InputNormalize,
        nn.Flatten,
    )
)


def _ntuple(v: Any, d: int) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def _sqrt_up(n: int) -> float:
    """``sqrt(n)`` rounded up to the next float unless exact: never below the true root."""
    r = math.sqrt(n)
    return r if math.isqrt(n) ** 2 == n else math.nextafter(r, math.inf)


def max_pool_lipschitz(pool: nn.Module, in_shape: Sequence[int]) -> float:
    """Sound l2 Lipschitz constant of a max pool on inputs of ``in_shape``: ``sqrt(overlap)``."""
    return _sqrt_up(max_pool_overlap(pool, in_shape))


def max_pool_overlap(pool: nn.Module, in_shape: Sequence[int]) -> int:
    """The largest number of pooling windows of a max pool that contain one input position.

    A window is the Cartesian product of per-dimension windows (torch computes kernel, stride,
    padding, dilation, ceil_mode and the adaptive start/end rule per dimension), so the count
    at a position is the product of its per-dimension counts, and the maximum is the product of
    the per-dimension maxima. Each per-dimension count is read off the real 1d pooling function
    applied to the ``n`` one-hot vectors of that dimension's length ``n``: output ``j`` is 1
    exactly when window ``j`` holds the position (the other entries are 0, padding is -inf).
    ``sqrt`` of the result is the pool's l2 Lipschitz constant (Note [max pooling]).

    Args:
        pool: a ``MaxPool1d/2d/3d`` or ``AdaptiveMaxPool1d/2d/3d``.
        in_shape: one input's shape, no batch dim; the last 1/2/3 entries are spatial.

    Returns:
        The count (1 for non-overlapping windows, e.g. ``kernel_size == stride``).
    """
    d = next((v for t, v in _MAX_POOLS.items() if isinstance(pool, t)), None)
    if d is None:
        raise _unsupported(pool)
    if len(in_shape) < d:
        raise ValueError(f"{type(pool).__name__} needs {d} spatial dims, got input {in_shape}")
    spatial = [int(n) for n in in_shape[len(in_shape) - d :]]
    total = 1
    for i, n in enumerate(spatial):
        eye = torch.eye(n, dtype=torch.float32)[:, None, :]  # (n positions, 1 channel, n)
        with torch.no_grad():
            if isinstance(pool, _ADAPTIVE_MAX_POOLS):
                o = _ntuple(pool.output_size, d)[i]
                y = F.adaptive_max_pool1d(eye, n if o is None else int(o))
            else:
                y = F.max_pool1d(
                    eye,
                    _ntuple(pool.kernel_size, d)[i],
                    _ntuple(pool.stride, d)[i],
                    _ntuple(pool.padding, d)[i],
                    _ntuple(pool.dilation, d)[i],
                    ceil_mode=bool(pool.ceil_mode),
                )
        total *= int((y > 0.5).sum(dim=(1, 2)).max())
    return total


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if type(module) is nn.Sequential:
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def _unsupported(m: nn.Module) -> ValueError:
    return ValueError(
        f"unsupported module {type(m).__name__} for a Lipschitz bound "
        f"({repr(m).splitlines()[0]}); supported: "
        f"{_SUPPORTED_TEXT}. Residual blocks, normalization, other pooling (fractional, LP, "
        "with return_indices) and attention are not bounded."
    )


def parse_model(model: nn.Module, input_shape: Sequence[int]) -> SegmentedNet:
    """Parse a feed-forward ``nn.Sequential`` into LipLT segments cut at the max pools.

    One eval-mode, no-grad forward of ``zeros(1, *input_shape)`` records each module's input
    shape (modes are restored). Each segment (Note [max pooling]) is
    ``[phi_lead] W_0 phi_1 ... W_K [phi_trail]``: linear pieces (InputNormalize's scaling,
    Flatten, average pooling, Conv/Linear) are composed into stages, an activation between two
    stages is a LipLT activation, one at a segment's start or end is its ``lead``/``trail``.

    Args:
        model: ``nn.Sequential`` (nested Sequentials flattened) of supported modules.
        input_shape: one input's shape, no batch dim (e.g. ``(1, 28, 28)``).

    Returns:
        The :class:`SegmentedNet` (module references, shapes, slopes and pool overlaps; weights
        are read later). A model without max pools is one segment.

    Raises:
        ValueError: a module that is not supported (or an activation with parameters that make
            it not Lipschitz, Note [activation parameters]), a forward hook (Note [forward
            hooks]), two activations without a linear layer between them, or a model not ending
            in a linear layer.
    """
    if not isinstance(model, nn.Sequential):
        raise _unsupported(model)
    _check_forward_hooks(model)
    leaves = list(_leaves(model))
    for m in leaves:
        ok = isinstance(
            m, (InputNormalize, nn.Flatten, *_AVG_POOLS, *_MAX_POOLS, *SUPPORTED_LAYERS, *_IDENTITY)
        )
        if (not ok and activation_slopes(m) is None) or getattr(m, "return_indices", False):
            raise _unsupported(m)
        # A subclass that overrides forward is not the function its base class is bounded as
        # (e.g. a ReLU subclass returning 10 * relu(x)).
        base = next((t for t in type(m).__mro__ if t in _KNOWN), None)
        if base is not None and type(m).forward not in (base.forward, fused_forward):
            raise ValueError(
                f"{type(m).__name__} overrides forward; its operator is not the plain "
                f"{base.__name__}'s"
            )
        if isinstance(m, SUPPORTED_LAYERS) and forward_kind(m) != "base":
            raise ValueError(
                f"{type(m).__name__} changes its map ({'/'.join(_MAP_METHODS)}); its operator is "
                "not the plain layer's"
            )
    shapes: list[tuple[int, ...]] = []
    with eval_mode(model):
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
    segments: list[LipLTNet] = []
    pools: list[MaxPoolCut] = []
    stages: list[Stage] = []
    slopes: list[tuple[float, float]] = []
    pieces: list[_Piece] = []
    lead: tuple[float, float] | None = None
    pending: tuple[float, float] | None = None  # activation after a stage, no piece since
    offset = 0

    def close_stage() -> None:
        nonlocal pieces
        stages.append(Stage(pieces, pieces[0].in_shape, pieces[-1].out_shape))
        pieces = []

    for i, m in enumerate(leaves):
        s_in, s_out = shapes[i], shapes[i + 1]
        if isinstance(m, _IDENTITY):
            continue
        slope = activation_slopes(m)
        if slope is not None:
            if pieces:
                close_stage()
                pending = slope
            elif pending is None and lead is None and not stages:
                lead = slope  # right after a max pool or at the model's start
            else:
                raise ValueError(
                    f"activation {type(m).__name__} at position {i} follows another activation "
                    "without a linear layer between them"
                )
            continue
        if isinstance(m, tuple(_MAX_POOLS)):
            if pieces:
                close_stage()
            segments.append(LipLTNet(stages, slopes, lead, pending, offset))
            pools.append(MaxPoolCut(m, s_in, s_out, max_pool_overlap(m, s_in)))
            offset += len(stages)
            stages, slopes, lead, pending = [], [], None, None
            continue
        if pending is not None:
            slopes.append(pending)
            pending = None
        if isinstance(m, InputNormalize):
            pieces.append(_Piece("scale", s_in, s_out, m))
        elif isinstance(m, nn.Flatten):
            pieces.append(_Piece("reshape", s_in, s_out, m))
        elif isinstance(m, _AVG_POOLS):
            pieces.append(_Piece("pool", s_in, s_out, m))
        else:
            pieces.append(_Piece("layer", s_in, s_out, m, OperatorSpec.from_layer(m, s_in)))
    if not pieces:
        raise ValueError(
            "the model must end with a linear layer (logits), not an activation or a max pool"
        )
    close_stage()
    segments.append(LipLTNet(stages, slopes, lead, None, offset))
    return SegmentedNet(segments, pools)


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


def _piece_ops(
    p: _Piece, *, grad: bool, dtype: torch.dtype | None, absolute: bool = False
) -> tuple[LinearOp, LinearOp]:
    """The piece's map and adjoint.

    ``absolute``: maps whose matrices are entrywise >= ``|A|`` on nonnegative inputs (the
    rounding term of :func:`_dense_norm`).
    """
    if p.kind == "reshape":
        i, o = p.in_shape, p.out_shape
        return (lambda x: x.reshape(x.shape[0], *o)), (lambda y: y.reshape(y.shape[0], *i))
    if p.kind == "scale":
        assert isinstance(p.module, InputNormalize)
        # the reciprocal in the target dtype: a float32 1/std is off by up to 6e-8 relative
        inv = 1.0 / (p.module.std if dtype is None else p.module.std.to(dtype))
        inv = inv.view(-1, *([1] * (len(p.in_shape) - 1)))
        if absolute:
            inv = inv.abs()

        def scale(x: Tensor) -> Tensor:
            return x * inv.to(x.dtype)

        return scale, scale
    if p.kind == "pool":
        assert p.module is not None
        op, adjoint = _pool_ops(p.module, p.in_shape)
        if absolute:  # one sign throughout (Note [pooling]): |A| x = |A x| for x >= 0
            return (lambda x: op(x).abs()), (lambda y: adjoint(y).abs())
        return op, adjoint
    assert p.module is not None
    assert p.spec is not None
    W = _weight(p.module, grad=grad)
    if dtype is not None:
        W = W.to(dtype)
    elif W.dtype in (torch.float16, torch.bfloat16):
        W = W.float()
    # each entry of a convolution's matrix is one tap, or a sum of taps (wrapped or reflected
    # padding), so the |W| operator's entries are >= |A|'s
    return p.spec.operator(W.abs() if absolute else W)


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
    """Note [pooling]: ``||A||_2 <= sqrt(||A||_1 ||A||_inf)`` for average pooling A.

    Every entry of A is ``1 / divisor`` or 0, one sign throughout (a ``divisor_override`` may be
    negative), so the largest absolute row sum is ``max |A 1|`` and the largest absolute column
    sum ``max |A^T 1|`` (float64, times 1 + 1e-9 for rounding). Equal to the norm for
    non-overlapping windows (k = s: ``1 / sqrt(k^d)``) and global pooling (``1 / sqrt(HW)``).
    """
    op, adjoint = _pool_ops(pool, in_shape)
    with torch.no_grad():
        row_sums = op(torch.ones(1, *in_shape, dtype=torch.float64))
    col_sums = adjoint(torch.ones_like(row_sums))
    return math.sqrt(float(row_sums.abs().max()) * float(col_sums.abs().max())) * (1 + 1e-9)


def _piece_upper_bound(p: _Piece) -> float:
    """A sound upper bound on one piece's operator norm."""
    if p.kind == "reshape":
        return 1.0
    if p.kind == "pool":
        assert p.module is not None
        return _pool_upper_bound(p.module, p.in_shape)
    if p.kind == "scale":
        assert isinstance(p.module, InputNormalize)
        return _normalize_lipschitz(p.module)
    assert p.module is not None
    return operator_norm_upper_bound(p.module, p.in_shape)


def _stage_ops(
    stage: Stage, *, grad: bool, dtype: torch.dtype | None, absolute: bool = False
) -> tuple[LinearOp, LinearOp]:
    ops = [_piece_ops(p, grad=grad, dtype=dtype, absolute=absolute) for p in stage.pieces]

    def op(x: Tensor) -> Tensor:
        for f, _ in ops:
            x = f(x)
        return x

    def adjoint(y: Tensor) -> Tensor:
        for _, g in reversed(ops):
            y = g(y)
        return y

    return op, adjoint


def _ref_tensor(net: SegmentedNet) -> Tensor:
    """The first parameter or buffer of the model's linear pieces (device and dtype), or a 0."""
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
    """Naive bound: product of the layers' norms, activations' and max pools' constants.

    Activations contribute ``max(|alpha|, |beta|)``, max pools ``sqrt(overlap)`` (Note [max
    pooling]).

    Args:
        model: see :func:`parse_model`.
        input_shape: one input's shape, no batch dim.
        certify: True (default): each layer's guaranteed upper bound
            (:func:`~sn_lightning.spectral.ops.operator_norm_upper_bound`; InputNormalize
            contributes ``1 / min(std)``): a sound bound. False: the layers' estimates
            (:func:`~sn_lightning.spectral.ops.operator_norm`, ``n_iter`` Krylov steps), a lower
            estimate of this product, not sound.
        n_iter: Krylov steps per layer when ``certify=False``.

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
    for seg in net.segments:
        for slope in seg.slopes:
            total *= _slope_lipschitz(slope)
        total *= seg.factor
    for pool in net.pools:
        total *= pool.lipschitz
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
    """Power-iteration estimates of n(s->e) for 0 <= s <= e <= last of one segment, batched per s.

    For a start s, the vectors u_{s,e} (e = s..last) are one batch: forward through W_s, W_{s+1},
    ... peeling off row e after W_e; backward through the adjoints, prepending the normalized
    row of each end. Vectors persist in ``state["u"]`` (detached between calls) under the global
    stage index ``net.offset + s``, so the segments of a model cut at max pools never collide.
    """
    store: dict[int, Tensor] = state.setdefault("u", {})
    norm = torch.linalg.vector_norm
    out: dict[tuple[int, int], Tensor] = {}
    for s in range(last + 1):
        n_e = last - s + 1
        shape = (n_e, *net.stages[s].in_shape)
        key = net.offset + s
        U = store.get(key)
        if U is None or tuple(U.shape) != shape:
            gen = torch.Generator(device=ref.device).manual_seed(1000 + key)
            U = torch.randn(shape, generator=gen, device=ref.device, dtype=torch.float32)
        # (a checkpoint's vectors may arrive on the CPU)
        U = U.to(ref.device, ref.dtype if ref.dtype.is_floating_point else torch.float32)

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
        store[key] = U.detach()
        for e in range(s, last + 1):
            out[(s, e)] = sigma[e - s]
    return out


def _dense_norm(
    ops: list[tuple[LinearOp, LinearOp]],
    absolute: list[tuple[LinearOp, LinearOp]],
    net: LipLTNet,
    s: int,
    e: int,
    device: torch.device,
) -> float | None:
    """||W_e ... W_s|| from the dense product (float64; `_norm_upper_bound`), or None if too large.

    ``absolute``: the stages' ``|A|`` maps (``_stage_ops(absolute=True)``), for the rounding term.
    """
    n_in = math.prod(net.stages[s].in_shape)
    n_out = math.prod(net.stages[e].out_shape)
    widths = [math.prod(net.stages[k].out_shape) for k in range(s, e + 1)]
    widths += [math.prod(p.out_shape) for k in range(s, e + 1) for p in net.stages[k].pieces]
    n = min(n_in, n_out)
    if n > DENSE_MAX_DIM or n * max([n_in, *widths]) > DENSE_BUDGET:
        return None

    def product(stage_ops: list[tuple[LinearOp, LinearOp]]) -> Tensor:
        basis = torch.eye(n, dtype=torch.float64, device=device)
        if n_in <= n_out:
            h = basis.reshape(n, *net.stages[s].in_shape)
            for k in range(s, e + 1):
                h = stage_ops[k][0](h)
        else:
            h = basis.reshape(n, *net.stages[e].out_shape)
            for k in range(e, s - 1, -1):
                h = stage_ops[k][1](h)
        return h.reshape(n, -1)

    with torch.no_grad():
        norm = _norm_upper_bound(product(ops))  # covers its own rounding
        # Forming the product: |fl(H) - H| <= gamma_N |A_e| ... |A_s| entrywise (N the summed
        # inner dimensions, at most the widths), so ||error||_2 <= gamma_N || |A_e| ... |A_s| ||_F:
        # a relative margin misses cancellation (1e8 + y - 1e8).
        inner = n_in + sum(widths)
        u = torch.finfo(torch.float64).eps / 2
        gamma = inner * u / (1 - inner * u)
        rounding = gamma * float(torch.linalg.matrix_norm(product(absolute)))
    return (norm + rounding) * (1 + 1e-9)


def _sound_products(
    net: LipLTNet, ops: list[tuple[LinearOp, LinearOp]], last: int, device: torch.device
) -> dict[tuple[int, int], Tensor]:
    """Guaranteed upper bounds of n(s->e): min(exact dense norm, product of layer bounds).

    ``ops`` are the stages' float64 operators with weights read in eval mode.
    """
    ub = [math.prod(_piece_upper_bound(p) for p in st.pieces) for st in net.stages[: last + 1]]
    absolute = [
        _stage_ops(st, grad=False, dtype=torch.float64, absolute=True)
        for st in net.stages[: last + 1]
    ]
    out: dict[tuple[int, int], Tensor] = {}
    for s in range(last + 1):
        for e in range(s, last + 1):
            bound = math.prod(ub[s : e + 1])
            dense = _dense_norm(ops, absolute, net, s, e, device)
            if dense is not None:
                bound = min(bound, dense)
            out[(s, e)] = torch.tensor(bound, dtype=torch.float64)
    return out


# --------------------------------------------------------------------------- LipLT


def _abs_a(net: LipLTNet) -> list[float]:
    """``|a_i|``: ``a_i W y`` has norm ``|a_i| ||W y||`` (a_i < 0 for LeakyReLU(s < -1))."""
    return [abs(x) for x in net.a]


def _recursion(net: LipLTNet, n: dict[tuple[int, int], Tensor], last: int) -> list[Tensor]:
    """m_0..m_last of the LipLT recursion (module docstring), per-layer |a_i|, b_i."""
    a, b = _abs_a(net), net.b

    def A(lo: int, hi: int) -> float:  # prod_{k=lo..hi} |a_k|, activation k is slopes[k - 1]
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


def _chain_m(
    seg: LipLTNet,
    ops: list[tuple[LinearOp, LinearOp]],
    last: int,
    *,
    certify: bool,
    n_iter: int,
    state: dict[str, Any],
    ref: Tensor,
) -> list[Tensor]:
    """m_0..m_last of one segment's chain (sound upper bounds or power-iteration estimates)."""
    if last < 0:
        return []
    if certify:
        n = _sound_products(seg, ops, last, ref.device)
    else:
        n = _power_products(seg, ops, last, n_iter, state, ref)
    return _recursion(seg, n, last)


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

    A model with max pools is cut into segments (Note [max pooling]): the bound is the product
    of the segments' LipLT bounds (each times ``max(|alpha|, |beta|)`` of an activation at its
    start or end) and the pools' ``sqrt(overlap)``; pairwise, only the last segment's chain is
    pairwise and the rest enters as that product.

    Args:
        model: see :func:`parse_model`; its output has shape ``(N, C)`` when ``pairwise``.
        input_shape: one input's shape, no batch dim.
        pairwise: False: a scalar bound on Lip(f). True: a ``(C, C)`` matrix ``L`` with
            ``L[p, q] >= Lip(f_p - f_q)``, symmetric, zero diagonal. For ``C <= 101`` the rows
            ``||(e_p - e_q)^T W_K ... W_s||`` of the last chain are exact (adjoint chain on the
            C(C-1)/2 rows):
            ``L_pq = A(1..K) ||c W_K..W_0|| + sum_j b_{K-j+1} A(K-j+2..K) ||c W_K..W_{K-j+1}|| m_{K-j}``;
            above, ``||c W_K|| * Lip(phi_K) * m_{K-1}``; both times the factor of everything
            before the last chain (1 without max pools and a leading activation).
        n_iter: power-iteration rounds per call (training path; reference: 10 MNIST, 5 CIFAR).
        state: a dict holding the persistent power-iteration vectors (mutated in place; pass the
            same dict every step): ``state["u"]`` maps a stage's global index to its batch of
            vectors. None: fresh vectors each call.
        certify: False: training path, differentiable in the weights through the unrolled
            iterations, a lower estimate (NOT sound). True: guaranteed upper bound (Note [which
            path is sound]), float64, no gradient.

    Returns:
        A 0-dim tensor, or ``(C, C)`` when ``pairwise``.

    Raises:
        ValueError: see :func:`parse_model` (unsupported modules, forward hooks).
    """
    # Under AMP the products run in the weights' dtype, not bf16/fp16 (as SN's power iteration,
    # Note [float32 under autocast] in spectral/parametrization.py): bf16 was 1.4% off.
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(())).device
    with torch.autocast(device.type, enabled=False):
        return _liplt_bound(model, input_shape, pairwise, n_iter, state, certify)


def load_liplt_vectors(
    state: dict[str, Any],
    model: nn.Module,
    input_shape: Sequence[int],
    vectors: dict[int, Tensor],
) -> None:
    """Give ``state`` (as passed to :func:`liplt_bound`) saved power-iteration vectors of ``model``.

    ``vectors``: a former ``state["u"]`` (e.g. from a checkpoint); the next call continues from
    them, as it would have in the run that saved them.
    """
    state["net"] = (_NetKey(model, input_shape), parse_model(model, input_shape))
    state["u"] = {int(k): v.detach().clone() for k, v in vectors.items()}


class _NetKey:
    """What a cached parse of a model depends on: the very module objects and their classes.

    Held through weak references, so another model that gets a freed model's ``id`` (or a
    Sequential with a layer replaced, a parametrization added) never matches a stale parse.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.modules = [(weakref.ref(m), type(m)) for m in model.modules()]
        self.shape = tuple(int(i) for i in input_shape)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled or copied: a key that matches nothing, so the copy parses again.

        (A deep copy of the parse refers to copies of the modules, not to the model's own.)
        """
        return {"modules": None, "shape": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> _NetKey:
        """A key that matches nothing (see ``__getstate__``)."""
        key = _NetKey.__new__(_NetKey)
        key.__dict__.update(self.__getstate__())
        return key

    def matches(self, model: nn.Module, input_shape: Sequence[int]) -> bool:
        """Whether ``model`` is the same modules (same classes) at the same input shape."""
        modules = list(model.modules())
        return (
            self.modules is not None
            and self.shape == tuple(int(i) for i in input_shape)
            and len(modules) == len(self.modules)
            and all(
                r() is m and t is type(m) for (r, t), m in zip(self.modules, modules, strict=True)
            )
        )


def _liplt_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    pairwise: bool,
    n_iter: int,
    state: dict[str, Any] | None,
    certify: bool,
) -> Tensor:
    state = {} if state is None else state
    _check_forward_hooks(model)  # every call: hooks can be added after the parse is cached
    cached = state.get("net")
    if cached is not None and cached[0].matches(model, input_shape):
        net = cached[1]
    else:
        net = parse_model(model, input_shape)
        state["net"] = (_NetKey(model, input_shape), net)
        state.pop("u", None)
    ref = _ref_tensor(net)
    kw: dict[str, Any] = {"certify": certify, "n_iter": n_iter, "state": state, "ref": ref}
    # Weights are read once per call (a parametrized layer in training mode updates once).
    dtype = torch.float64 if certify else None
    seg_ops = [
        [_stage_ops(st, grad=not certify, dtype=dtype) for st in seg.stages] for seg in net.segments
    ]
    # Lip of everything before the last segment's chain: earlier segments, pools, phi_lead.
    scale: Tensor | float = 1.0
    for seg, pool, ops in zip(net.segments[:-1], net.pools, seg_ops, strict=False):
        m_seg = _chain_m(seg, ops, len(seg.stages) - 1, **kw)
        if m_seg:
            scale = scale * m_seg[-1]
        scale = scale * (seg.factor * pool.lipschitz)
    chain, ops = net.segments[-1], seg_ops[-1]
    scale = scale * chain.factor
    K = len(chain.stages) - 1
    m = _chain_m(chain, ops, K - 1 if pairwise else K, **kw)
    if not pairwise:
        # certify: products rounded to nearest may land an ulp low; the margin keeps it an upper bound
        return m[K] * scale * (1 + 1e-9) if certify else m[K] * scale
    out_shape = chain.stages[K].out_shape
    if len(out_shape) != 1:
        raise ValueError(f"pairwise bounds need logits of shape (N, C), got (N, *{out_shape})")
    C = out_shape[0]
    dt = torch.float64 if certify else (ref.dtype if ref.dtype.is_floating_point else torch.float32)
    p, q, c = _pair_rows(C, ref.to(dt))
    a, b = _abs_a(chain), chain.b

    def A(lo: int, hi: int) -> float:
        return math.prod(a[k - 1] for k in range(lo, hi + 1))

    ctx = torch.no_grad() if certify else torch.enable_grad()
    with ctx:
        if C > PAIRWISE_MAX_CLASSES and K >= 1:
            rows = ops[K][1](torch.eye(C, dtype=dt, device=ref.device)).reshape(C, -1)
            if certify:
                # ||r_p - r_q|| from the differences: through the Gram matrix it cancels to 0
                # for near-equal rows (1e-7 apart in 1); the term covers rounding in forming rows
                D = torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist")
                norms = torch.linalg.vector_norm(rows, dim=1)
                rounding = 4 * rows.shape[1] * torch.finfo(dt).eps
                D = D + rounding * (norms[:, None] + norms[None, :])
            else:
                G = rows @ rows.T
                d = torch.diagonal(G)
                D = (d[:, None] + d[None, :] - 2 * G).clamp_min(0).sqrt()
            L = D * _slope_lipschitz(chain.slopes[K - 1]) * m[K - 1]
            L = L * (1 - torch.eye(C, dtype=L.dtype, device=L.device)) * scale
            return L.to(torch.float64) * (1 + 1e-9) if certify else L
        g = c
        row_norms: dict[int, Tensor] = {}
        for s in range(K, -1, -1):
            g = ops[s][1](g)
            row_norms[s] = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
        vals = A(1, K) * row_norms[0]
        for j in range(1, K + 1):
            vals = vals + b[K - j] * A(K - j + 2, K) * row_norms[K - j + 1] * m[K - j]
        vals = vals * scale
        if certify:
            vals = vals * (1 + 1e-9)
        L = vals.new_zeros(C, C)
        return L.index_put((p, q), vals).index_put((q, p), vals)


# --------------------------------------------------------------------------- certificates, CRM


def _radii(logits: Tensor, y: Tensor, L_pairwise: Tensor) -> Tensor:
    """r_ij = (f_i,y_i - f_ij) / L[y_i, j], +inf at j = y_i; shape (N, C)."""
    # in the wider dtype: a float64 certificate rounded to float32 logits could land an ulp low
    dtype = torch.promote_types(logits.dtype, L_pairwise.dtype)
    logits = logits.to(dtype)
    fy = logits.gather(1, y[:, None])
    Ly = L_pairwise.to(dtype)[y].clamp_min(torch.finfo(dtype).tiny)
    r = (fy - logits) / Ly
    return r.scatter(1, y[:, None], math.inf)


def certified_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` for a certificate: (N, ...) -> (N, C), no grad, at least float32.

    Autocast is off (bf16 logits are off by up to ~1e-1) and so is TF32 on CUDA (cuDNN
    convolutions and matmuls in TF32 carry ~1e-3 relative error); ``x`` is cast to the
    model's parameter dtype (float64 models included).
    """
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    if param is not None and param.is_floating_point():
        x = x.to(device=param.device, dtype=param.dtype)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), _tf32_off():
        logits = model(x)
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


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
