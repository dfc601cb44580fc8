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

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from sn_lightning.models.normalize import InputNormalize
from sn_lightning.spectral.ops import (
    SUPPORTED_LAYERS,
    OperatorSpec,
    _effective_weight,
    _float_dtype,
    _power_iteration,
)
from sn_lightning.spectral.parametrization import (
    BoundedBatchNormScale,
    BoundedSpectralNorm,
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
        """JSON-ready dict (infinite values become the string ``"inf"``)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isinf(x):
                return "inf" if x > 0 else "-inf"
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
    """Operator-norm estimate of the weight in use, from a copy of u (random start for matrix)."""
    shape = _layer_input_shape(p)
    if p.method == "matrix" and shape is None and not isinstance(layer, nn.Linear):
        return float(p.sigma(W, n_iter))  # no shape: only the matrix norm is defined
    spec = OperatorSpec.from_layer(layer, shape)
    W = W.to(_float_dtype(W.dtype))
    if p.method == "operator":
        u = p.u.detach().clone().to(W.dtype)
    else:
        gen = torch.Generator(device=W.device).manual_seed(0)
        u = torch.randn(spec.u_shape, generator=gen, device=W.device, dtype=W.dtype)
    with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
        _, _, sigma = _power_iteration(*spec.operator(W), u, n_iter)
    return float(sigma)


def spectral_norm_report(
    model: nn.Module, n_iter: int = 50, *, input_shape: Sequence[int] | None = None
) -> SpectralNormReport:
    """Per-layer norms and a sound network bound; changes no state of ``model``.

    Args:
        model: a model after ``apply_spectral_norm`` (or any model: rows are then empty and only
            the network bound is computed).
        n_iter: power-iteration rounds for each layer's sigma, from a copy of its ``u``.
        input_shape: ``(C, H, W)`` of one model input. Needed for the network bound when a
            convolution is not normalized (its input size is otherwise unknown); it also lets
            pooling layers use exact, shape-aware constants.

    Returns:
        A :class:`SpectralNormReport`; ``str(report)`` is a table, ``report.as_dict()`` JSON.
    """
    sync_batchnorm_bounds(model)
    cache: dict[tuple[int, tuple[int, ...] | None], float] = {}
    rows: list[LayerReport] = []
    for name, (m, p) in normalized_layers(model).items():
        W = _effective_weight(m)
        if isinstance(p, BoundedBatchNormScale):
            s = float(_bn_lipschitz(m))
            rows.append(
                LayerReport(name, type(m).__mro__[1].__name__, None, s, s, p.beta, "batchnorm")
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


# sup |f'| of elementwise activations (rounded up where irrational).
_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], float]] = {
    nn.ReLU: lambda m: 1.0,
    nn.ReLU6: lambda m: 1.0,
    nn.Hardtanh: lambda m: 1.0,
    nn.Tanh: lambda m: 1.0,
    nn.Softsign: lambda m: 1.0,
    nn.Softplus: lambda m: 1.0,
    nn.CELU: lambda m: 1.0,
    nn.Sigmoid: lambda m: 0.25,
    nn.Hardsigmoid: lambda m: 1.0 / 6.0,
    nn.Hardswish: lambda m: 1.5,
    nn.SiLU: lambda m: 1.1,  # 1.09984
    nn.Mish: lambda m: 1.089,  # 1.08850
    nn.GELU: lambda m: 1.13,  # 1.12890 (erf), 1.12899 (tanh)
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)),
    nn.ELU: lambda m: max(1.0, m.alpha),
    nn.SELU: lambda m: 1.0507009873554805 * 1.6732632423543772,
    nn.PReLU: lambda m: max(1.0, float(m.weight.detach().abs().max())),
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
    F.hardtanh: 1.0,
    torch.tanh: 1.0,
    F.tanh: 1.0,
    torch.sigmoid: 0.25,
    F.sigmoid: 0.25,
    F.silu: 1.1,
    F.gelu: 1.13,
    F.mish: 1.089,
    F.hardswish: 1.5,
    F.hardsigmoid: 1.0 / 6.0,
    F.softplus: 1.0,
    F.dropout: 1.0,
    F.dropout2d: 1.0,
    torch.flatten: 1.0,
    torch.reshape: 1.0,
    torch.permute: 1.0,
    torch.transpose: 1.0,
    torch.squeeze: 1.0,
    torch.unsqueeze: 1.0,
    torch.mean: 1.0,  # means over disjoint blocks: norm 1/sqrt(block) <= 1
    torch.clone: 1.0,
    operator.neg: 1.0,
    operator.pos: 1.0,
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
    "mean": 1.0,
    "clone": 1.0,
    "float": 1.0,
    "to": 1.0,
    "type_as": 1.0,
    "chunk": 1.0,  # tuple of disjoint parts; each part is <= L
    "split": 1.0,
    "unbind": 1.0,
    "neg": 1.0,
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
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LEAVES = SUPPORTED_LAYERS + _POOLS + _BATCHNORMS + tuple(_ACTIVATIONS) + (InputNormalize,)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


def _bn_lipschitz(bn: nn.Module) -> float:
    """Eval-mode BatchNorm: ``max_i |gamma_i| / sqrt(running_var_i + eps)``."""
    if bn.running_var is None:
        raise _Unsupported(f"{type(bn).__name__} without running stats (batch statistics)")
    with torch.no_grad():
        inv = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
        if bn.affine:
            inv = inv * _effective_weight(bn).double().abs()
    return float(inv.max())


def _schur_bound(pool: Callable[[Tensor], Tensor], spatial: Sequence[int]) -> float:
    """``sqrt(max row sum * max column sum)`` of a nonnegative linear pooling map (Schur test)."""
    x = torch.zeros((1, 1, *spatial), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = pool(x)
        (col,) = torch.autograd.grad(y, x, torch.ones_like(y))
    with torch.no_grad():
        row = pool(torch.ones_like(x))
    return math.sqrt(float(col.max()) * float(row.max()))


def _pool_bound(m: nn.Module, spatial: Sequence[int] | None) -> float:
    """Sound l2 Lipschitz constant of a pooling layer (input ``spatial`` size if known).

    Max pooling: ``|max a - max b| <= ||a - b||`` over a window, so
    ``||P x - P y||^2 <= sum_windows ||x_w - y_w||^2 <= c ||x - y||^2`` with c the max number
    of windows covering a pixel: ``L = sqrt(c)``. Average pooling is linear with nonnegative
    entries: Schur test ``L <= sqrt(max row sum * max column sum)``. Without a shape:
    ``c <= prod ceil(k / (s / gcd(d, s)))`` (for each tap at most one window start), and plain
    average pools give ``sqrt(c / prod k)``.
    """
    from sn_lightning.lipschitz import max_pool_lipschitz  # here: lipschitz imports spectral

    nd = {"1d": 1, "2d": 2, "3d": 3}[type(m).__name__[-2:]]
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
        if all(o == 1 for o in out):
            return 1.0  # one window (global average <= 1, global max = 1)
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
    InputNormalize: ``1/min(std)``; eval BatchNorm: ``max |gamma| / sqrt(var + eps)``;
    elementwise activations: ``sup |f'|`` (ReLU 1, Sigmoid 1/4, LeakyReLU ``max(1, |slope|)``,
    ELU ``max(1, alpha)``, GELU 1.13, SiLU 1.1, ...); reshapes, Dropout, Identity, means: 1;
    pools: see :func:`_pool_bound`; ``a + b``, ``a - b``: ``L(a) + L(b)``; ``cat``:
    ``sqrt(sum L_i^2)``; scalar ``c * a``, ``a / c``: ``|c| L(a)``; values that do not depend on
    the input (parameters, sizes): 0. Anything else: no bound.

    Args:
        model: the network; its forward must take the input tensor as first argument.
        input_shape: ``(C, H, W)`` of one input; enables shape-aware rules and unnormalized
            convolutions (otherwise their recorded shape from ``apply_spectral_norm`` is used).

    Returns:
        ``(bound, "")`` or ``(None, reason)``.
    """
    return _network_bound(model, input_shape, {})


def _network_bound(
    model: nn.Module,
    input_shape: Sequence[int] | None,
    cache: dict[tuple[int, tuple[int, ...] | None], float],
) -> tuple[float | None, str]:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {first}"
    gm = fx.GraphModule(model, graph)
    shapes: dict[str, tuple[int, ...]] = {}
    if input_shape is not None:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
            dtype = param.dtype if param is not None else torch.float32
            with torch.no_grad():
                fx.passes.shape_prop.ShapeProp(gm).propagate(
                    torch.zeros((1, *input_shape), device=device, dtype=dtype)
                )
        except Exception as e:
            return None, f"shape propagation failed: {type(e).__name__}: {e}"
        finally:
            for m, mode in modes:
                m.training = mode
        for node in gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                shapes[node.name] = tuple(meta.shape)
    try:
        return _propagate(gm, shapes, cache), ""
    except _Unsupported as e:
        return None, str(e)


def _propagate(
    gm: fx.GraphModule,
    shapes: dict[str, tuple[int, ...]],
    cache: dict[tuple[int, tuple[int, ...] | None], float],
) -> float:
    L: dict[fx.Node, float] = {}
    n_inputs = 0

    def lip(a: Any) -> float:
        if isinstance(a, fx.Node):
            return L[a]
        if isinstance(a, (list, tuple)):
            return math.sqrt(sum(lip(x) ** 2 for x in a))
        if isinstance(a, dict):
            return math.sqrt(sum(lip(x) ** 2 for x in a.values()))
        return 0.0  # a constant

    def in_spatial(node: fx.Node) -> tuple[int, ...] | None:
        a = node.args[0]
        shape = shapes.get(a.name) if isinstance(a, fx.Node) else None
        return None if shape is None else shape[2:]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            L[node] = 1.0 if n_inputs == 0 else 0.0  # later placeholders keep their defaults
            n_inputs += 1
        elif node.op == "get_attr":
            L[node] = 0.0
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise _Unsupported(f"model returns a {type(out).__name__}, not one tensor")
            return L[out]
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            L[node] = _module_factor(m, node, shapes, in_spatial(node), cache) * lip(node.args[0])
        elif node.op in ("call_function", "call_method") and _constant(node, lip):
            L[node] = 0.0  # shapes, asserts, parameters: nothing here depends on the input values
        elif node.op == "call_function":
            L[node] = _function_rule(node, lip)
        elif node.op == "call_method":
            L[node] = _method_rule(node, lip)
        else:  # pragma: no cover - fx has no other ops
            raise _Unsupported(f"unknown fx op {node.op}")
    raise _Unsupported("graph has no output")


def _constant(node: fx.Node, lip: Callable[[Any], float]) -> bool:
    """True when no argument depends on the input values (L = 0 for all of them)."""
    return all(lip(a) == 0.0 for a in (*node.args, *node.kwargs.values()))


def _module_factor(
    m: nn.Module,
    node: fx.Node,
    shapes: dict[str, tuple[int, ...]],
    spatial: tuple[int, ...] | None,
    cache: dict[tuple[int, tuple[int, ...] | None], float],
) -> float:
    name = f"{node.target} ({type(m).__name__})"
    if isinstance(m, SUPPORTED_LAYERS):
        if _overrides_forward(m):
            raise _Unsupported(f"no rule for {name}: its forward is not the plain layer's")
        if isinstance(m, nn.Linear):
            return _layer_bound(m, None, cache)
        a = node.args[0]
        shape = shapes.get(a.name) if isinstance(a, fx.Node) else None
        if shape is not None:
            shape = shape[1:]
        else:
            p = (
                next(
                    (q for q in m.parametrizations.weight if isinstance(q, BoundedSpectralNorm)),
                    None,
                )
                if hasattr(m, "parametrizations")
                else None
            )
            shape = _layer_input_shape(p) if p is not None else None
        if shape is None:
            raise _Unsupported(f"input size of {name} unknown: pass input_shape")
        return _layer_bound(m, tuple(shape), cache)
    # Subclasses that override forward (timm's BatchNormAct2d adds an activation,
    # MaxPool2dSame pads dynamically) compute something else: no rule applies to them.
    if type(m).forward is not _known_forward(m):
        raise _Unsupported(f"no Lipschitz rule for module {name}: it overrides forward")
    if isinstance(m, InputNormalize):
        return m.lipschitz()
    if isinstance(m, _BATCHNORMS):
        return _bn_lipschitz(m)
    if isinstance(m, _POOLS):
        return _pool_bound(m, spatial)
    for kind, rule in _ACTIVATIONS.items():
        if isinstance(m, kind):
            return rule(m)
    raise _Unsupported(f"no Lipschitz rule for module {name}")


def _known_forward(m: nn.Module) -> Any:
    """The forward of the first rule type ``m`` is an instance of (None if none)."""
    for kind in (InputNormalize, *_BATCHNORMS, *_POOLS, *_ACTIVATIONS):
        if isinstance(m, kind):
            return kind.forward
    return None


def _function_rule(node: fx.Node, lip: Callable[[Any], float]) -> float:
    f = node.target
    args, kwargs = node.args, node.kwargs
    if f in (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub):
        alpha = _const(kwargs.get("alpha", 1))
        if alpha is None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: {f} with a tensor alpha")
        return lip(args[0]) + abs(alpha) * lip(args[1])
    if f in (operator.mul, operator.imul, torch.mul):
        return _scale_rule(node, args[0], args[1], lip, divide=False)
    if f in (operator.truediv, operator.itruediv, torch.div):
        if lip(args[1]) != 0.0 or _const(args[1]) is None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: division by a tensor")
        return _scale_rule(node, args[0], args[1], lip, divide=True)
    if f in (torch.cat, torch.concat, torch.concatenate):
        return lip(args[0])  # root sum of squares over the list
    if f is operator.getitem:
        return _getitem_rule(node, lip)
    if f is getattr:
        return 0.0
    if f in (F.leaky_relu,):
        slope = _const(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))
        if slope is None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: leaky_relu slope")
        return max(1.0, abs(slope)) * lip(args[0])
    if f in (F.elu,):
        alpha = _const(args[1] if len(args) > 1 else kwargs.get("alpha", 1.0))
        if alpha is None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: elu alpha")
        return max(1.0, alpha) * lip(args[0])
    if f in (
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool2d,
    ):
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        if size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size)):
            return lip(args[0])
        raise _Unsupported(f"no Lipschitz rule for {node.name}: {f.__name__}({size})")
    if f in _FUNCTION_CONSTANTS:
        return _FUNCTION_CONSTANTS[f] * lip(args[0])
    name = getattr(f, "__name__", str(f))
    raise _Unsupported(f"no Lipschitz rule for function {name} ({node.name})")


def _scale_rule(
    node: fx.Node, a: Any, b: Any, lip: Callable[[Any], float], *, divide: bool
) -> float:
    if divide:
        c = _const(b)
        assert c is not None
        return lip(a) / abs(c) if c != 0 else math.inf
    for x, c in ((a, _const(b)), (b, _const(a))):
        if c is not None:
            return abs(c) * lip(x)
    if lip(a) == 0.0 and lip(b) == 0.0:
        return 0.0
    raise _Unsupported(f"no Lipschitz rule for {node.name}: product of a tensor and a tensor")


def _getitem_rule(node: fx.Node, lip: Callable[[Any], float]) -> float:
    base, index = node.args[0], node.args[1]
    if lip(base) == 0.0:
        return 0.0
    basic = (int, slice, type(None), type(Ellipsis))
    parts = index if isinstance(index, tuple) else (index,)
    if all(isinstance(i, basic) for i in parts):
        return lip(base)  # a selection without repetition
    raise _Unsupported(f"no Lipschitz rule for {node.name}: advanced indexing")


def _method_rule(node: fx.Node, lip: Callable[[Any], float]) -> float:
    name = node.target
    args = node.args
    if name in _NON_TENSOR_METHODS:
        return 0.0
    if name in ("add", "add_", "sub", "sub_"):
        alpha = _const(node.kwargs.get("alpha", 1))
        if alpha is None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: {name} with a tensor alpha")
        return lip(args[0]) + abs(alpha) * lip(args[1])
    if name in ("mul", "mul_"):
        return _scale_rule(node, args[0], args[1], lip, divide=False)
    if name in ("div", "div_"):
        if _const(args[1]) is None:
            raise _Unsupported(f"no Lipschitz rule for {node.name}: division by a tensor")
        return _scale_rule(node, args[0], args[1], lip, divide=True)
    if name in _METHOD_CONSTANTS:
        return _METHOD_CONSTANTS[name] * lip(args[0])
    raise _Unsupported(f"no Lipschitz rule for method .{name}() ({node.name})")
