"""Per-layer spectral norms and a sound network-level l2 Lipschitz bound.

The network bound traces the model with ``torch.fx`` and propagates, node by node, an upper
bound on the Lipschitz constant of each intermediate value with respect to the model input:
layers multiply, ``add`` sums (a residual block gives ``1 + L(branch)``), ``cat`` takes the root
sum of squares. Every rule is an upper bound, so the result is one. Anything without a rule
(attention, LayerNorm, softmax, products of two activations ...) or a failed trace gives ``None``
and a one-line reason, never a number: a certificate must not be silently wrong.

The bound is for the **eval-mode** network (BatchNorm with running statistics, Dropout off).
"""

from __future__ import annotations

import contextlib
import math
import operator
import string
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from sn_lightning.models.normalize import InputNormalize
from sn_lightning.modes import eval_mode
from sn_lightning.spectral.ops import (
    SUPPORTED_LAYERS,
    OperatorSpec,
    _check_n_iter,
    _effective_weight,
    _krylov_top,
    _norm_upper_bound,
    _top_sigma,
    batchnorm_act,
    check_input_shape,
)
from sn_lightning.spectral.parametrization import (
    BoundedBatchNormScale,
    BoundedSpectralNorm,
    _find,
    sync_batchnorm_bounds,
)
from sn_lightning.spectral.surgery import _overrides_forward, normalized_layers

__all__ = ["LayerReport", "SpectralNormReport", "network_lipschitz_bound", "spectral_norm_report"]


@dataclass
class LayerReport:
    """One normalized layer.

    Attributes:
        name: module name in the model.
        type: layer class (``Conv2d``, ``Linear``, ``BatchNorm2d`` ...).
        input_shape: one input's shape, no batch dim (None if unknown).
        sigma: estimate of the operator norm of the weight in use (normalized), from fresh
            power iteration (a lower bound). BatchNorm: the exact eval-mode scale.
        upper_bound: guaranteed upper bound on the same norm (None if the shape is unknown).
        beta: the layer's bound.
        method: ``"operator"``, ``"matrix"`` or ``"batchnorm"``.
    """

    name: str
    type: str
    input_shape: tuple[int, ...] | None
    sigma: float
    upper_bound: float | None
    beta: float
    method: str


@dataclass
class SpectralNormReport:
    """Result of :func:`spectral_norm_report`.

    Attributes:
        layers: one row per normalized layer, in module order.
        lipschitz_bound: sound l2 Lipschitz bound of the eval-mode network (pixel space when the
            model starts with ``InputNormalize``), or None.
        reason: why ``lipschitz_bound`` is None ("" otherwise).
    """

    layers: list[LayerReport] = field(default_factory=list)
    lipschitz_bound: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinite and NaN values become the strings ``"inf"``, ``"nan"``)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(asdict(self))

    def __str__(self) -> str:
        head = ("layer", "type", "input", "sigma", "upper", "beta", "method")
        rows = [head] + [
            (
                r.name,
                r.type,
                "x".join(map(str, r.input_shape)) if r.input_shape else "-",
                f"{r.sigma:.4f}",
                "-" if r.upper_bound is None else f"{r.upper_bound:.4f}",
                f"{r.beta:g}",
                r.method,
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.lipschitz_bound is None:
            lines.append(f"network Lipschitz bound (l2): none ({self.reason})")
        else:
            lines.append(f"network Lipschitz bound (l2): {self.lipschitz_bound:.6g}")
        return "\n".join(lines)


def _layer_input_shape(p: BoundedSpectralNorm) -> tuple[int, ...] | None:
    if p.method == "operator":
        return p.spec.input_shape
    return p.input_shape


def _fresh_sigma(layer: nn.Module, p: BoundedSpectralNorm, W: Tensor, n_iter: int) -> float:
    """Operator-norm estimate of the weight in use, from a copy of u (random start for matrix).

    Iterated in float64 (complex128), so that the estimate, a lower bound up to rounding, does
    not come out above the certified upper bound by float32 rounding (1.99999976 > 1.99999971).
    """
    shape = _layer_input_shape(p)
    if p.method == "matrix" and shape is None and not isinstance(layer, nn.Linear):
        return float(p.sigma(W, n_iter))  # no shape: only the matrix norm is defined
    spec = OperatorSpec.from_layer(layer, shape)
    W = W.to(torch.complex128 if W.is_complex() else torch.float64)
    if p.method == "operator":
        u = p.u.detach().clone().to(W.dtype)
    else:
        gen = torch.Generator(device=W.device).manual_seed(0)
        u = torch.randn(spec.u_shape, generator=gen, device=W.device, dtype=W.dtype)
    with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
        op, adjoint = spec.operator(W)
        u = _krylov_top(op, adjoint, u, n_iter, blocks=spec.blocks)
        return float(_top_sigma(op, u, spec.blocks))


def spectral_norm_report(
    model: nn.Module, n_iter: int = 50, *, input_shape: Sequence[int] | None = None
) -> SpectralNormReport:
    """Per-layer norms and a sound network bound; changes no state of ``model``.

    Args:
        model: a model after ``apply_spectral_norm`` (or any model: rows are then empty and only
            the network bound is computed).
        n_iter: Krylov steps for each layer's sigma, from a copy of its ``u`` (ops Note
            [Krylov refresh]: never below as many power-iteration rounds).
        input_shape: ``(C, H, W)`` of one model input. Default: the one ``apply_spectral_norm``
            was given, where this model's normalized convolutions see their recorded sizes at
            it. Needed for the network bound when a convolution is not normalized, and for sums
            of input-dependent values (residual blocks), whose shapes must rule out
            broadcasting; it also lets pooling layers use exact, shape-aware constants.

    Returns:
        A :class:`SpectralNormReport`; ``str(report)`` is a table, ``report.as_dict()`` JSON.
    """
    if isinstance(n_iter, (tuple, list, torch.Size)):
        raise ValueError(
            f"spectral_norm_report's second argument is n_iter, got {tuple(n_iter)!r}; pass a "
            "shape as input_shape=..."
        )
    _check_n_iter(n_iter)
    if input_shape is not None:
        input_shape = check_input_shape(input_shape)
    sync_batchnorm_bounds(model)
    cache: dict[tuple[int, tuple[int, ...] | None], float] = {}
    rows: list[LayerReport] = []
    for name, (m, p) in normalized_layers(model).items():
        W = _effective_weight(m)
        if isinstance(p, BoundedBatchNormScale):
            upper: float | None = None
            try:
                s = upper = _bn_lipschitz(m)
            except _Unsupported:  # e.g. running_var + eps <= 0: no number for this row
                s = math.nan
            rows.append(
                LayerReport(name, type(m).__mro__[1].__name__, None, s, upper, p.beta, "batchnorm")
            )
            continue
        assert isinstance(p, BoundedSpectralNorm)
        shape = _layer_input_shape(p)
        upper = None
        if shape is not None or isinstance(m, nn.Linear):
            upper = _layer_bound(m, shape, cache)
        rows.append(
            LayerReport(
                name, p.layer_type, shape, _fresh_sigma(m, p, W, n_iter), upper, p.beta, p.method
            )
        )
    bound, reason = _network_bound(model, input_shape, cache)
    return SpectralNormReport(rows, bound, reason)


def _layer_bound(
    m: nn.Module,
    shape: tuple[int, ...] | None,
    cache: dict[tuple[int, tuple[int, ...] | None], float],
) -> float:
    """Upper bound of one layer's operator norm, computed once per report."""
    key = (id(m), None if isinstance(m, nn.Linear) else shape)
    if key not in cache:
        cache[key] = OperatorSpec.from_layer(m, shape).upper_bound(_effective_weight(m))
    return cache[key]


# --------------------------------------------------------------------------- network bound


class _Unsupported(Exception):
    """A node without a sound rule; the message is the report's reason."""


def _lipschitz_module() -> Any:
    """``sn_lightning.lipschitz``, imported here: it imports ``sn_lightning.spectral``."""
    from sn_lightning import lipschitz

    return lipschitz


def _slopes_rule(m: nn.Module) -> float:
    """``max(|alpha|, |beta|)`` of the slope range LipLT uses (parameters of any sign).

    Raises ValueError where the parameters make the module not Lipschitz (lipschitz.py, Note
    [activation parameters]).
    """
    lip = _lipschitz_module()
    return lip._slope_lipschitz(lip.activation_slopes(m))


def _celu_rule(m: nn.Module) -> float:
    lip = _lipschitz_module()
    return lip._slope_lipschitz(lip._celu_slopes(m.alpha))


def _prelu_rule(m: nn.Module) -> float:
    """``max(1, max |w|)``: the slope is 1 or a learned weight of any sign, per channel."""
    w = m.weight.detach().double()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("PReLU has non-finite weights")
    return max(1.0, float(w.abs().max())) if w.numel() else 1.0


def _discontinuous(m: nn.Module) -> float:
    raise ValueError(f"{type(m).__name__} jumps at its threshold: discontinuous, not Lipschitz")


# sup |f'| of elementwise activations (rounded up where irrational), or a rule that checks the
# module's parameters (lipschitz.py, Note [activation parameters]) and may raise ValueError.
_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], float]] = {
    nn.ReLU: _slopes_rule,
    nn.ReLU6: _slopes_rule,
    nn.Hardtanh: _slopes_rule,
    nn.Tanh: lambda m: 1.0,
    nn.Softsign: lambda m: 1.0,
    nn.Softplus: _slopes_rule,
    nn.CELU: _celu_rule,
    nn.Sigmoid: lambda m: 0.25,
    nn.Hardsigmoid: lambda m: 1.0 / 6.0,
    nn.Hardswish: lambda m: 1.5,
    nn.SiLU: lambda m: 1.1,  # 1.09984
    nn.Mish: lambda m: 1.089,  # 1.08850
    nn.GELU: lambda m: 1.13,  # 1.12890 (erf), 1.12899 (tanh)
    nn.LeakyReLU: _slopes_rule,
    nn.RReLU: _slopes_rule,  # slopes in [lower, upper] (training) or their mean (eval)
    nn.ELU: _slopes_rule,
    # scale * alpha, the slope at 0-, rounded up
    nn.SELU: lambda m: math.nextafter(1.0507009873554805 * 1.6732632423543772, math.inf),
    nn.PReLU: _prelu_rule,
    nn.Threshold: _discontinuous,
    nn.Hardshrink: _discontinuous,
    nn.Identity: lambda m: 1.0,
    nn.Dropout: lambda m: 1.0,  # eval mode
    nn.Dropout1d: lambda m: 1.0,
    nn.Dropout2d: lambda m: 1.0,
    nn.Dropout3d: lambda m: 1.0,
    nn.AlphaDropout: lambda m: 1.0,
    nn.Flatten: lambda m: 1.0,
    nn.Unflatten: lambda m: 1.0,
}
_FUNCTION_CONSTANTS: dict[Any, float] = {
    F.relu: 1.0,
    torch.relu: 1.0,
    F.relu6: 1.0,
    torch.tanh: 1.0,
    F.tanh: 1.0,
    torch.sigmoid: 0.25,
    F.sigmoid: 0.25,
    F.silu: 1.1,
    F.gelu: 1.13,
    F.mish: 1.089,
    F.hardswish: 1.5,
    F.hardsigmoid: 1.0 / 6.0,
    torch.flatten: 1.0,
    torch.reshape: 1.0,
    torch.permute: 1.0,
    torch.transpose: 1.0,
    torch.squeeze: 1.0,
    torch.unsqueeze: 1.0,
    torch.clone: 1.0,
    torch.split: 1.0,  # a tuple of disjoint parts; each part (getitem) is <= L
    torch.chunk: 1.0,
    torch.unbind: 1.0,
    torch.tensor_split: 1.0,
    operator.neg: 1.0,
    operator.pos: 1.0,
    torch.abs: 1.0,  # elementwise, slopes +-1
    torch.absolute: 1.0,
    # the same entries rearranged or a subset of them
    torch.flip: 1.0,
    torch.fliplr: 1.0,
    torch.flipud: 1.0,
    torch.rot90: 1.0,
    torch.roll: 1.0,
    torch.movedim: 1.0,
    torch.moveaxis: 1.0,
    torch.swapaxes: 1.0,
    torch.swapdims: 1.0,
    torch.t: 1.0,
    torch.narrow: 1.0,
    torch.select: 1.0,
    F.pixel_shuffle: 1.0,
    F.pixel_unshuffle: 1.0,
    F.channel_shuffle: 1.0,
    # over disjoint blocks, each 1-Lipschitz from the block's max-norm (<= its l2 norm)
    torch.amax: 1.0,
    torch.amin: 1.0,
    torch.logsumexp: 1.0,
    # per slice diag(p) - p p^T, eigenvalues <= max_i 2 p_i (1 - p_i) <= 1/2 (Gershgorin)
    F.softmax: 0.5,
    torch.softmax: 0.5,
    # values that depend on the input's shape alone
    torch.zeros_like: 0.0,
    torch.ones_like: 0.0,
    torch.full_like: 0.0,
}
_METHOD_CONSTANTS: dict[str, float] = {
    "relu": 1.0,
    "relu_": 1.0,
    "tanh": 1.0,
    "sigmoid": 0.25,
    "view": 1.0,
    "reshape": 1.0,
    "flatten": 1.0,
    "permute": 1.0,
    "transpose": 1.0,
    "contiguous": 1.0,
    "squeeze": 1.0,
    "unsqueeze": 1.0,
    "clone": 1.0,
    "float": 1.0,
    "chunk": 1.0,  # tuple of disjoint parts; each part is <= L
    "split": 1.0,
    "unbind": 1.0,
    "neg": 1.0,
    "reshape_as": 1.0,  # the other tensor gives only a shape
    "view_as": 1.0,
    "abs": 1.0,
    "abs_": 1.0,
    "absolute": 1.0,
    "flip": 1.0,
    "fliplr": 1.0,
    "flipud": 1.0,
    "rot90": 1.0,
    "roll": 1.0,
    "movedim": 1.0,
    "moveaxis": 1.0,
    "swapaxes": 1.0,
    "swapdims": 1.0,
    "t": 1.0,
    "narrow": 1.0,
    "select": 1.0,
    "unflatten": 1.0,
    "amax": 1.0,
    "amin": 1.0,
    "logsumexp": 1.0,
    "softmax": 0.5,
    "new_zeros": 0.0,
    "new_ones": 0.0,
    "new_full": 0.0,
}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_LEAVES = SUPPORTED_LAYERS + _POOLS + _BATCHNORMS + tuple(_ACTIVATIONS) + (InputNormalize,)


# Note [in-place ops]
#   The rules treat every node as a new value, but an in-place op n (``y.mul_(c)``, ``y += x``,
#   ``ReLU(inplace=True)``) also changes its argument a and every tensor sharing its memory:
#   ``y = fc(x); y.mul_(100); return y`` returns the ``fc`` node, whose bound alone knows nothing
#   of the 100. So after n's own rule gives L(n), every node already computed that may alias a
#   (connected to it through ops whose output may share memory with their first argument: views,
#   Identity, Dropout, in-place ops) is updated for the readers that come later: a itself holds
#   n's value, L(a) = L(n); any other alias v now holds old entries and entries written by n, so
#   ``||dv||^2 <= L(v)^2 + L(n)^2``: L(v) = hypot(L(v), L(n)). Readers before n saw the old
#   values, which their bounds used. Plain ``fx.Proxy`` has no ``__iadd__``, so ``y += x`` would
#   be traced as an out-of-place add: :class:`_Proxy` records it as ``operator.iadd``.

# Note [BatchNorm subclasses]
#   A BatchNorm subclass with its own forward computes something else than BatchNorm. timm's
#   BatchNormAct2d (EfficientNet, MobileNetV3, RegNet, CSPNet, Xception, ...) is known: BatchNorm's
#   ``F.batch_norm`` with the module's weight (bounded or not) and running statistics, then its
#   ``drop`` and ``act`` modules, so it is a leaf with the BatchNorm rule times the rules of those
#   two. Other subclasses are traced through first: an ``F.batch_norm`` call gets the eval-mode
#   BatchNorm rule from the traced statistics (:func:`_batch_norm_rule`), the rest its own rules.
#   A forward that fx cannot trace (e.g. one calling BatchNorm's own forward, which branches on
#   the input's dim) falls back to the leaf, which names the module that overrides forward.
#   Conv/Linear subclasses with a forward of their own are traced through the same way: timm's
#   StdConv2d and ScaledStdConv2d (BiT, NFNet) standardize their weight and call ``F.conv2d``
#   with it, a fixed tensor (Note [fixed tensors]) that the functional-layer rule bounds.

_INPLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.imatmul,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
    }
)


def _inplace_proxy_method(op: Callable[[Any, Any], Any]) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


class _Proxy(fx.Proxy):
    """An ``fx.Proxy`` that records augmented assignments as in-place ops (Note [in-place ops])."""


for _op in _INPLACE_OPERATORS:
    setattr(_Proxy, f"__{_op.__name__}__", _inplace_proxy_method(_op))


class _Tracer(fx.Tracer):
    """Rule modules are leaves (Note [BatchNorm subclasses] for ``through_subclasses``)."""

    def __init__(self, *, through_subclasses: bool = False, buffers: bool = False) -> None:
        super().__init__()
        self.through_subclasses = through_subclasses
        # buffers as get_attr nodes, so values computed from them are traced (Note [fixed tensors])
        self.proxy_buffer_attributes = buffers

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.through_subclasses and isinstance(m, _BATCHNORMS):
            return type(m).forward is _known_forward(m) or batchnorm_act(m)
        if self.through_subclasses and isinstance(m, SUPPORTED_LAYERS) and _overrides_forward(m):
            return False  # e.g. StdConv2d: its F.conv2d call with a computed weight is traced
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


class _ShapeRecorder(fx.Interpreter):
    """One run of the traced graph that records each tensor's shape and dtype, printing nothing.

    (``fx.passes.shape_prop.ShapeProp`` prints a traceback to stderr before re-raising; here a
    failed run becomes the report's one-line reason.)
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n.name] = tuple(result.shape)
            self.dtypes[n.name] = result.dtype
        return result


def _batch_norm_rule(
    node: fx.Node, lip: Callable[[Any], float], fixed: Callable[[Any], Tensor | None]
) -> float:
    """Eval-mode ``F.batch_norm``: ``max_i |weight_i| / sqrt(var_i + eps)`` times L(x).

    The statistics and weight are fixed tensors (Note [fixed tensors]): the traced module's own
    buffers and parameters, or values computed from them alone. Batch statistics
    (``training=True``) and statistics or weights that depend on the input have no rule (Note
    [BatchNorm subclasses]).
    """
    args = [_param(node, i, k, d) for i, (k, d) in enumerate(_BATCH_NORM_ARGS)]
    x, mean, var, weight, bias, training, _, eps = args
    if training is not False:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: batch_norm with batch statistics")
    if any(lip(a) != 0.0 for a in (mean, var, weight, bias)):
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: input-dependent batch_norm statistics"
        )
    values = []
    for a in (var, weight):
        value = fixed(a) if isinstance(a, fx.Node) else a
        if a is not None and not isinstance(value, Tensor):
            raise _Unsupported(f"no Lipschitz rule for {node.name}: batch_norm statistics unknown")
        values.append(value)
    var_t, weight_t = values
    eps = _const(eps)
    if var_t is None or eps is None:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: batch_norm without running_var")
    return _bn_factor(var_t, weight_t, eps, f"{node.name} (batch_norm)") * lip(x)


_BATCH_NORM_ARGS = (
    ("input", None),
    ("running_mean", None),
    ("running_var", None),
    ("weight", None),
    ("bias", None),
    ("training", False),
    ("momentum", 0.1),
    ("eps", 1e-5),
)


def _bn_lipschitz(bn: nn.Module) -> float:
    """Eval-mode BatchNorm: ``max_i |gamma_i| / sqrt(running_var_i + eps)``.

    Raises _Unsupported without running stats, or where ``running_var + eps <= 0`` or a value is
    not finite (a loaded state dict or a negative eps can hold any value).
    """
    name = type(bn).__name__
    if bn.running_var is None:
        raise _Unsupported(f"{name} without running stats (batch statistics)")
    weight = _effective_weight(bn) if bn.affine else None
    return _bn_factor(bn.running_var, weight, bn.eps, name)


def _bn_factor(var: Tensor, weight: Tensor | None, eps: float, name: str) -> float:
    """``max_i |weight_i| / sqrt(var_i + eps)`` (weight None: 1), in float64; finite or raise."""
    with torch.no_grad():
        denom = var.double() + eps
        if not bool((denom > 0).all()):
            raise _Unsupported(f"{name} with running_var + eps <= 0 or NaN: not Lipschitz")
        inv = 1.0 / torch.sqrt(denom)
        if weight is not None:
            inv = inv * weight.detach().double().abs()
    value = float(inv.max()) if inv.numel() else 0.0
    if not math.isfinite(value):
        raise _Unsupported(f"{name} with non-finite weight or running_var")
    return value


def _schur_bound(
    pool: Callable[[Tensor], Tensor], spatial: Sequence[int], *, channels: bool = True
) -> float:
    """``sqrt(max |row sum| * max |column sum|)`` of a linear pooling map (Schur test).

    Sound for a matrix whose entries all have one sign: average pooling's are ``1 / divisor``
    or 0, and a ``divisor_override`` may be negative. The map runs on ``(1, 1, *spatial)``, or
    on ``spatial`` itself with ``channels=False`` (a whole recorded shape).
    """
    shape = (1, 1, *spatial) if channels else tuple(spatial)
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = pool(x)
        (col,) = torch.autograd.grad(y, x, torch.ones_like(y))
    with torch.no_grad():
        row = pool(torch.ones_like(x))
    schur = math.sqrt(float(col.abs().max()) * float(row.abs().max()))
    return min(schur, _dense_linear_bound(pool, shape, schur))


# Up to this many inputs a linear pooling map is bounded by its dense matrix's norm too (the
# Schur test is exact for maps whose rows and columns sum alike, and up to ~25% above the norm of
# overlapping or uneven windows: 0.707 against 0.559 for an adaptive average from 7 to 2).
DENSE_POOL_MAX = 1024


def _dense_linear_bound(
    pool: Callable[[Tensor], Tensor], shape: tuple[int, ...], schur: float
) -> float:
    """Rigorous upper bound of the norm of the linear map ``pool`` on ``shape`` from its matrix.

    The matrix is ``pool`` of each unit input (float64; as one batch where ``shape`` has a
    leading 1, the maps here acting on each batch row alike, else vmapped), bounded by
    ``ops._norm_upper_bound``; its entries carry float64 rounding, at most ``8 u`` relative
    (``u = 2^-53``), so the map differs from it by at most ``8 u || |P| ||_2 <= 8 u schur``. Inf
    where the map is too large or does not run under vmap.
    """
    n = math.prod(shape)
    if n > DENSE_POOL_MAX or n == 0:
        return math.inf
    try:
        with torch.no_grad():
            basis = torch.eye(n, dtype=torch.float64)
            if shape[0] == 1:
                columns = pool(basis.reshape(n, *shape[1:])).reshape(n, -1)
            else:
                with warnings.catch_warnings():  # (batching rules missing for some ops)
                    warnings.simplefilter("ignore")
                    columns = torch.func.vmap(pool)(basis.reshape(n, *shape)).reshape(n, -1)
    except Exception:  # an op without a batching rule: the Schur test alone
        return math.inf
    if columns.numel() == 0:
        return math.inf
    return _norm_upper_bound(columns) + 8 * 2.0**-53 * schur


# Note [padding and resampling]
#   ``F.pad`` (any mode), nearest and (bi/tri)linear or area resampling are linear maps with
#   nonnegative entries, up to the constant that constant padding adds: each output entry is a
#   copy of an input entry, a convex combination of some, or the pad value. The Schur test
#   (``_schur_bound``) on the recorded input shape bounds them: ``sqrt(max copies)`` for the
#   copying ones (exact: reflect and replicate pads copy border entries, nearest upsampling by
#   2 copies each entry 4 times), and constant padding is 1 at any shape. Bicubic weights have
#   both signs: no rule.

_INTERPOLATE_ARGS = (
    ("size", None),
    ("scale_factor", None),
    ("mode", "nearest"),
    ("align_corners", None),
    ("recompute_scale_factor", None),
    ("antialias", False),
)
_NONNEGATIVE_RESAMPLING = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")


def _resample_bound(
    node: fx.Node, in_shape: tuple[int, ...] | None, resample: Callable[[Tensor], Tensor], mode: Any
) -> float:
    """Lipschitz constant of an interpolation (Note [padding and resampling])."""
    if mode not in _NONNEGATIVE_RESAMPLING:
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {mode} resampling (weights of both signs)"
        )
    if in_shape is None:
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: resampling a value whose shape is unknown: pass "
            "input_shape"
        )
    return _schur_bound(resample, in_shape, channels=False)


# The layer each functional call computes, with its arguments after (input, weight) in order.
_FUNCTIONAL_LAYERS: dict[Any, tuple[type[nn.Module], tuple[tuple[str, Any], ...]]] = {
    F.linear: (nn.Linear, (("bias", None),)),
    **{
        f: (cls, (("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
        for f, cls in ((F.conv1d, nn.Conv1d), (F.conv2d, nn.Conv2d), (F.conv3d, nn.Conv3d))
    },
    **{
        f: (
            cls,
            (
                ("bias", None),
                ("stride", 1),
                ("padding", 0),
                ("output_padding", 0),
                ("groups", 1),
                ("dilation", 1),
            ),
        )
        for f, cls in (
            (F.conv_transpose1d, nn.ConvTranspose1d),
            (F.conv_transpose2d, nn.ConvTranspose2d),
            (F.conv_transpose3d, nn.ConvTranspose3d),
        )
    },
}


def _functional_layer_rule(
    node: fx.Node,
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
    fixed: Callable[[Any], Tensor | None],
) -> float:
    """``F.linear`` / ``F.conv*d`` / ``F.conv_transpose*d`` with a fixed weight: the layer's bound.

    The weight is a fixed tensor (Note [fixed tensors]): a buffer (timm's BlurPool2d filter) or
    computed from parameters (StdConv2d's standardized weight); the bound is the layer's
    operator-norm upper bound at the recorded input shape.
    """
    x, weight = node.args[0], _param(node, 1, "weight", None)
    cls, spec = _FUNCTIONAL_LAYERS[node.target]
    options = {k: _param(node, i, k, d) for i, (k, d) in enumerate(spec, 2)}
    bias = options.pop("bias")
    if lip(weight) != 0.0 or lip(bias) != 0.0:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: an input-dependent weight or bias")
    w = fixed(weight)
    if w is None:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: a weight that is not fixed")
    if any(isinstance(v, fx.Node) for v in options.values()):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: traced layer arguments")
    if cls is nn.Linear:
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        shape = None
    else:
        nd = w.dim() - 2
        # weight (out, in / groups, *k); transposed (in, out / groups, *k)
        grouped = w.shape[1] * options["groups"]
        transposed = "output_padding" in options
        layer = cls(
            w.shape[0] if transposed else grouped,
            grouped if transposed else w.shape[0],
            tuple(w.shape[2:]),
            bias=False,
            device="meta",
            **options,
        )
        shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
        if shape is None or len(shape) not in (nd + 1, nd + 2):
            raise _Unsupported(
                f"no Lipschitz rule for {node.name}: {_describe(node)} of a value whose shape is "
                f"unknown ({shape}): pass input_shape"
            )
        shape = shape[-(nd + 1) :]
    return OperatorSpec.from_layer(layer, shape).upper_bound(w.detach()) * lip(x)


# Note [contractions]
#   ``einsum`` (and ``matmul``, ``@``, ``mm``, ``bmm``, ``mv``, read as einsums) with one
#   input-dependent operand x and fixed others (Note [fixed tensors]) is linear in x. The fixed
#   operands are contracted into one tensor W over the labels that neither x nor the output
#   uses; every label is then batch B (in x, W and the output), contracted C (x and W), kept K
#   (x and output), summed S (x alone) or an output of W, P (W and output); a shared label of
#   size 1 on one side only counts as absent there (broadcast). So
#       y[b, k, p] = sum_c M_b[p, c] sum_s x[b, c, k, s],   M_b[p, c] = W[b, p, c]:
#   block diagonal over b, the identity on k, after a sum of n_S entries (norm sqrt(n_S)). The
#   norm is exactly sqrt(n_S) max_b ||M_b||_2, bounded above by ``ops._norm_upper_bound``.
#   Repeated labels (diagonals, traces), the sublist form and two input-dependent operands
#   (bilinear) get no rule.

_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.mv)
_MATMUL_METHODS = frozenset({"matmul", "mm", "bmm", "mv"})


def _matmul_equation(a_dim: int, b_dim: int) -> str:
    """The einsum equation of ``torch.matmul`` for operands of these ranks (each at least 1)."""
    a = "k" if a_dim == 1 else "...nk"
    b = "k" if b_dim == 1 else "...km"
    batch = "..." if a_dim > 1 or b_dim > 1 else ""
    return f"{a},{b}->{batch}{'n' if a_dim > 1 else ''}{'m' if b_dim > 1 else ''}"


def _einsum_labels(equation: str, ranks: Sequence[int]) -> tuple[list[list[str]], list[str]]:
    """Each operand's labels and the output's, with the ellipsis spelled out.

    Ellipsis dims are labelled ``"...0"``, ``"...1"``, ... counted from the right (so operands
    of different ranks broadcast); an implicit output is the ellipsis, then the letters used
    once, sorted (torch's rule). Raises ValueError for a term that does not fit its operand.
    """
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"{len(terms)} terms for {len(ranks)} operands")
    width = max(
        (r - len(t) + 3 for t, r in zip(terms, ranks, strict=True) if "..." in t), default=0
    )

    def spell(term: str, rank: int) -> list[str]:
        head, dots, tail = term.partition("...")
        n = rank - len(head) - len(tail)
        if (n != 0 and not dots) or n < 0 or any(not c.isalpha() for c in head + tail):
            raise ValueError(f"term {term!r} for {rank} dims")
        return [*head, *(f"...{i}" for i in reversed(range(n))), *tail]

    operands = [spell(t, r) for t, r in zip(terms, ranks, strict=True)]
    if arrow:
        out_rank = len(rhs.replace("...", "")) + (width if "..." in rhs else 0)
        return operands, spell(rhs, out_rank)
    letters = [lb for labels in operands for lb in labels if not lb.startswith("...")]
    once = sorted(lb for lb in set(letters) if letters.count(lb) == 1)
    return operands, [*(f"...{i}" for i in reversed(range(width))), *once]


def _contraction_rule(
    node: fx.Node,
    equation: str,
    operands: Sequence[Any],
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
    fixed: Callable[[Any], Tensor | None],
) -> float:
    """``einsum(equation, *operands)``, linear in one operand: Note [contractions]."""
    moving = [j for j, a in enumerate(operands) if lip(a) != 0.0]
    if not moving:
        return 0.0
    if len(moving) > 1:
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {_describe(node)} of two input-dependent values "
            "(bilinear)"
        )
    (i,) = moving
    x = operands[i]
    x_shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
    if x_shape is None:
        raise _unknown_shape(node)
    values = {j: fixed(a) for j, a in enumerate(operands) if j != i}
    if any(v is None for v in values.values()):
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {_describe(node)} with an operand that is "
            "neither the input-dependent one nor fixed"
        )
    ranks = [len(x_shape) if j == i else values[j].dim() for j in range(len(operands))]
    try:
        labels, out = _einsum_labels(equation, ranks)
    except ValueError as e:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: einsum {equation!r}: {e}") from None
    if any(len(set(ls)) != len(ls) for ls in (*labels, out)):
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: einsum {equation!r} with a repeated label (a "
            "diagonal or trace)"
        )
    sx = dict(zip(labels[i], x_shape, strict=True))
    others = [lb for j, ls in enumerate(labels) if j != i for lb in ls]
    keep = [lb for lb in dict.fromkeys(others) if lb in sx or lb in out]
    letter = dict(zip(dict.fromkeys(others), string.ascii_letters, strict=False))
    if len(letter) < len(set(others)):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: einsum with over 52 fixed labels")
    spec = ",".join("".join(letter[lb] for lb in labels[j]) for j in values)
    with torch.no_grad():
        W = (
            torch.einsum(
                f"{spec}->{''.join(letter[lb] for lb in keep)}",
                *(v.detach().double() for v in values.values()),
            )
            if values
            else torch.ones((), dtype=torch.float64)
        )
    sw = dict(zip(keep, W.shape, strict=True))
    in_x = {lb for lb, n in sx.items() if not (n == 1 and sw.get(lb, 1) != 1)}
    in_w = {lb for lb, n in sw.items() if not (n == 1 and sx.get(lb, 1) != 1)}
    if any(sx[lb] != sw[lb] for lb in in_x & in_w):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: einsum sizes that do not broadcast")
    groups = (
        [lb for lb in keep if lb in in_x and lb in in_w and lb in out],  # B
        [lb for lb in keep if lb in in_w and lb not in in_x and lb in out],  # P
        [lb for lb in keep if lb in in_x and lb in in_w and lb not in out],  # C
    )
    order = [lb for g in groups for lb in g]
    drop = [d for d, lb in enumerate(keep) if lb not in order]  # W's sums and broadcast dims
    W = W.sum(drop) if drop else W
    rest = [lb for lb in keep if lb in order]
    M = W.permute([rest.index(lb) for lb in order]).reshape(
        [math.prod(sw[lb] for lb in g) for g in groups]
    )
    summed = math.prod(n for lb, n in sx.items() if lb in in_x and lb not in in_w and lb not in out)
    recorded = shapes.get(node.name)
    expected = tuple(sx[lb] if lb in in_x else sw.get(lb, 1) for lb in out)
    if recorded is not None and tuple(recorded) != expected:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: einsum {equation!r} read wrongly")
    if M.numel() == 0 or summed == 0:
        return 0.0
    return math.sqrt(summed) * _norm_upper_bound(M) * lip(x)


def _einsum_operands(node: fx.Node) -> list[Any]:
    """The operands of ``torch.einsum(equation, *operands)`` or ``torch.einsum(equation, [...])``."""
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        return list(operands[0])
    return operands


def _unknown_shape(node: fx.Node) -> _Unsupported:
    """The refusal for a rule that needs the recorded shape of a value it does not have."""
    return _Unsupported(
        f"no Lipschitz rule for {node.name}: {_describe(node)} of a value whose shape is unknown: "
        "pass input_shape"
    )


def _einsum_call_rule(
    node: fx.Node,
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
    fixed: Callable[[Any], Tensor | None],
) -> float:
    """``torch.einsum`` and the matmul family (functions, methods, ``@``): Note [contractions]."""
    if node.target is torch.einsum:
        equation, operands = node.args[0], _einsum_operands(node)
        if not isinstance(equation, str) or node.kwargs:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: einsum in sublist form")
        return _contraction_rule(node, equation, operands, lip, shapes, fixed)
    names = {torch.mm: "mat2", torch.bmm: "mat2", torch.mv: "vec", "mm": "mat2", "bmm": "mat2"}
    a = _input(node) if node.op == "call_function" else node.args[0]
    b = _param(node, 1, names.get(node.target, "other"), None)
    ranks = []
    for t in (a, b):
        value = fixed(t) if lip(t) == 0.0 else None
        shape = value.shape if value is not None else shapes.get(getattr(t, "name", ""))
        if shape is None or len(shape) == 0:
            raise _unknown_shape(node)
        ranks.append(len(shape))
    return _contraction_rule(node, _matmul_equation(*ranks), [a, b], lip, shapes, fixed)


def _pad_bound(node: fx.Node, shape: tuple[int, ...] | None, pad: Any, mode: Any) -> float:
    """Padding: 1 in constant mode, else the Schur test (Note [padding and resampling])."""
    if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: pad with traced sizes {pad!r}")
    if mode == "constant":
        return 1.0  # entries kept once or cropped, plus a constant
    if mode not in ("reflect", "replicate", "circular"):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: pad mode {mode!r}")
    if shape is None:
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {mode} padding of a value whose shape is unknown: "
            "pass input_shape"
        )
    return _schur_bound(lambda t: F.pad(t, list(pad), mode=mode), shape, channels=False)


_PADS = {
    nn.modules.padding._ConstantPadNd: "constant",
    nn.modules.padding._ReflectionPadNd: "reflect",
    nn.modules.padding._ReplicationPadNd: "replicate",
    nn.modules.padding._CircularPadNd: "circular",
}


def _pool_dims(m: nn.Module) -> int:
    """Spatial dims a pool acts on (the last ones of its input): MaxPool2d -> 2."""
    return {"1d": 1, "2d": 2, "3d": 3}[type(m).__name__[-2:]]


def _pool_bound(m: nn.Module, spatial: Sequence[int] | None) -> float:
    """Sound l2 Lipschitz constant of a pooling layer (input ``spatial`` size if known).

    Max pooling: ``|max a - max b| <= ||a - b||`` over a window, so
    ``||P x - P y||^2 <= sum_windows ||x_w - y_w||^2 <= c ||x - y||^2`` with c the max number
    of windows covering a pixel: ``L = sqrt(c)``. Average pooling is linear with nonnegative
    entries: Schur test ``L <= sqrt(max row sum * max column sum)``. Without a shape:
    ``c <= prod ceil(k / (s / gcd(d, s)))`` (for each tap at most one window start), and plain
    average pools give ``sqrt(c / prod k)``.
    """
    max_pool_lipschitz = _lipschitz_module().max_pool_lipschitz
    if getattr(m, "return_indices", False):
        raise _Unsupported(f"{type(m).__name__} with return_indices=True: the indices jump")
    nd = _pool_dims(m)
    if isinstance(
        m,
        (
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
        ),
    ):
        out = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * nd
        if all(o == 1 for o in out):  # one window: global max 1, global average 1 / sqrt(n)
            average = not isinstance(
                m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
            )
            return 1.0 / math.sqrt(math.prod(spatial)) if average and spatial else 1.0
        if spatial is None:
            raise _Unsupported(f"{type(m).__name__}({m.output_size}) needs input_shape")
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return max_pool_lipschitz(m, spatial)
        return _schur_bound(m, spatial)
    k = _tuple(m.kernel_size, nd)
    s = _tuple(m.stride if m.stride is not None else m.kernel_size, nd)
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        if spatial is not None:
            return max_pool_lipschitz(m, spatial)
        d = _tuple(m.dilation, nd)
        c = math.prod(
            math.ceil(ki / (si // math.gcd(di, si))) for ki, si, di in zip(k, s, d, strict=True)
        )
        return math.sqrt(c)
    if spatial is not None:
        return _schur_bound(m, spatial)
    if m.count_include_pad and not m.ceil_mode and getattr(m, "divisor_override", None) is None:
        c = math.prod(math.ceil(ki / si) for ki, si in zip(k, s, strict=True))
        return math.sqrt(c / math.prod(k))
    raise _Unsupported(
        f"{type(m).__name__} with ceil_mode/count_include_pad=False needs input_shape"
    )


_AVG = (("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False))
_MAX = (*_AVG[:3], ("dilation", 1), ("ceil_mode", False), ("return_indices", False))
# Functional pools: the module each computes, with its arguments after the input, in order.
_FUNCTIONAL_POOLS: dict[Any, tuple[type[nn.Module], tuple[tuple[str, Any], ...]]] = {
    F.avg_pool1d: (nn.AvgPool1d, (*_AVG, ("count_include_pad", True))),
    F.avg_pool2d: (nn.AvgPool2d, (*_AVG, ("count_include_pad", True), ("divisor_override", None))),
    F.avg_pool3d: (nn.AvgPool3d, (*_AVG, ("count_include_pad", True), ("divisor_override", None))),
    F.max_pool1d: (nn.MaxPool1d, _MAX),
    F.max_pool2d: (nn.MaxPool2d, _MAX),
    F.max_pool3d: (nn.MaxPool3d, _MAX),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, (("output_size", None),)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, (("output_size", None),)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, (("output_size", None),)),
    F.adaptive_max_pool1d: (
        nn.AdaptiveMaxPool1d,
        (("output_size", None), ("return_indices", False)),
    ),
    F.adaptive_max_pool2d: (
        nn.AdaptiveMaxPool2d,
        (("output_size", None), ("return_indices", False)),
    ),
    F.adaptive_max_pool3d: (
        nn.AdaptiveMaxPool3d,
        (("output_size", None), ("return_indices", False)),
    ),
    # F.max_pool2d(x, 2, return_indices=True) is traced as the call it dispatches to
    F.max_pool1d_with_indices: (nn.MaxPool1d, (*_MAX[:-1], ("return_indices", True))),
    F.max_pool2d_with_indices: (nn.MaxPool2d, (*_MAX[:-1], ("return_indices", True))),
    F.max_pool3d_with_indices: (nn.MaxPool3d, (*_MAX[:-1], ("return_indices", True))),
    F.adaptive_max_pool1d_with_indices: (nn.AdaptiveMaxPool1d, (("output_size", None),)),
    F.adaptive_max_pool2d_with_indices: (nn.AdaptiveMaxPool2d, (("output_size", None),)),
    F.adaptive_max_pool3d_with_indices: (nn.AdaptiveMaxPool3d, (("output_size", None),)),
}


def _functional_pool_rule(
    node: fx.Node, lip: Callable[[Any], float], shapes: dict[str, tuple[int, ...]]
) -> float:
    """``F.avg_pool2d(x, 4)`` and the other functional pools: the rule of the same pooling module."""
    cls, spec = _FUNCTIONAL_POOLS[node.target]
    options = {k: _param(node, i, k, d) for i, (k, d) in enumerate(spec, 1)}
    traced: list[fx.Node] = []
    fx.node.map_arg(options, traced.append)
    if traced:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: pooling with traced sizes")
    if options.get("stride") in ((), []):  # ATen's default: the kernel size
        options["stride"] = None
    if "with_indices" in node.target.__name__:
        options["return_indices"] = True
    m = cls(**options)
    x = _input(node)
    in_shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
    nd = _pool_dims(m)
    if in_shape is not None and len(in_shape) not in (nd + 1, nd + 2):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: input of shape {in_shape}")
    return _pool_bound(m, None if in_shape is None else in_shape[-nd:]) * lip(x)


def _tuple(x: Any, n: int) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (int(x),) * n


def _const(x: Any) -> float | None:
    """A Python number argument, or None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def network_lipschitz_bound(
    model: nn.Module, *, input_shape: Sequence[int] | None = None
) -> tuple[float | None, str]:
    """Sound l2 Lipschitz bound of the eval-mode ``model`` by ``torch.fx`` bound propagation.

    Rules per node (L = bound w.r.t. the model input): Linear/Conv/ConvTranspose: layer upper
    bound (:func:`~sn_lightning.spectral.ops.operator_norm_upper_bound`) x L(input);
    InputNormalize: ``1/min |std|``; eval BatchNorm: ``max |gamma| / sqrt(var + eps)``;
    elementwise activations: ``sup |f'|`` for parameters of any sign (ReLU 1, Sigmoid 1/4,
    LeakyReLU ``max(1, |slope|)``, ELU ``max(1, |alpha|)``, PReLU ``max(1, max |w|)``, GELU
    1.13, SiLU 1.1, ...; none where the parameters make it discontinuous or unbounded:
    lipschitz.py, Note [activation parameters]); reshapes, flips, rolls, pixel shuffles,
    Dropout, Identity, ``abs``, ``clamp`` to constants, ``amax``, ``logsumexp``, the values of
    ``max(dim)``/``sort``/``topk`` (not their indices: Note [values and indices]): 1; indexing
    with a fixed index: ``sqrt(max repeats)``; ``maximum(a, b)``: as a sum in quadrature; softmax
    1/2; means and sums over blocks of n entries: ``1 / sqrt(n)`` and ``sqrt(n)``;
    ``F.dropout(training=True)``: ``1 / (1 - p)``; pools, modules or functional: see
    :func:`_pool_bound`; ``a + b``, ``a - b``: ``L(a) + L(b)``, an operand broadcast to n times
    its size counting ``sqrt(n)`` (Note [broadcast sums]), but ``x - x.mean(dims, keepdim=True)``:
    ``L(x)`` (Note [centering]); ``cat``/``stack``: ``sqrt(sum L_i^2)``; scalar ``c * a``, ``a / c``:
    ``|c| L(a)``; a tensor ``c`` computed from parameters and buffers alone (LayerScale, frozen
    BatchNorm): ``max |c|`` (``1 / min |c|``) times the repeats of a broadcast ``a`` (Note [fixed
    tensors]); padding and nearest/linear/area resampling: the Schur test on the recorded shape
    (Note [padding and resampling]); ``expand``/``repeat``: ``sqrt(repeats)``; ``F.conv*d``,
    ``F.conv_transpose*d`` and ``F.linear`` with a fixed weight: that layer's upper bound; values
    that do not depend on the input's values (parameters, sizes, ``zeros_like``): 0; an in-place op
    also raises the bounds of the tensors it writes (Note [in-place ops]). Anything else
    (rounding, casts to integers, ...): no bound; nor for a model with forward hooks
    (lipschitz.py, Note [forward hooks]).

    Args:
        model: the network; its forward must take the input tensor as first argument.
        input_shape: ``(C, H, W)`` of one input; enables shape-aware rules (sums, pools) and
            unnormalized convolutions. Default: the ``input_shape`` given to
            ``apply_spectral_norm``, if any. A model whose forward fails at that size (a block
            of the normalized network) is bounded at the sizes its convolutions saw there; one
            that runs at it but feeds them other sizes (a wrapper that pads or pools) gets no
            bound without ``input_shape``; without any shape, sums of input-dependent values get
            no bound.

    The traced graph is checked against the eager forward on one random input (a branch fx
    cannot follow, such as ``isinstance(x, Tensor)``, gives no bound).

    Returns:
        ``(bound, "")`` or ``(None, reason)``.
    """
    return _network_bound(
        model, None if input_shape is None else check_input_shape(input_shape), {}
    )


def _describe(node: fx.Node) -> str:
    """A node's op and target for messages (``add_`` / ``Linear`` / ``torch.mul``)."""
    target = node.target
    return f"{node.op} {getattr(target, '__name__', target)}"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _network_bound(
    model: nn.Module,
    input_shape: Sequence[int] | None,
    cache: dict[tuple[int, tuple[int, ...] | None], float],
) -> tuple[float | None, str]:
    problem = _lipschitz_module()._forward_hook_problem(model)
    if problem is not None:  # lipschitz.py, Note [forward hooks]
        return None, f"{problem} (the bound follows the modules' classes; torch.fx runs no hooks)"
    # Bounded BatchNorms share running_var with their BatchNorm, but `.to()` or an `assign=True`
    # load leaves them a copy until the next forward: a grown variance would give too low a bound.
    sync_batchnorm_bounds(model)
    # The bound is the eval-mode network's: trace, record and propagate in eval mode (a forward
    # may branch on self.training), whatever mode the caller is in; the modes are restored.
    with eval_mode(model):
        # Traced buffers (Note [fixed tensors]) and BatchNorm subclasses (Note [BatchNorm
        # subclasses]) where fx can: a forward may branch on a buffer's or a shape's value.
        # fx traces the root's forward even where it is a rule's leaf (ConvTranspose2d branches)
        root = nn.Sequential(OrderedDict(model=model)) if isinstance(model, _LEAVES) else model
        gm = None
        for options in (
            {"through_subclasses": True, "buffers": True},
            {"through_subclasses": True},
            {},
        ):
            try:
                gm = _trace(root, options)
                break
            except Exception as e:
                error = e
        if gm is None:
            return None, f"torch.fx could not trace {type(model).__name__}: {_first_line(error)}"
        constants = _reproducible_constants(root, gm, options)
        recorder = _ShapeRecorder(gm)
        given = _recorded_network_input_shapes(model) if input_shape is None else []
        recorded = given[0] if len(given) == 1 else None
        checked_at = None  # the graph's input and outputs, to check against the forward
        if input_shape is not None or recorded is not None:
            try:
                tensors = (*model.parameters(), *model.buffers())
                param = next((t for t in tensors if t.is_floating_point()), None)
                device = param.device if param is not None else torch.device("cpu")
                dtype = param.dtype if param is not None else torch.get_default_dtype()
                shape = tuple(input_shape if input_shape is not None else recorded)
                x = _probe(shape, device, dtype)
                with torch.no_grad(), _seeded(device):
                    traced = _tensors(recorder.run(x.clone()))
            except Exception as e:
                if input_shape is not None:
                    shape = tuple(int(i) for i in input_shape)
                    return None, f"the forward at input_shape {shape} failed: {_first_line(e)}"
                recorder = _ShapeRecorder(gm)  # e.g. a submodule of the normalized network
            else:
                checked_at = (x, traced)
                if input_shape is None and not _layers_saw_their_shapes(gm, recorder.shapes):
                    # a wrapper that feeds its layers other sizes than they were normalized at:
                    # their recorded sizes are not this model's, and its own input size is unknown
                    return None, (
                        f"at the recorded input shape {shape} the normalized convolutions see "
                        "other sizes than apply_spectral_norm recorded: pass input_shape"
                    )
        try:
            bound = _propagate(gm, recorder.shapes, recorder.dtypes, cache, constants)
        except _Unsupported as e:
            if len(given) > 1 and str(e).endswith("pass input_shape"):
                shapes = " and ".join(str(g) for g in given)
                return None, f"{e} (apply_spectral_norm was given {shapes}: there is no default)"
            return None, str(e)
        if checked_at is not None:  # after the rules: they refuse forwards that write state
            mismatch = _trace_mismatch(root, *checked_at)
            if mismatch is not None:
                return None, mismatch
    if math.isnan(bound):
        return None, "the bound is NaN (a NaN weight, statistic or constant)"
    return bound, ""


def _probe(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """One seeded random input ``(1, *shape)``: the run that records shapes and checks the trace."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *shape), generator=generator).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _seeded(device: torch.device) -> Iterator[None]:
    """The same random state for each run (a stochastic op draws alike); the caller's restored."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def _trace_mismatch(root: nn.Module, x: Tensor, traced: list[Tensor]) -> str | None:
    """Why the traced graph's outputs ``traced`` on ``x`` are not ``root``'s forward's, or None.

    The rules bound the graph; a forward that branches on what fx cannot see (``isinstance(x,
    Tensor)``, a value read on the host) may compute something else eagerly.
    """
    try:
        with torch.no_grad(), _seeded(x.device):
            eager = _tensors(root(x.clone()))
    except Exception as e:
        return f"the forward at input shape {tuple(x.shape[1:])} failed: {_first_line(e)}"
    if len(traced) == len(eager) and all(map(_same_values, traced, eager)):
        return None
    return (
        f"torch.fx's graph of {type(root).__name__} computes other outputs than its forward "
        "(a branch on the input's type or values that tracing cannot follow)"
    )


def _tensors(out: Any) -> list[Tensor]:
    """The tensors in a forward's output (nested tuples, lists and dicts), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and values to float rounding (relative to ``b``'s largest entry)."""
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)


def _layers_saw_their_shapes(gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether every normalized convolution got the input size its ``u`` was recorded at.

    The default input shape is the one ``apply_spectral_norm`` was given for the whole network;
    a submodule or a wrapper may take it too, at other sizes inside, and then its recorded
    shapes are not this model's (the bound would be computed at the wrong size).
    """
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        p = _find(gm.get_submodule(node.target), "weight", BoundedSpectralNorm)
        if not isinstance(p, BoundedSpectralNorm) or p.spec.kind == "linear":
            continue
        expected = _layer_input_shape(p)
        seen = shapes.get(node.args[0].name)
        if expected is None or seen is None or tuple(seen[-len(expected) :]) != expected:
            return False
    return True


def _recorded_network_input_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """The ``input_shape`` values ``apply_spectral_norm`` was given for ``model``'s layers, sorted.

    One is the bound's default input shape; several (two calls at different sizes) leave none.
    """
    shapes = {getattr(p, "network_input_shape", None) for _, p in normalized_layers(model).values()}
    shapes.discard(None)
    return sorted(shapes)


def _propagate(
    gm: fx.GraphModule,
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    cache: dict[tuple[int, tuple[int, ...] | None], float],
    constants: frozenset[str] = frozenset(),
) -> float:
    L: dict[fx.Node, float] = {}
    n_inputs = 0
    memo: dict[fx.Node, Any] = {}

    written = _written(gm)

    def fixed(a: Any) -> Tensor | None:
        value = _fixed_value(a, gm, memo, constants, written) if isinstance(a, fx.Node) else None
        return value if isinstance(value, Tensor) else None

    poisoned: dict[fx.Node, str] = {}  # values that may be read only where they are unused
    pairs: dict[fx.Node, float] = {}  # (values, indices) calls: the bound of their values

    def lip(a: Any) -> float:
        if isinstance(a, fx.Node):
            if a in poisoned:
                raise _Unsupported(poisoned[a])
            return L[a]
        if isinstance(a, (list, tuple)):
            return math.sqrt(sum(lip(x) ** 2 for x in a))
        if isinstance(a, dict):
            return math.sqrt(sum(lip(x) ** 2 for x in a.values()))
        return 0.0  # a constant

    for node in gm.graph.nodes:
        try:
            if node.op == "placeholder":
                L[node] = 1.0 if n_inputs == 0 else 0.0  # later placeholders keep their defaults
                n_inputs += 1
            elif node.op == "get_attr":
                L[node] = 0.0
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise _Unsupported(
                        f"model returns {type(out).__name__!r}, not one tensor (e.g. "
                        "features_only models return a list of feature maps)"
                    )
                return lip(out)
            elif node.op == "call_module":
                m = gm.get_submodule(node.target)
                if len(node.args) != 1 or node.kwargs:  # ConvTranspose2d(x, output_size=...)
                    raise _Unsupported(
                        f"no Lipschitz rule for {node.name}: module {node.target} called with "
                        "arguments besides its input"
                    )
                L[node] = _module_factor(m, node, shapes, cache) * lip(node.args[0])
            elif _pair_part(node, pairs) == "values":  # Note [values and indices]
                L[node] = pairs[node.args[0]]
            elif _pair_part(node, pairs) == "indices":
                poisoned[node] = f"no Lipschitz rule for {node.name}: indices of a sort or max jump"
                L[node] = math.inf
            elif tainted := [a for a in node.all_input_nodes if a in poisoned]:
                # sizes, dims and slices computed from indices jump with them
                poisoned[node] = poisoned[tainted[0]]
                L[node] = math.inf
            elif node.op in ("call_function", "call_method") and _constant(node, lip):
                # shapes, asserts, parameters: nothing here depends on the input values
                L[node] = 0.0
            elif _returns_values_and_indices(node):
                if _order_statistic(node) == "topk" and _param(node, 4, "sorted", True) is not True:
                    raise _Unsupported(
                        f"no Lipschitz rule for {node.name}: topk(sorted=False) (the order of "
                        "its values jumps)"
                    )
                pairs[node] = lip(_input(node))
                poisoned[node] = (
                    f"no Lipschitz rule for {node.name}: {_describe(node)} read whole (its indices "
                    "jump)"
                )
                L[node] = math.inf
            elif _centers(node, gm, shapes):
                L[node] = lip(_first(node))
            elif node.op == "call_function" and node.target is F.batch_norm:
                L[node] = _batch_norm_rule(node, lip, fixed)
            elif node.op == "call_function":
                L[node] = _function_rule(node, lip, shapes, dtypes, fixed)
            elif node.op == "call_method":
                L[node] = _method_rule(node, lip, shapes, dtypes, fixed)
            else:  # pragma: no cover - fx has no other ops
                raise _Unsupported(f"unknown fx op {node.op}")
            _propagate_inplace(node, gm, L, pairs)
        except _Unsupported:
            raise
        except Exception as e:  # a rule meeting arguments it does not expect: no bound
            raise _Unsupported(
                f"no Lipschitz rule for {node.name} ({_describe(node)}): {_first_line(e)}"
            ) from None

    raise _Unsupported("graph has no output")


# Note [values and indices]
#   ``x.max(1)``, ``x.sort(1)``, ``x.topk(k)``, ``x.kthvalue(k)`` and ``x.median(1)`` return
#   (values, indices). Each value is an order statistic of a slice, which moves by at most the
#   largest change of an entry of that slice, and sorting a slice is non-expansive in l2 (so is
#   any part of the sorted slice): the values have L(x). The indices jump, so the call gets L(x)
#   and its values (``[0]``, ``.values``) keep it, but a read of its indices (``[1]``,
#   ``.indices``, any other part) leaves no bound. fx unpacks ``v, i = x.max(1)`` into both
#   parts even when ``i`` is unused, so the indices node itself gets no rule: any reader of it
#   fails. ``torch.max(x)`` (one value) has L(x); ``torch.max(a, b)`` is elementwise:
#   :func:`_elementwise_max_rule`.

_ORDER_STATISTICS = frozenset({"max", "min", "sort", "topk", "kthvalue", "median"})
_ORDER_FUNCTIONS = (torch.max, torch.min, torch.sort, torch.topk, torch.kthvalue, torch.median)


def _order_statistic(node: Any) -> str | None:
    """``"max"``, ``"sort"``, ... for a call of one of ``_ORDER_STATISTICS``, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in _ORDER_STATISTICS:
        return node.target
    if node.op == "call_function" and node.target in _ORDER_FUNCTIONS:
        return node.target.__name__
    return None


def _returns_values_and_indices(node: Any) -> bool:
    """Whether ``node`` is an order statistic that returns (values, indices) (an int ``dim``)."""
    name = _order_statistic(node)
    if name is None or "other" in node.kwargs:
        return False
    if name in ("sort", "topk", "kthvalue"):
        return True
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return isinstance(dim, int) and not isinstance(dim, bool)


def _pair_part(node: fx.Node, pairs: dict[fx.Node, float]) -> str | None:
    """``"values"`` / ``"indices"`` for a part of a (values, indices) pair in ``pairs``, else None.

    ``[0]``, ``[-2]`` and ``.values`` are the values; any other part holds indices.
    """
    if node.op != "call_function" or node.target not in (operator.getitem, getattr):
        return None
    if len(node.args) < 2 or node.args[0] not in pairs:
        return None
    part = node.args[1]
    values = part == "values" if node.target is getattr else part in (0, -2)
    return "values" if values else "indices"


def _order_statistic_rule(
    node: fx.Node, lip: Callable[[Any], float], shapes: dict[str, tuple[int, ...]]
) -> float:
    """One value (``x.max()``) or elementwise ``max(a, b)`` (Note [values and indices])."""
    x = _input(node)
    if "other" in node.kwargs:
        second = node.kwargs["other"]
    else:
        second = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if second is None:
        return lip(x)  # one value: the largest entry
    tensor = isinstance(second, fx.Node) and second.name in shapes and "dim" not in node.kwargs
    if tensor or "other" in node.kwargs:  # max(a, b)
        return _elementwise_max_rule(node, x, second, lip, shapes)
    hint = "" if shapes else ": pass input_shape"
    raise _Unsupported(
        f"no Lipschitz rule for {node.name}: {_describe(node)} with a second argument known only "
        f"at run time{hint}"
    )


def _elementwise_max_rule(
    node: fx.Node, a: Any, b: Any, lip: Callable[[Any], float], shapes: dict[str, tuple[int, ...]]
) -> float:
    """``maximum(a, b)``/``minimum(a, b)``: ``hypot(r_a L(a), r_b L(b))``.

    Entrywise ``|d max| <= max(|da|, |db|)``; ``r`` counts the repeats of a broadcast operand
    (Note [broadcast sums]).
    """
    return math.hypot(*_broadcast_bounds(node, (a, b), lip, shapes))


def _broadcast_bounds(
    node: fx.Node,
    operands: Sequence[Any],
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
) -> list[float]:
    """Each operand's bound times the repeats of its broadcast to the output.

    Note [broadcast sums]; input-dependent operands need their recorded shapes.
    """
    out = shapes.get(node.name)
    bounds = []
    for operand in operands:
        bound = lip(operand)
        if bound == 0.0:
            bounds.append(0.0)
            continue
        shape = shapes.get(operand.name) if isinstance(operand, fx.Node) else None
        if out is None or shape is None:
            raise _Unsupported(
                f"no Lipschitz rule for {node.name}: {_describe(node)} of input-dependent values "
                "whose shapes are unknown (they may broadcast): pass input_shape"
            )
        bounds.append(bound * _repeats(out, shape))
    return bounds


# Note [centering]
#   ``x - x.mean(dims, keepdim=True)`` is ``(I - P) x`` with P the orthogonal projection onto
#   tensors constant along ``dims``; I - P is an orthogonal projection too (norm 1), so the
#   difference has L(x), where the sum rule would charge L(x) (1 + sqrt(n)) for the mean broadcast
#   over n entries (Note [broadcast sums]). Only where no in-place op runs between the mean and
#   the difference (one could change x after its mean was taken).


def _centers(node: fx.Node, gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether ``node`` is ``x - x.mean(dims, keepdim=True)`` (Note [centering])."""
    if not (
        (node.op == "call_function" and node.target in (operator.sub, operator.isub, torch.sub))
        or (node.op == "call_method" and node.target in ("sub", "sub_"))
    ):
        return False
    a, b = _first(node), _param(node, 1, "other", None)
    if node.kwargs.get("alpha", 1) != 1 or not isinstance(b, fx.Node):
        return False
    mean = (b.op == "call_function" and b.target is torch.mean) or (
        b.op == "call_method" and b.target == "mean"
    )
    if not (mean and _first(b) is a and _param(b, 2, "keepdim", False) is True):
        return False
    if not isinstance(a, fx.Node) or shapes.get(a.name) is None:
        return False
    if shapes.get(node.name) != shapes[a.name]:
        return False
    between = b.next
    while between is not node:
        if _inplace(between, gm):
            return False
        between = between.next
    return True


def _constant(node: fx.Node, lip: Callable[[Any], float]) -> bool:
    """True when no argument depends on the input values (L = 0 for all of them)."""
    return all(lip(a) == 0.0 for a in (*node.args, *node.kwargs.values()))


# Note [fixed tensors]
#   ``x * c`` with a tensor ``c`` that depends on no input (LayerScale's ``gamma``, a frozen
#   BatchNorm's ``weight * (running_var + eps).rsqrt()``, a learned skip gain) has
#   ``||c * dx|| <= max |c| ||dx||``, times ``sqrt(numel(out) / numel(x))`` where ``c`` broadcasts
#   ``x`` up (Note [broadcast sums]); ``x / c`` has ``1 / min |c|``. ``c``'s value is computed
#   again from the model's parameters and buffers (the eval-mode graph reads them unchanged) by
#   the nodes it comes from, which must all be deterministic: no placeholder (the input, or a
#   default argument whose value the trace does not know), no module call, no in-place op, no
#   random draw (only ATen ops not tagged ``nondeterministic_seeded``: not ``rand``, ``dropout``,
#   ...; Python's operators; casts; other functions may draw), and a tensor that fx made at trace
#   time (``_tensor_constant<n>``: ``torch.tensor([0.5, 0.4])`` in a forward) only where a second
#   trace makes the same graph with the same value (``torch.rand(4)`` in a forward is traced as
#   one draw, a different one each time), and no node that an in-place op may write (its value
#   at the read is not its definition's); otherwise the product has no rule. Buffers are traced as
#   get_attr nodes
#   (``proxy_buffer_attributes``) so that values computed from them are nodes too (torchvision's
#   FrozenBatchNorm2d computes ``weight * (running_var + eps).rsqrt()`` in its forward).

_NOT_FIXED = object()


def _trace(root: nn.Module, options: dict[str, bool]) -> fx.GraphModule:
    """``root`` traced by :class:`_Tracer`, leaving ``root`` as it was.

    fx stores the tensors a forward makes at trace time on the root module, as attributes
    ``_tensor_constant<n>``; the GraphModule keeps its own references and the root loses them.
    """
    before = set(vars(root))
    try:
        graph = _Tracer(**options).trace(root)
        return fx.GraphModule(root, graph)  # (compiles the graph's code: odd names may fail)
    finally:
        for name in set(vars(root)) - before:
            if name.startswith("_tensor_constant"):
                delattr(root, name)


def _reproducible_constants(
    root: nn.Module, gm: fx.GraphModule, options: dict[str, bool]
) -> frozenset[str]:
    """The trace's ``_tensor_constant<n>`` that a second trace makes again (Note [fixed tensors]).

    Empty unless the second trace gives the same code; then the constants equal in both.
    """
    names = [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "get_attr" and str(n.target).startswith("_tensor_constant")
    ]
    if not names:
        return frozenset()
    try:
        again = _trace(root, options)
    except Exception:
        return frozenset()
    if again.code != gm.code:
        return frozenset()

    def same(name: str) -> bool:
        a, b = getattr(gm, name, None), getattr(again, name, None)
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

    return frozenset(name for name in names if same(name))


_DETERMINISTIC_METHODS = frozenset(
    {"float", "double", "half", "to", "type_as", "contiguous", *_NON_TENSOR_METHODS}
)


def _deterministic(node: fx.Node) -> bool:
    """Whether a call is known to draw no random numbers (Note [fixed tensors]).

    Python's operators, ``getattr``, casts, and names of ATen ops none of whose overloads is tagged
    ``nondeterministic_seeded``; anything else (an ``fx.wrap``-ed function) may be random.
    """
    if node.op == "call_method" and node.target in _DETERMINISTIC_METHODS:
        return True
    target = node.target
    if node.op == "call_function" and (
        target is getattr or getattr(target, "__module__", "") == "_operator"
    ):
        return True
    name = target if node.op == "call_method" else getattr(target, "__name__", "")
    packet = getattr(torch.ops.aten, str(name), None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False  # unknown: maybe random
    return not any(
        torch.Tag.nondeterministic_seeded in getattr(packet, overload).tags
        for overload in packet.overloads()
    )


def _fixed_value(
    node: fx.Node,
    gm: fx.GraphModule,
    memo: dict[fx.Node, Any],
    constants: frozenset[str],
    written: set[fx.Node],
) -> Any:
    """The value of a node computed from parameters and buffers alone, or ``_NOT_FIXED``.

    Note [fixed tensors]: get_attr nodes (of the trace's tensor constants, those in
    ``constants``) and deterministic calls on fixed values.
    """
    if node in memo:
        return memo[node]
    memo[node] = value = _NOT_FIXED
    if node in written:  # replaying its definition would miss the write
        return value
    target = str(node.target)
    if node.op == "get_attr" and (not target.startswith("_tensor_constant") or target in constants):
        value = operator.attrgetter(node.target)(gm)
    elif (
        node.op in ("call_function", "call_method")
        and _deterministic(node)
        and not _inplace(node, gm)
    ):
        fixed = True

        def arg(n: fx.Node) -> Any:
            nonlocal fixed
            v = _fixed_value(n, gm, memo, constants, written)
            fixed = fixed and v is not _NOT_FIXED
            return v

        args = fx.node.map_arg(node.args, arg)
        kwargs = fx.node.map_arg(node.kwargs, arg)
        if fixed:
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                else:
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
    memo[node] = value
    return value


def _repeats(out: Sequence[int], shape: Sequence[int]) -> float:
    """``sqrt(numel(out) / numel(x))``, at least 1: ``x``'s entries each repeated as often.

    Broadcasts, ``expand`` and ``repeat`` (Note [broadcast sums]).
    """
    return math.sqrt(max(math.prod(out) / max(math.prod(shape), 1), 1.0))


def _tensor_factor(
    node: fx.Node, x: Any, c: Tensor, shapes: dict[str, tuple[int, ...]], *, divide: bool
) -> float:
    """``max |c|`` (``1 / min |c|`` for a division) times the broadcast factor of ``x``."""
    with torch.no_grad():
        mags = c.detach().abs().double()
        if divide and bool((mags == 0).any()):
            raise _Unsupported(f"no Lipschitz rule for {node.name}: division by a zero entry")
        factor = float((1.0 / mags if divide else mags).max()) if mags.numel() else 0.0
    if not math.isfinite(factor):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: a non-finite constant factor")
    if c.numel() <= 1:
        return factor  # no entry of x is repeated
    out = shapes.get(node.name)
    shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
    if out is None or shape is None:
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {_describe(node)} of an input-dependent value and "
            "a constant tensor whose shapes are unknown (it may broadcast): pass input_shape"
        )
    return factor * _repeats(out, shape)


# Position of ``inplace`` in the functional activations (it may also come as a keyword).
_INPLACE_ARG: dict[Any, int] = {
    F.relu: 1,
    F.relu6: 1,
    F.hardtanh: 3,
    F.leaky_relu: 2,
    F.elu: 2,
    F.silu: 1,
    F.mish: 1,
    F.hardswish: 1,
    F.hardsigmoid: 1,
    F.dropout: 3,
    F.dropout2d: 3,
}
# Module outputs that may be their input tensor or a view of it (Note [in-place ops]).
_ALIAS_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
# Functions and methods whose output is always a new tensor (when not in-place).
_FRESH_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.neg,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.cat,
        torch.concat,
        torch.concatenate,
        torch.mean,
        torch.clone,
        torch.relu,
        torch.tanh,
        torch.sigmoid,
        F.relu,
        F.relu6,
        F.hardtanh,
        F.tanh,
        F.sigmoid,
        F.silu,
        F.gelu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.softplus,
        F.leaky_relu,
        F.elu,
        F.pad,
        F.interpolate,
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        torch.stack,
        torch.sum,
        torch.abs,
        torch.amax,
        torch.amin,
        torch.logsumexp,
        torch.softmax,
        F.softmax,
        torch.zeros_like,
        torch.ones_like,
        torch.full_like,
        *_FUNCTIONAL_POOLS,
    }
)
_FRESH_METHODS = frozenset(
    {"add", "sub", "mul", "div", "neg", "mean", "clone", "relu", "tanh", "sigmoid"}
    | {"sum", "abs", "amax", "amin", "logsumexp", "softmax", "new_zeros", "new_ones", "new_full"}
)


def _first(node: fx.Node) -> Any:
    """A call's input: its first positional argument, else its ``input=`` keyword, else None.

    ``torch.einsum`` of one operand: that operand (its output may be a view of it, as
    ``einsum("ij->ji", x)``; with more operands it is a new tensor).
    """
    if node.op == "call_function" and node.target is torch.einsum:
        operands = _einsum_operands(node)
        return operands[0] if len(operands) == 1 else None
    return node.args[0] if node.args else node.kwargs.get("input")


def _input(node: fx.Node) -> Any:
    """:func:`_first`, refusing a call whose input is neither (``torch.split(tensor=x)``)."""
    x = _first(node)
    if x is None:
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {_describe(node)} without its input first or as "
            "input="
        )
    return x


def _fixed_arguments(node: fx.Node, lip: Callable[[Any], float]) -> None:
    """Refuse a call whose arguments besides its input depend on the input's values.

    The constant rules bound the change through the input alone: ``torch.full_like(x, x.sum())``
    changes with its fill value.
    """
    rest = (*node.args[1:], *(v for k, v in node.kwargs.items() if k != "input"))
    if any(lip(a) != 0.0 for a in rest):
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {_describe(node)} with an input-dependent "
            "argument besides its input"
        )


def _param(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Argument ``name`` of a call (keyword, else position ``index``, else ``default``)."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when the node writes into its first argument."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        f = node.target
        if f in _INPLACE_OPERATORS or getattr(f, "__name__", "").endswith("_"):  # torch.relu_
            return True
        index = _INPLACE_ARG.get(f)
        if index is not None:
            return _param(node, index, "inplace", False) is True
        return node.kwargs.get("inplace") is True
    return False


def _may_alias(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when the node's output may share memory with its first argument (a tensor)."""
    if not isinstance(_first(node), fx.Node):
        return False
    if _inplace(node, gm):
        return True
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ALIAS_MODULES)
    if node.op == "call_function":
        if node.target is getattr:  # x.T, x.data, pair.values: the same memory; x.shape: none
            return len(node.args) > 1 and node.args[1] in (*_TENSOR_ATTRIBUTES, "values", "indices")
        return node.target not in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target not in _FRESH_METHODS and node.target not in _NON_TENSOR_METHODS
    return False  # placeholder, get_attr


def _alias_group(target: fx.Node, gm: fx.GraphModule) -> set[fx.Node]:
    """``target`` and every node that may share its memory (views of it, what it views, ...)."""
    group: set[fx.Node] = set()
    stack = [target]
    while stack:
        v = stack.pop()
        if v in group:
            continue
        group.add(v)
        if _may_alias(v, gm):
            stack.append(_first(v))  # what v is a view of
        stack += [u for u in v.users if _first(u) is v and _may_alias(u, gm)]
    return group


def _repeats_entries(node: fx.Node) -> bool:
    """Whether ``node`` is a view that may show one entry of its base several times."""
    if node.op == "call_method":
        return node.target in ("expand", "expand_as", "broadcast_to")
    return node.op == "call_function" and node.target is torch.broadcast_to


def _written(gm: fx.GraphModule) -> set[fx.Node]:
    """Every node whose memory some in-place op of ``gm`` may write (Note [fixed tensors])."""
    written: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and _inplace(node, gm):
            target = _first(node)
            if isinstance(target, fx.Node):
                written |= _alias_group(target, gm)
    return written


def _propagate_inplace(
    node: fx.Node, gm: fx.GraphModule, L: dict[fx.Node, float], pairs: dict[fx.Node, float]
) -> None:
    """After an in-place ``node``, update the bounds of the tensors it wrote (Note [in-place ops]).

    Writes the rules cannot follow are refused: an ``out=`` tensor, and a write into a parameter
    or buffer (each read of it is a separate node, so later reads would keep a bound of 0).
    """
    if node.kwargs.get("out") is not None:
        raise _Unsupported(
            f"{_describe(node)} writes through out=, which the bound does not follow"
        )
    if not _may_alias(node, gm) or not _inplace(node, gm):
        return
    target = _first(node)
    group = _alias_group(target, gm)
    if any(v.op == "get_attr" for v in group):
        raise _Unsupported(f"{_describe(node)} writes in place into a parameter or buffer")
    if any(_repeats_entries(v) for v in group - {node}):
        # an expanded view holds each written entry several times: hypot below undercounts
        raise _Unsupported(f"{_describe(node)} writes in place into a tensor with an expanded view")
    for v in group - {node}:
        if v in L:
            L[v] = L[node] if v is target else math.hypot(L[v], L[node])
        if v in pairs:  # the values of a (values, indices) pair (Note [values and indices])
            pairs[v] = math.hypot(pairs[v], L[node])


def _module_factor(
    m: nn.Module,
    node: fx.Node,
    shapes: dict[str, tuple[int, ...]],
    cache: dict[tuple[int, tuple[int, ...] | None], float],
) -> float:
    name = f"{node.target} ({type(m).__name__})"
    a = node.args[0]
    in_shape = shapes.get(a.name) if isinstance(a, fx.Node) else None
    if isinstance(m, SUPPORTED_LAYERS):
        if _overrides_forward(m):
            raise _Unsupported(f"no rule for {name}: its forward is not the plain layer's")
        if isinstance(m, nn.Linear):
            return _layer_bound(m, None, cache)
        shape = in_shape
        if shape is not None:
            # (N, C, *spatial) batched, (C, *spatial) unbatched: one input is (C, *spatial)
            nd = len(m.kernel_size)
            if len(shape) not in (nd + 1, nd + 2):
                raise _Unsupported(f"no Lipschitz rule for {name}: input of shape {shape}")
            shape = shape[-(nd + 1) :]
        else:
            p = _find(m, "weight", BoundedSpectralNorm)
            shape = _layer_input_shape(p) if isinstance(p, BoundedSpectralNorm) else None
        if shape is None:
            raise _Unsupported(f"input size of {name} unknown: pass input_shape")
        return _layer_bound(m, tuple(shape), cache)
    if batchnorm_act(m):  # timm's BatchNormAct2d: BatchNorm, then its drop and act modules
        return (
            _bn_lipschitz(m)
            * _module_factor(m.drop, node, shapes, cache)
            * _module_factor(m.act, node, shapes, cache)
        )
    for kind, mode in _PADS.items():
        if isinstance(m, kind) and type(m).forward is kind.forward:
            return _pad_bound(node, in_shape, m.padding, mode)
    if isinstance(m, nn.Upsample) and type(m).forward is nn.Upsample.forward:
        options = {
            "size": m.size,
            "scale_factor": m.scale_factor,
            "mode": m.mode,
            "align_corners": m.align_corners,
            "recompute_scale_factor": m.recompute_scale_factor,
        }
        return _resample_bound(node, in_shape, lambda t: F.interpolate(t, **options), m.mode)
    # Other subclasses that override forward (MaxPool2dSame pads dynamically) compute something
    # else: no rule applies to them (BatchNorm subclasses are traced through first).
    if type(m).forward is not _known_forward(m):
        raise _Unsupported(f"no Lipschitz rule for module {name}: it overrides forward")
    try:
        if isinstance(m, InputNormalize):
            return _lipschitz_module()._normalize_lipschitz(m)
        if isinstance(m, _BATCHNORMS):
            return _bn_lipschitz(m)
        if isinstance(m, _POOLS):
            # pools act on the last nd dims, batched (N, C, *spatial) or not (C, *spatial)
            nd = _pool_dims(m)
            if in_shape is not None and len(in_shape) not in (nd + 1, nd + 2):
                raise _Unsupported(f"no Lipschitz rule for {name}: input of shape {in_shape}")
            return _pool_bound(m, None if in_shape is None else in_shape[-nd:])
        for kind, rule in _ACTIVATIONS.items():
            if isinstance(m, kind):
                return rule(m)
    except ValueError as e:  # parameters outside a rule's range
        raise _Unsupported(f"no Lipschitz rule for module {name}: {e}") from None
    raise _Unsupported(f"no Lipschitz rule for module {name}")


def _known_forward(m: nn.Module) -> Any:
    """The forward of the first rule type ``m`` is an instance of (None if none)."""
    for kind in (InputNormalize, *_BATCHNORMS, *_POOLS, *_ACTIVATIONS):
        if isinstance(m, kind):
            return kind.forward
    return None


_TENSOR_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})  # ||.|| <= ||x||
_CONSTANT_ATTRIBUTES = frozenset(
    {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"}
)


def _function_rule(
    node: fx.Node,
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    fixed: Callable[[Any], Tensor | None],
) -> float:
    f = node.target
    args, kwargs = node.args, node.kwargs
    if f in (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub):
        return _sum_rule(node, lip, shapes)
    if f in (operator.mul, operator.imul, torch.mul):
        return _scale_rule(node, args[0], args[1], lip, fixed, shapes, divide=False)
    if f in (operator.truediv, operator.itruediv, torch.div):
        if kwargs.get("rounding_mode") is not None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: rounding division jumps")
        return _scale_rule(node, args[0], args[1], lip, fixed, shapes, divide=True)
    if f in (torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack):
        return lip(args[0])  # root sum of squares over the list
    if f in _ORDER_FUNCTIONS:
        return _order_statistic_rule(node, lip, shapes)
    if f in (torch.maximum, torch.minimum):
        a, b = _input(node), _param(node, 1, "other", None)
        return _elementwise_max_rule(node, a, b, lip, shapes)
    if f in (torch.sum, torch.mean):
        return _block_sum_rule(node, lip, shapes, dtypes)
    if f in (torch.clamp, torch.clip):
        return _clamp_rule(node, lip, shapes)
    if f is operator.getitem:
        return _getitem_rule(node, lip, shapes, fixed)
    if f is getattr:  # x.T, x.data: the same values rearranged; x.shape, x.dtype: constants
        attr = args[1] if len(args) > 1 else None
        if attr in _TENSOR_ATTRIBUTES:
            return lip(args[0])
        if attr in _CONSTANT_ATTRIBUTES or lip(args[0]) == 0.0:
            return 0.0
        raise _Unsupported(f"no Lipschitz rule for {node.name}: tensor attribute {attr!r}")
    if f in _PARAMETRIZED_FUNCTIONS:
        return _parametrized_function_rule(node) * lip(args[0])
    if f in _FUNCTIONAL_LAYERS:
        return _functional_layer_rule(node, lip, shapes, fixed)
    if f is torch.einsum or f in _MATMUL_FUNCTIONS:
        return _einsum_call_rule(node, lip, shapes, fixed)
    if f is F.pad:
        x = args[0]
        shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
        pad, mode = _param(node, 1, "pad", None), _param(node, 2, "mode", "constant")
        _fixed_arguments(node, lip)  # a fill value computed from the input moves with it
        return _pad_bound(node, shape, pad, mode) * lip(x)
    if f is F.interpolate:
        options = {k: _param(node, i, k, d) for i, (k, d) in enumerate(_INTERPOLATE_ARGS, 1)}
        x = args[0]
        in_shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
        traced: list[fx.Node] = []
        fx.node.map_arg(options, traced.append)
        if traced:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: interpolate with traced sizes")
        resample = lambda t: F.interpolate(t, **options)  # noqa: E731
        return _resample_bound(node, in_shape, resample, options["mode"]) * lip(x)
    if f in _FUNCTIONAL_POOLS:
        return _functional_pool_rule(node, lip, shapes)
    if f in _FUNCTION_CONSTANTS:
        _fixed_arguments(node, lip)
        return _FUNCTION_CONSTANTS[f] * lip(_input(node))
    name = getattr(f, "__name__", str(f))
    raise _Unsupported(f"no Lipschitz rule for function {name} ({node.name})")


# Note [broadcast sums]
#   ``a + b`` has ``||d(a + b)|| <= ||da|| + ||db||`` only when neither operand is broadcast. An
#   operand of n elements broadcast to an output of N elements repeats each entry N/n times (n
#   divides N), so its change has norm sqrt(N/n) ||da||: ``fc(x) (one logit) + zeros(1, 100)``
#   moves 100 entries by the same amount, sqrt(100) times the logit's change. So each
#   input-dependent operand counts sqrt(numel(out) / numel(operand)), from the shapes recorded
#   by one run of the graph. Without them (no input shape known) a sum of input-dependent values
#   gets no bound.


def _sum_rule(
    node: fx.Node, lip: Callable[[Any], float], shapes: dict[str, tuple[int, ...]]
) -> float:
    """``a + alpha * b`` / ``a - alpha * b`` (functions, methods, in-place): Note [broadcast sums]."""
    a, b = _input(node), _param(node, 1, "other", None)
    alpha = _const(node.kwargs.get("alpha", 1))
    if alpha is None:
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: {_describe(node)} with a tensor alpha"
        )
    bound_a, bound_b = _broadcast_bounds(node, (a, b), lip, shapes)
    return bound_a + abs(alpha) * bound_b


def _block_sum_rule(
    node: fx.Node,
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
) -> float:
    """``x.sum(dims)``: ``sqrt(n)``; ``x.mean(dims)``: ``1 / sqrt(n)`` (1 without shapes).

    Each output sums a disjoint block of ``n = numel(x) / numel(out)`` entries, and
    ``|sum d| <= sqrt(n) ||d||`` (Cauchy-Schwarz, equality for constant ``d``). An integer sum
    rounds: no rule.
    """
    x = _input(node)
    out = shapes.get(node.name)
    shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
    mean = node.target in (torch.mean, "mean")
    if out is None or shape is None:
        if mean:
            return lip(x)
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: a sum of a value whose shape is unknown: pass "
            "input_shape"
        )
    if not dtypes[node.name].is_floating_point:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: a sum to {dtypes[node.name]}")
    n = math.prod(shape) / max(math.prod(out), 1)
    return (1.0 / math.sqrt(n) if mean else math.sqrt(n)) * lip(x)


def _clamp_rule(
    node: fx.Node, lip: Callable[[Any], float], shapes: dict[str, tuple[int, ...]]
) -> float:
    """``x.clamp(lo, hi)`` with limits that do not depend on the input: 1-Lipschitz entrywise.

    A tensor limit that broadcasts ``x`` up repeats its entries (Note [broadcast sums]).
    """
    x = _input(node)
    limits = [_param(node, i, k, None) for i, k in ((1, "min"), (2, "max"))]
    if any(lip(a) != 0.0 for a in limits):
        raise _Unsupported(f"no Lipschitz rule for {node.name}: clamp to input-dependent limits")
    if all(a is None or _const(a) is not None for a in limits):
        return lip(x)
    return _broadcast_bounds(node, (x,), lip, shapes)[0]  # tensor limits may broadcast x up


# Functional activations with parameters: name, then (position, default) of each parameter.
_PARAMETRIZED_FUNCTIONS: dict[Any, tuple[str, dict[str, tuple[int, Any]]]] = {
    F.leaky_relu: ("leaky_relu", {"negative_slope": (1, 0.01)}),
    F.elu: ("elu", {"alpha": (1, 1.0)}),
    F.hardtanh: ("hardtanh", {"min_val": (1, -1.0), "max_val": (2, 1.0)}),
    F.softplus: ("softplus", {"beta": (1, 1.0), "threshold": (2, 20.0)}),
    F.dropout: ("dropout", {"p": (1, 0.5), "training": (2, True)}),
    F.dropout2d: ("dropout2d", {"p": (1, 0.5), "training": (2, True)}),
}


def _reinterprets(node: fx.Node, dtypes: dict[str, torch.dtype]) -> bool:
    """Whether a ``.view`` reinterprets bits: a dtype argument, ``.dtype`` read or changed dtype."""
    a = node.args[0]
    if isinstance(a, fx.Node) and node.name in dtypes and a.name in dtypes:
        return dtypes[node.name] != dtypes[a.name]
    return any(
        isinstance(b, torch.dtype)
        or (isinstance(b, fx.Node) and b.target is getattr and b.args[1:2] == ("dtype",))
        for b in (*node.args[1:], *node.kwargs.values())
    )


def _parametrized_function_rule(node: fx.Node) -> float:
    """The Lipschitz factor of a functional activation or dropout, from its arguments.

    The activations use the slope rules of lipschitz.py (Note [activation parameters]).
    ``F.dropout`` applies dropout unless ``training=False`` (its default is True, in eval mode
    too): a mask of 0 and ``1 / (1 - p)``, so ``1 / (1 - p)``.
    """
    fname, spec = _PARAMETRIZED_FUNCTIONS[node.target]
    values: dict[str, Any] = {}
    for key, (index, default) in spec.items():
        value = _param(node, index, key, default)
        values[key] = value if key == "training" else _const(value)
        if values[key] is None or (key == "training" and not isinstance(value, bool)):
            raise _Unsupported(f"no Lipschitz rule for {node.name}: {fname} {key}={value!r}")
    lip = _lipschitz_module()
    try:
        if fname.startswith("dropout"):
            p = values["p"]
            if not values["training"]:
                return 1.0
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout probability {p} is not in [0, 1]")
            return 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        slopes = {
            "leaky_relu": lambda v: lip._leaky_relu_slopes(v["negative_slope"]),
            "elu": lambda v: lip._elu_slopes(v["alpha"]),
            "hardtanh": lambda v: lip._hardtanh_slopes(v["min_val"], v["max_val"]),
            "softplus": lambda v: lip._softplus_slopes(v["beta"], v["threshold"]),
        }[fname](values)
    except ValueError as e:
        raise _Unsupported(f"no Lipschitz rule for {node.name}: {e}") from None
    return lip._slope_lipschitz(slopes)


def _scale_rule(
    node: fx.Node,
    a: Any,
    b: Any,
    lip: Callable[[Any], float],
    fixed: Callable[[Any], Tensor | None],
    shapes: dict[str, tuple[int, ...]],
    *,
    divide: bool,
) -> float:
    """``a * b`` with one factor constant (a number or a fixed tensor), or ``a / b``, b constant.

    Note [fixed tensors].
    """
    if lip(a) == 0.0 and lip(b) == 0.0:
        return 0.0
    for x, c in ((a, b),) if divide else ((a, b), (b, a)):
        if lip(c) != 0.0:
            continue
        k = _const(c)
        if k is not None:
            if divide:
                return lip(x) / abs(k) if k != 0 else math.inf
            return abs(k) * lip(x)
        value = fixed(c)
        if value is not None:
            return _tensor_factor(node, x, value, shapes, divide=divide) * lip(x)
    what = "division by a tensor" if divide else "product of a tensor and a tensor"
    raise _Unsupported(f"no Lipschitz rule for {node.name}: {what}")


def _literal_index(index: list | tuple) -> Tensor | None:
    """A (nested) list of ints or of bools as a tensor; None for anything else."""
    flat, stack = [], [index]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            flat.append(item)
    kinds = {type(v) for v in flat}
    if not kinds <= {int} and kinds != {bool}:
        return None
    return torch.tensor(index, dtype=torch.bool if kinds == {bool} else torch.long)


def _getitem_rule(
    node: fx.Node,
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
    fixed: Callable[[Any], Tensor | None],
) -> float:
    """``x[...]``: 1 for basic indexing (each entry read at most once), else ``sqrt(max repeats)``.

    Advanced indices must be known without the input (lists of ints, buffers, boolean masks):
    together they pick index tuples (broadcast against each other, a mask standing for its
    ``nonzero()``), and an entry is read as often as its tuple repeats.
    """
    base, index = node.args[0], node.args[1]
    if lip(base) == 0.0:
        return 0.0
    basic = (int, slice, type(None), type(Ellipsis))
    parts = index if isinstance(index, tuple) else (index,)
    advanced = [k for k, i in enumerate(parts) if not isinstance(i, basic)]
    if not advanced:
        return lip(base)  # a selection without repetition
    values: dict[int, Tensor] = {}
    for k in advanced:
        i = parts[k]
        value = _literal_index(i) if isinstance(i, (list, tuple)) else fixed(i)
        if value is None or value.is_floating_point() or value.is_complex():
            raise _Unsupported(f"no Lipschitz rule for {node.name}: an index that is not fixed")
        values[k] = value.detach().cpu()
    if len(values) == 1 and values[advanced[0]].dtype == torch.bool:
        return lip(base)  # a mask reads each entry at most once
    columns: list[Tensor] = []  # one integer index per indexed dim
    dims: list[int] = []  # the input dim each indexes; negative after an Ellipsis (not known)
    dim = 0
    for k, part in enumerate(parts):
        if part is None:  # a new dim of the output, none of the input
            continue
        if part is Ellipsis:
            dim = -(10**9)
            continue
        if k not in values:
            dim += 1
            continue
        value = values[k]
        for column in value.nonzero(as_tuple=True) if value.dtype == torch.bool else (value,):
            columns.append(column.long())
            dims.append(dim)
            dim += 1
    # (indices that do not broadcast, or ragged lists, fail in the forward: the shape pass)
    columns = list(torch.broadcast_tensors(*columns))
    tuples = torch.stack([c.flatten() for c in columns], 1)
    if tuples.numel() == 0:
        return 0.0
    if bool((tuples < 0).any()):  # -1 and n - 1 are the same entry: wrap with the dim's size
        shape = shapes.get(base.name)
        if shape is None:
            raise _Unsupported(
                f"no Lipschitz rule for {node.name}: negative indices into a dim of unknown size: "
                "pass input_shape"
            )
        if any(d < 0 for d in dims):
            raise _Unsupported(
                f"no Lipschitz rule for {node.name}: negative indices after an Ellipsis"
            )
        tuples = tuples % torch.tensor([shape[d] for d in dims])
    counts = torch.unique(tuples, dim=0, return_counts=True)[1]
    return math.sqrt(int(counts.max())) * lip(base)


def _cast_rule(node: fx.Node, lip: Callable[[Any], float], dtypes: dict[str, torch.dtype]) -> float:
    """``.to(...)`` / ``.type_as(t)``: 1 to a floating dtype; a cast to an integer dtype rounds."""
    rest = (*node.args[1:], *node.kwargs.values())
    targets = [a for a in rest if isinstance(a, torch.dtype)]
    if node.name in dtypes:
        targets.append(dtypes[node.name])
    elif node.target == "type_as" or any(isinstance(a, fx.Node) for a in rest):
        raise _Unsupported(
            f"no Lipschitz rule for {node.name}: .{node.target}() to a dtype known only at run "
            "time: pass input_shape"
        )
    for dtype in targets:
        if not dtype.is_floating_point:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: a cast to {dtype} rounds")
    return lip(node.args[0])


def _method_rule(
    node: fx.Node,
    lip: Callable[[Any], float],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    fixed: Callable[[Any], Tensor | None],
) -> float:
    name = node.target
    args = node.args
    if name in _NON_TENSOR_METHODS:
        return 0.0
    if name in ("to", "type_as"):
        return _cast_rule(node, lip, dtypes)
    if name in ("add", "add_", "sub", "sub_"):
        return _sum_rule(node, lip, shapes)
    if name in ("mul", "mul_"):
        return _scale_rule(node, args[0], args[1], lip, fixed, shapes, divide=False)
    if name in ("div", "div_"):
        if node.kwargs.get("rounding_mode") is not None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: rounding division jumps")
        return _scale_rule(node, args[0], args[1], lip, fixed, shapes, divide=True)
    if name in ("expand", "expand_as", "repeat"):  # every entry copied numel(out)/numel(in) times
        out, shape = shapes.get(node.name), shapes.get(getattr(args[0], "name", ""))
        if out is None or shape is None:
            raise _Unsupported(
                f"no Lipschitz rule for {node.name}: .{name}() of a value whose shape is unknown: "
                "pass input_shape"
            )
        return _repeats(out, shape) * lip(args[0])
    if name in ("sum", "mean"):
        return _block_sum_rule(node, lip, shapes, dtypes)
    if name in _ORDER_STATISTICS:
        return _order_statistic_rule(node, lip, shapes)
    if name in ("maximum", "minimum"):
        a, b = args[0], _param(node, 1, "other", None)
        return _elementwise_max_rule(node, a, b, lip, shapes)
    if name in ("clamp", "clamp_", "clip", "clip_"):
        return _clamp_rule(node, lip, shapes)
    if name in _MATMUL_METHODS:
        return _einsum_call_rule(node, lip, shapes, fixed)
    if name in _METHOD_CONSTANTS:
        if name == "view" and _reinterprets(node, dtypes):
            raise _Unsupported(f"no Lipschitz rule for {node.name}: .view(dtype) reinterprets bits")
        if name not in ("reshape_as", "view_as"):  # (the other tensor gives only a shape)
            _fixed_arguments(node, lip)
        return _METHOD_CONSTANTS[name] * lip(args[0])
    raise _Unsupported(f"no Lipschitz rule for method .{name}() ({node.name})")
