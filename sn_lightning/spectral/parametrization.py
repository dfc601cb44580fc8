"""The bounded spectral norm as a ``torch.nn.utils.parametrize`` parametrization.

``W -> W / max(1, sigma(W) / beta)`` (Farnia, Zhang, Tse, ICLR 2019; PAPERS 1.1-1.2), with sigma the
operator norm of the layer's linear map at its real input size, estimated by power iteration with
a persistent vector ``u`` (one input-shaped tensor, saved in the state dict). The math lives in
:mod:`sn_lightning.spectral.ops`; this module holds the state and the registrars (torch's
``_SpectralNorm`` pattern).

Note [buffer updates]
    ``u`` is written only in training mode, outside :func:`freeze_spectral_norm`, under
    ``no_grad``. Every forward, whatever the mode, computes the weight the same way: take
    ``n_power_iterations - 1`` rounds from the stored ``u``, estimate ``sigma = ||A u||``, rescale
    (Note [estimate, then advance] in ``ops``). Eval, frozen and training forwards therefore use
    the same function of ``(W, u)``; training additionally advances ``u`` by the adjoint half
    round and stores it. The reference likewise never writes the vector in attack and
    evaluation forwards. On CPU a training forward of a Conv/Linear layer computes ``A u`` as one
    more image of its own batch and, when a backward follows, advances ``u`` during that
    backward (:mod:`sn_lightning.spectral.fused`): same values, fewer passes.

Note [torch.func]
    Inside a ``torch.func`` transform (``jvp``, ``jacrev``, ``vmap``, ``grad``) the rescale is
    plain autograd through ``sigma = <A_W u, v>`` (what ``_BoundedRescale`` computes, which has
    no ``setup_context`` and so cannot run there), the CPU fold and the CUDA group step aside,
    and a training forward raises (storing ``u`` writes a captured buffer).

Note [float32 under autocast]
    Power iteration runs with autocast disabled, in ``promote_types(weight.dtype, float32)``:
    bf16/fp16 iterates lose the top singular value to rounding. ``u`` is created in float32. On
    CUDA the iteration also turns off cuDNN's TF32 convolutions (on by default in PyTorch; ~1e-3
    relative error): the iterates are single-image convolutions, so exact float32 costs nothing.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sn_lightning.modes import eval_mode
from sn_lightning.spectral import fused
from sn_lightning.spectral.ops import (
    SUPPORTED_LAYERS,
    LinearOp,
    OperatorSpec,
    _estimate,
    _float_dtype,
    _krylov_top,
    _power_iteration,
    _transforms_active,
    _unit_blocks,
    linear_operator,
)

__all__ = [
    "METHODS",
    "BoundedBatchNormScale",
    "BoundedSpectralNorm",
    "bounded_spectral_norm",
    "freeze_spectral_norm",
    "refresh_spectral_norm",
    "remove_bounded_spectral_norm",
]

METHODS: tuple[str, ...] = ("operator", "matrix")
# Krylov steps of refresh_spectral_norm by default and after a plain checkpoint is loaded
REFRESH_ITERATIONS = 50


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta > 0:
        raise ValueError(f"beta must be a number > 0 (math.inf: no bound), got {beta!r}")
    return float(beta)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(name: str, value: bool) -> bool:
    """True/False only: ``bool("no")`` is True, so strings and numbers are refused."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_TF32_FLAGS = (torch.backends.cudnn, torch.backends.cuda.matmul)


def _flag_on(backend: Any) -> bool:
    try:
        return bool(backend.allow_tf32)
    except RuntimeError:  # the new fp32_precision API is in use: leave the user's choice
        return False


@contextlib.contextmanager
def _tf32_off() -> Iterator[None]:
    """Run cuDNN convolutions and CUDA matmuls in IEEE float32 (TF32: ~1e-3 relative error).

    PyTorch lets convolutions use TF32 by default, and ``set_float32_matmul_precision("high")``
    (Lightning's advice on Ampere and later) does the same for matmuls. The flags are process
    globals, switched only while a power iteration runs and restored after it.
    """
    on = [b for b in _TF32_FLAGS if _flag_on(b)]
    for b in on:
        b.allow_tf32 = False
    try:
        yield
    finally:
        for b in on:
            b.allow_tf32 = True


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Power-iteration arithmetic: autocast off, and on CUDA no TF32 convolutions."""
    if device_type != "cuda":
        return _autocast_off(device_type)
    stack = contextlib.ExitStack()
    stack.enter_context(_autocast_off(device_type))
    stack.enter_context(_tf32_off())
    return stack


def _host_sigma(sigma: Tensor) -> float | None:
    """Return sigma as a Python float on CPU, None on accelerators.

    On CPU the value is free and lets the rescale skip layers already within beta; on an
    accelerator reading it is a host sync per layer, which costs more than the multiply.
    """
    return float(sigma) if sigma.device.type == "cpu" else None


def _coefficients(sigma: Tensor, v: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(scale, k v)``: ``scale = min(1, beta / sigma)`` (0-dim), ``k = [sigma > beta] (-scale / sigma)``.

    The rescaled weight is ``scale W``, its gradient ``scale g + <g, W> d<A_W u, k v>/dW``
    (:class:`_BoundedRescale`). Tensors, so accelerators never sync to branch on sigma; ``k``
    comes premultiplied into the small ``v``.
    """
    scale = torch.clamp(beta / sigma, max=1.0)
    return scale, v * torch.where(sigma > beta, -scale / sigma, 0.0)


class _IterationGraph:
    """One layer's power iteration, and the backward of its rescale, captured as CUDA graphs.

    Note [CUDA graphs]
        On a GPU a power-iteration round and the fused backward are two dozen tiny kernels per
        layer, so a training step with SN is bound by the host launching them (ResNet-18 at
        batch 128 on an H100: 3.2x plain eager, built-in spectral_norm 2.3x). Replaying captured
        graphs launches each group at once (1.9x; benchmarks/sn_overhead.py --device cuda).

        Forward graph: reads the weight and ``u`` at the addresses it was captured with, writes
        ``u`` back (training) and ``(u, k v, sigma, scale)`` into one static buffer that is
        cloned right after the replay, since a second forward before the backward must not
        overwrite what the first saved. Backward graph: the incoming gradient and that clone
        are copied into static buffers, the replay computes the gradient in place in the
        gradient buffer, and the result is cloned. The gradient buffer is shared by all layers
        of one weight shape (:func:`_shared_buffer`): backward graphs run one at a time, and
        each result is cloned before the next copy-in.

        Graphs are keyed by the addresses and every setting they bake in, and re-captured when
        one changes (``model.to()``, ``load_state_dict(assign=True)``, a new beta). Capture is
        skipped under ``torch.compile``, inside a user's own capture and in ``DataParallel``
        replicas (rebuilt every step); a failed capture warns once and the layer runs eagerly.
    """

    def __init__(self, norm: BoundedSpectralNorm, weight: Tensor, update: bool) -> None:
        self.weight_ptr = weight.data_ptr()

        def run(store: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return norm._coefficient_state(weight, update=update, store=store)

        # The warm-up runs every kernel the graph will hold (the adjoint too when updating:
        # with cudnn.benchmark on, a first-seen shape is autotuned, which capture forbids) but
        # stores nothing, so the capture still advances ``u`` exactly once.
        _warm_up(lambda: run(False), weight.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), _no_autocast("cuda"), torch.cuda.graph(self.graph):
            u, kv, sigma, scale = run(True)
            self.state = torch.cat(
                [u.reshape(-1), kv.reshape(-1), sigma.reshape(1), scale.reshape(1)]
            )
        self.u_shape, self.v_shape = u.shape, kv.shape
        self.backward_graph: tuple[torch.cuda.CUDAGraph, Tensor, Tensor] | None = None

    def split(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views ``(u, k v, sigma, scale)`` of a state buffer."""
        nu, nv = math.prod(self.u_shape), math.prod(self.v_shape)
        u, kv = state[:nu].view(self.u_shape), state[nu : nu + nv].view(self.v_shape)
        return u, kv, state[-2], state[-1]

    def __call__(self) -> Tensor:
        """Replay the iteration; a fresh state (``u`` already stored when updating)."""
        self.graph.replay()
        return self.state.clone()

    def capture_backward(self, norm: BoundedSpectralNorm, weight: Tensor) -> None:
        """Capture ``grad = scale g + <g, W> d<A_W u, k v>/dW`` (once, in a forward)."""
        if self.backward_graph is not None:
            return
        g_buf, saved = _shared_buffer(weight), torch.zeros_like(self.state)

        def run() -> None:
            u, kv, _, scale = self.split(saved)
            norm._rescale_grad(weight, g_buf, u, kv, scale, inplace=True)

        _warm_up(run, weight.device)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), _no_autocast("cuda"), torch.cuda.graph(graph):
            run()
        self.backward_graph = (graph, g_buf, saved)

    def grad(self, g: Tensor, state: Tensor) -> Tensor:
        """Replay the backward for incoming gradient ``g`` and a forward's saved ``state``."""
        assert self.backward_graph is not None
        graph, g_buf, saved = self.backward_graph
        g_buf.copy_(g)
        saved.copy_(state)
        graph.replay()
        return g_buf.clone()


def _warm_up(fn: Callable[[], Any], device: torch.device) -> None:
    """Run ``fn`` once on a side stream before capture: cuDNN/cuBLAS choose their kernels here."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad(), _no_autocast("cuda"):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)


# Static gradient buffers of the backward graphs, one per (shape, dtype, device); each lives as
# long as a graph that reads it.
_GRAD_BUFFERS: weakref.WeakValueDictionary[tuple, Tensor] = weakref.WeakValueDictionary()


def _shared_buffer(like: Tensor) -> Tensor:
    """The static gradient buffer for weights shaped like ``like`` (Note [CUDA graphs])."""
    key = (tuple(like.shape), like.dtype, like.device)
    buf = _GRAD_BUFFERS.get(key)
    if buf is None:
        buf = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        _GRAD_BUFFERS[key] = buf
    return buf


# Graphs per parametrization, outside the module so deepcopy and pickling never see them.
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _IterationGraph | None]] = (
    weakref.WeakKeyDictionary()
)


def _graph_key(norm: BoundedSpectralNorm, weight: Tensor, update: bool) -> tuple:
    return (
        weight.data_ptr(), weight.dtype, weight.shape, norm.u.data_ptr(), norm.u.dtype, update,
        norm.n_power_iterations, norm.min_norm, norm.method, norm.beta,
    )  # fmt: skip


def _capture_failed(norm: BoundedSpectralNorm, err: RuntimeError, stacklevel: int) -> None:
    warnings.warn(
        f"CUDA graph capture for the spectral norm failed ({err}); running it eagerly",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    norm.cuda_graph = False


def _capture_backward(graph: _IterationGraph, norm: BoundedSpectralNorm, weight: Tensor) -> bool:
    """Capture the layer's backward graph if needed; False (eager backward) if capture fails."""
    try:
        graph.capture_backward(norm, weight)
    except RuntimeError as err:  # pragma: no cover - depends on the CUDA build
        _capture_failed(norm, err, stacklevel=4)
        return False
    return True


def _iteration_graph(
    norm: BoundedSpectralNorm, weight: Tensor, update: bool
) -> _IterationGraph | None:
    """The layer's captured iteration, capturing it on first use; None: run eagerly."""
    if (
        not norm.cuda_graph
        or weight.device.type != "cuda"
        or norm.u.device != weight.device
        or getattr(norm, "_is_replica", False)
        or torch.compiler.is_compiling()
        or torch.cuda.is_current_stream_capturing()
    ):
        return None
    graphs = _GRAPHS.setdefault(norm, {})
    key = _graph_key(norm, weight, update)
    if key not in graphs:
        if any(k[:5] != key[:5] for k in graphs):  # moved or re-typed: old graphs are stale
            graphs.clear()
        try:
            graphs[key] = _IterationGraph(norm, weight, update)
        except RuntimeError as err:  # pragma: no cover - depends on the CUDA build
            _capture_failed(norm, err, stacklevel=4)
            graphs[key] = None
    return graphs[key]


class _BoundedRescale(torch.autograd.Function):
    """``W -> W * min(1, beta / sigma(W))`` with ``sigma(W) = <A_W u, v>``, u and v constants.

    Same values and gradients as autograd through ``W / clamp(<A_W u, v> / beta, min=1)`` with a
    fused backward, ``grad = s g - [sigma > beta] s <g, W> / sigma * dsigma/dW`` with
    ``s = min(1, beta / sigma)``: no differentiable sigma convolution in the forward, and on CPU
    the second term is accumulated by one GEMM (``scaled_sigma_grad``) instead of materialized.
    The step is memory-bound on the weight, so this halves the weight-sized passes
    (benchmarks/sn_overhead.py). On accelerators ``scale`` and ``k v`` come in as tensors
    (:func:`_coefficients`), so the backward is one dot and one fused update, without a sync.
    """

    @staticmethod
    def forward(
        ctx: Any,
        weight: Tensor,
        beta: float,
        u: Tensor,
        v: Tensor,
        norm: BoundedSpectralNorm,
        sigma_value: float | None,
        scale: Tensor | None,
        graph: _IterationGraph | None,
        state: Tensor | None,
    ) -> Tensor:
        """``v`` is v on CPU (``sigma_value`` given), else ``k v`` with ``scale``.

        ``norm`` computes the gradient (``_scaled_sigma_grad``, ``_rescale_grad``), with W the
        float32 weight, cast only in the backward.

        A CUDA ``graph`` with its forward's ``state`` replays the backward (Note [CUDA graphs]).
        """
        ctx.beta, ctx.norm, ctx.sigma_value = beta, norm, sigma_value
        ctx.graph, ctx.state = graph, state
        if sigma_value is not None:  # CPU: the caller already has sigma as a number
            ctx.save_for_backward(weight, u, v)
            return weight * min(1.0, beta / sigma_value)
        assert scale is not None
        ctx.save_for_backward(weight, u, v, scale)
        return weight * scale.to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        none = (None,) * 8
        graph: _IterationGraph | None = ctx.graph
        saved = ctx.saved_tensors  # once: non-reentrant checkpointing unpacks each save once
        weight = saved[0]
        if torch.is_grad_enabled():  # create_graph: the gradient as a graph (double backward)
            return ctx.norm._graph_grad(weight, g, saved[1]), *none
        if graph is not None and g.dtype == weight.dtype and weight.data_ptr() == graph.weight_ptr:
            return graph.grad(g, ctx.state), *none
        if ctx.sigma_value is not None and g.dtype == saved[1].dtype:
            weight, u, v = saved
            sigma = ctx.sigma_value
            # CPU: forward only gets here with sigma > beta (otherwise it returns the weight)
            s = ctx.beta / sigma
            try:
                dot = float(torch.vdot(g.reshape(-1), weight.reshape(-1)))
            except RuntimeError:  # a vmapped backward (is_grads_batched): no host read
                dot = None
            if dot is not None:
                return ctx.norm._scaled_sigma_grad(weight, g, s, -s * dot / sigma, u, v), *none
        if ctx.sigma_value is not None:
            weight, u, v = saved
            sigma = torch.tensor(ctx.sigma_value, dtype=u.dtype, device=u.device)
            scale, kv = _coefficients(sigma, v, ctx.beta)
        else:
            weight, u, kv, scale = saved
        return ctx.norm._rescale_grad(weight, g, u, kv, scale), *none


class BoundedSpectralNorm(nn.Module):
    """Parametrization ``W -> W / max(1, sigma / beta)``; sigma the layer's operator norm.

    It only shrinks (PAPERS 1.1): a layer whose estimate is at most ``beta`` keeps its weight
    (the same tensor, no copy). sigma comes from power iteration on the exact operator
    (``method="operator"``, Farnia et al. 2019 Algorithm 1) or on the reshaped kernel
    ``W.reshape(C_out, -1)`` (``method="matrix"``, the norm of
    ``torch.nn.utils.parametrizations.spectral_norm``, which underestimates the operator norm by
    up to the kernel size on large maps and overestimates it on tiny ones; see Note [operator
    norm depends on input size] in ``ops``).

    State: buffer ``u``, shape ``(1, *input_shape)`` (operator; ``(1, in_features)`` for Linear)
    or ``(1, columns of the reshaped kernel)`` (matrix), unit norm, saved in the state dict.
    See Note [buffer updates] and Note [float32 under autocast].

    Gradients: with ``detach_uv=True`` (PyTorch/Miyato) u and v are constants and the gradient
    flows through ``sigma = <A_W u, v>`` into W. With ``detach_uv=False`` the forward runs the
    reference TensorFlow code's iteration instead: ``n_power_iterations`` full rounds inside the
    graph, ``sigma = ||A^T v||``, gradients through every iterate.

    Args:
        layer: the Linear / Conv / ConvTranspose module whose weight is parametrized.
        input_shape: one input's shape without batch dim, ``(C, *spatial)``; required for
            convolutions with ``method="operator"``, recorded for reports otherwise.
        beta: the bound, > 0; ``math.inf`` estimates sigma but never rescales.
        method: ``"operator"`` or ``"matrix"``.
        n_power_iterations: rounds per forward (paper: 1).
        init_iterations: warm-up Krylov steps at construction (ops Note [Krylov refresh]: 20
            reach 0.987-1.0 of each ResNet-18 layer's norm at init, 20 power rounds 0.964-0.9997).
        detach_uv: stop gradients through u and v.
        min_norm: guard for divisions by a norm.
        cuda_graph: on CUDA, replay the no-grad power iteration as a captured CUDA graph
            (Note [CUDA graphs]); False runs it eagerly.
        batch_fold: on CPU, let training forwards of plain Conv/Linear layers compute ``A u``
            inside their own batch and rescale the output (Note [power iteration in the batch]
            in ``fused``; same values, less time); False always rescales the weight.
    """

    def __init__(
        self,
        layer: nn.Module,
        input_shape: Sequence[int] | None = None,
        *,
        beta: float = 1.0,
        method: Literal["operator", "matrix"] = "operator",
        n_power_iterations: int = 1,
        init_iterations: int = 20,
        detach_uv: bool = True,
        min_norm: float = 1e-12,
        cuda_graph: bool = True,
        batch_fold: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
        if not isinstance(layer, SUPPORTED_LAYERS):
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise ValueError(f"unsupported layer type {type(layer).__name__}; supported: {names}")
        self.beta = _check_beta(beta)
        self.method = method
        self.n_power_iterations = _check_int("n_power_iterations", n_power_iterations, 1)
        self.init_iterations = _check_int("init_iterations", init_iterations, 0)
        self.detach_uv = _check_bool("detach_uv", detach_uv)
        self.min_norm = float(min_norm)
        self.cuda_graph = _check_bool("cuda_graph", cuda_graph)
        self.batch_fold = _check_bool("batch_fold", batch_fold)
        self._fold_geometry: Any = None  # set by fused.install for plain Conv/Linear layers
        self.layer_name: str | None = None  # set by apply_spectral_norm (warnings name it)
        # fused.check_resolution warns once per dict: apply_spectral_norm shares one per model
        self.resolution_warning: dict[str, bool] = {"warned": False}
        self.output_numel = 0
        self.frozen = False  # set by freeze_spectral_norm
        # (original weight, rescaled weight) handed over by the model's grouped CUDA path for
        # this forward (Note [one graph per model] in ``grouped``), else None.
        self._pending: tuple[Tensor, Tensor] | None = None
        self.layer_type = type(layer).__name__
        self.input_shape = None if input_shape is None else tuple(int(i) for i in input_shape)
        # The whole network's input shape, set by apply_spectral_norm (the report's default).
        self.network_input_shape: tuple[int, ...] | None = None
        weight = layer.weight.detach()
        # ConvTranspose weights are (C_in, C_out/g, ...): rows are output channels after a
        # transpose, as in torch's spectral_norm (dim=1).
        self.matrix_dim = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
        if method == "operator":
            self.spec = OperatorSpec.from_layer(layer, input_shape)
            u_shape = self.spec.u_shape
        else:
            self.spec = OperatorSpec("linear", (weight.numel() // weight.shape[self.matrix_dim],))
            u_shape = self.spec.u_shape
        u = torch.randn(u_shape, device=weight.device, dtype=_float_dtype(weight.dtype))
        self.register_buffer("u", _unit_blocks(u, self.blocks, self.min_norm)[0])
        if self.init_iterations:
            self.converge(weight, self.init_iterations)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load, then restart a zero ``u`` block (a checkpoint of a zero weight; ops Note [zero u])."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        with torch.no_grad():
            flat = self.u.reshape(self.blocks, -1)
            zero = torch.linalg.vector_norm(flat, dim=1) <= self.min_norm
            if bool(zero.any()):
                flat = flat.masked_fill(zero[:, None], flat.shape[1] ** -0.5)
                self.u.copy_(flat.reshape(self.u.shape))

    @torch.no_grad()
    def converge(self, weight: Tensor, n_iter: int) -> None:
        """Converge the stored ``u`` by ``n_iter`` Krylov steps on ``weight`` (the unnormalized one).

        The warm-up at registration and :func:`refresh_spectral_norm`; nothing else changes.
        Golub-Kahan-Lanczos from the stored ``u``: up to 20 steps never worse than as many
        power rounds, far better where the top singular values nearly tie (ops Note [Krylov
        refresh]).
        """
        with _no_autocast(weight.device.type):
            W = weight.detach().to(_float_dtype(weight.dtype))
            u = _krylov_top(
                *self._operator(W), self.u.to(W.dtype), n_iter, self.min_norm, self.blocks
            )
        self.u.copy_(u)

    def _scaled_sigma_grad(
        self,
        W: Tensor,
        g: Tensor,
        a: float | Tensor,
        b: float | Tensor,
        u: Tensor,
        v: Tensor,
        *,
        inplace: bool = False,
    ) -> Tensor:
        """``a * g + b * dsigma/dW`` for ``sigma = <A_W u, v>`` with u, v fixed (shape of W).

        ``a`` and ``b`` are numbers (CPU) or 0-dim tensors (accelerators, no host sync).
        ``inplace`` writes the result into ``g`` (contiguous; the CUDA-graph buffer).
        """
        if self.method == "operator":
            return self.spec.scaled_sigma_grad(W, g, a, b, u, v, inplace=inplace)
        if isinstance(b, Tensor):
            v, b = v * b, 1.0  # scale the small factor
        out = g.mul_(a) if inplace else (g * a).contiguous()  # g may be strided (a transpose)
        if not self.matrix_dim:  # reshaped kernel (rows, cols): one addmm
            out.view(W.shape[0], -1).addmm_(v.mT, u, alpha=b)
            return out
        G = (v.mT @ u).reshape(W.shape[1], W.shape[0], *W.shape[2:]).transpose(0, 1)
        return out.add_(G, alpha=b)

    def _graph_grad(self, weight: Tensor, g: Tensor, u: Tensor) -> Tensor:
        """The rescale's weight gradient as a differentiable graph (``create_graph``).

        Autograd through ``W / clamp(<A_W u, v> / beta, min=1)`` with the forward's unit ``u`` and
        ``v = A_W u / ||A_W u||`` (the top block's pair for grouped layers) held constant, so
        second derivatives (Hessian-vector products, gradient penalties on parameters) follow
        the same definition as the first. The fused backward computes this first derivative
        without a graph.
        """
        u = u.detach().clone()  # a CUDA-graph state may be overwritten by the next forward
        with torch.enable_grad(), _no_autocast(weight.device.type):
            W = weight if weight.requires_grad else weight.detach().requires_grad_()
            Au = self._operator(W.to(u.dtype))[0](u)
            v = Au.detach() / torch.linalg.vector_norm(Au.detach()).clamp_min(self.min_norm)
            sigma = torch.vdot(Au.reshape(-1), v.reshape(-1))
            out = W / torch.clamp(sigma / self.beta, min=1.0).to(W.dtype)
            (grad,) = torch.autograd.grad(out, W, g, create_graph=True)
        return grad

    def _iterate(
        self, W: Tensor, *, advance: bool, store: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(u, v, sigma)`` of one forward from the stored u (``ops._estimate``).

        ``W`` is in the iteration dtype; with ``advance`` the next u is computed, and stored
        unless ``store`` is False (a CUDA-graph warm-up).
        """
        u, v, sigma, u_next = _estimate(
            *self._operator(W), self.u.to(W.dtype), self.n_power_iterations, self.min_norm,
            advance=advance, blocks=self.blocks,
        )  # fmt: skip
        if u_next is not None and store:
            self.u.copy_(u_next)
        return u, v, sigma

    def _coefficient_state(
        self, weight: Tensor, *, update: bool, store: bool = True
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(u, k v, sigma, scale)`` of one forward as tensors (CUDA graphs; no host sync).

        ``weight`` is the original weight in any dtype; see :meth:`_iterate` and
        :func:`_coefficients`.
        """
        W = weight.detach().to(_float_dtype(weight.dtype))
        u, v, sigma = self._iterate(W, advance=update, store=store)
        scale, kv = _coefficients(sigma, v, self.beta)
        return u, kv, sigma, scale

    def _rescale_grad(
        self,
        weight: Tensor,
        g: Tensor,
        u: Tensor,
        kv: Tensor,
        scale: Tensor,
        *,
        inplace: bool = False,
    ) -> Tensor:
        """Gradient of ``W -> scale W`` (sigma a function of W) for the incoming gradient ``g``.

        ``(u, k v, scale)`` as from :meth:`_coefficient_state`. Computed in ``u``'s dtype and
        returned in the weight's; ``inplace``: into ``g`` (a contiguous CUDA-graph buffer).
        The 0-dim dot scales the small factor ``k v``, never a weight-sized temporary.
        """
        W = weight.detach().to(u.dtype)  # the weight itself for float32
        g32 = g.to(u.dtype)  # likewise: for float32 gradients the buffer itself
        dot = torch.vdot(g32.reshape(-1), W.reshape(-1))
        out = self._scaled_sigma_grad(W, g32, scale, dot, u, kv, inplace=inplace)
        if not inplace:
            return out.to(weight.dtype)
        if out is not g:  # low-precision weights: back into the buffer
            g.copy_(out)
        return g

    def _operator(self, W: Tensor) -> tuple[LinearOp, LinearOp]:
        if self.method == "matrix":
            return linear_operator(
                W.transpose(0, 1).flatten(1) if self.matrix_dim else W.flatten(1)
            )
        return self.spec.operator(W)

    def forward(self, weight: Tensor) -> Tensor:
        """Return ``weight / max(1, sigma / beta)``; updates ``u`` only in unfrozen training."""
        pending = self.__dict__.get("_pending")
        if pending is not None:  # computed with the model's other layers (``grouped``)
            self.__dict__["_pending"] = None
            if pending[0] is weight:
                return pending[1]
        update = self.training and not self.frozen
        transforms = _transforms_active()
        if transforms and update:
            raise RuntimeError(
                "a training-mode forward of a spectrally normalized layer updates its power-"
                "iteration vector u in place, which torch.func transforms cannot do; call "
                "model.eval() or run under sn_lightning.spectral.freeze_spectral_norm(model)"
            )
        dtype = _float_dtype(weight.dtype)
        with _no_autocast(weight.device.type):
            if not self.detach_uv:
                # The reference: n full rounds inside the graph, sigma = ||A^T v||, gradients
                # through every iterate. Clone: u must not be saved for backward and then
                # overwritten in place.
                u, _, sigma = _power_iteration(
                    *self._operator(weight.to(dtype)),
                    self.u.clone().to(dtype),
                    self.n_power_iterations,
                    self.min_norm,
                    self.blocks,
                )
                if update:
                    self.u.copy_(u.detach())
                return weight / torch.clamp(sigma / self.beta, min=1.0).to(weight.dtype)
            graph = None if transforms else _iteration_graph(self, weight, update)
            state = None
            if graph is not None:
                state = graph()
                u, kv, sigma, scale = graph.split(state)
                sigma_value = None
            else:
                with torch.no_grad():
                    u, kv, sigma = self._iterate(weight.detach().to(dtype), advance=update)
                # under torch.func sigma may be batched (vmap over weights): no host read
                sigma_value = None if transforms else _host_sigma(sigma)
                scale = None
            if math.isinf(self.beta) or (sigma_value is not None and sigma_value <= self.beta):
                return weight
            if transforms:  # autograd through sigma = <A_W u, v>: what _BoundedRescale computes
                A = self._operator(weight.to(dtype))[0]
                sigma_w = torch.vdot(A(u).reshape(-1), kv.reshape(-1))
                return weight / torch.clamp(sigma_w / self.beta, min=1.0).to(weight.dtype)
            if sigma_value is None and scale is None:  # eager on an accelerator
                scale, kv = _coefficients(sigma, kv, self.beta)
            if torch.is_grad_enabled() and weight.requires_grad:
                if graph is not None and not _capture_backward(graph, self, weight):
                    graph = None
                return _BoundedRescale.apply(
                    weight, self.beta, u, kv, self, sigma_value, scale, graph,
                    state,
                )  # fmt: skip
            if sigma_value is not None:
                return weight * (self.beta / sigma_value)
            assert scale is not None
            return weight * scale.to(weight.dtype)

    @property
    def blocks(self) -> int:
        """Groups with their own power iteration: the conv's groups for "operator", else 1.

        ops Note [blocks]: each group's part of ``u`` is a unit vector and sigma is the largest
        group's estimate.
        """
        return self.spec.blocks

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Identity: assigning ``layer.weight = W`` stores W as the unnormalized weight."""
        return weight

    @torch.no_grad()
    def sigma(self, weight: Tensor, n_iter: int | None = None) -> Tensor:
        """Estimate sigma of ``weight`` (the unnormalized one) from a copy of ``u``; no side effects.

        Args:
            weight: the original weight (``layer.parametrizations.weight.original``).
            n_iter: rounds from the stored u; None: ``n_power_iterations`` (what a forward uses).

        Returns:
            A 0-dim float tensor, a lower bound on the norm (method's norm).
        """
        n = self.n_power_iterations if n_iter is None else n_iter
        dtype = _float_dtype(weight.dtype)
        with _no_autocast(weight.device.type):
            W = weight.detach().to(dtype)
            if not self.detach_uv:
                _, _, sigma = _power_iteration(
                    *self._operator(W), self.u.to(dtype), n, self.min_norm, self.blocks
                )
            else:
                _, _, sigma, _ = _estimate(
                    *self._operator(W), self.u.to(dtype), n, self.min_norm, advance=False,
                    blocks=self.blocks,
                )  # fmt: skip
        return sigma

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        shape = self.input_shape if self.input_shape is not None else self.spec.input_shape
        return (
            f"beta={self.beta}, method={self.method!r}, input_shape={shape}, "
            f"n_power_iterations={self.n_power_iterations}, detach_uv={self.detach_uv}"
        )


class BoundedBatchNormScale(nn.Module):
    """Parametrization of a BatchNorm's ``weight`` (gamma) bounding its eval-mode Lipschitz constant.

    The eval-mode BatchNorm ``x -> gamma * (x - mean) / sqrt(var + eps) + b`` is a diagonal
    affine map with l2 Lipschitz constant ``s = max_i |gamma_i| / sqrt(running_var_i + eps)``.
    The same rule as the spectral norm applies: ``gamma -> gamma / max(1, s / beta)`` (one factor
    for the whole layer; the bias is untouched). Only eval-mode BN is bounded: training mode
    normalizes by batch statistics.

    ``running_var`` is the BatchNorm's own buffer, registered here too (non-persistent: the
    state dict is unchanged), so ``bn.weight`` read after training forwards uses the variance
    they left. Where the two come apart (``model.to()``, ``load_state_dict(assign=True)``), a
    forward pre-hook on the BatchNorm (:func:`_sync_running_var`), the load post-hook and
    :func:`sync_batchnorm_bounds` (export, reports) share it again.

    Args:
        bn: a ``BatchNorm1d/2d/3d`` with ``affine=True`` and ``track_running_stats=True``.
        beta: the bound, > 0.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, beta: float = 1.0) -> None:
        super().__init__()
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"expected a BatchNorm layer, got {type(bn).__name__}")
        if not bn.affine or bn.running_var is None:
            raise ValueError(
                f"{type(bn).__name__} needs affine=True and track_running_stats=True to be bounded"
            )
        self.beta = _check_beta(beta)
        self.eps = float(bn.eps)
        self.register_buffer("running_var", bn.running_var, persistent=False)

    def scale(self, gamma: Tensor) -> Tensor:
        """``s = max_i |gamma_i| / sqrt(running_var_i + eps)`` (a 0-dim tensor).

        Under ``torch.func`` the BatchNorm's own running_var is read (handed over by the pre-hook
        for one read): the copy cannot be written there (it may be batched by ``vmap``).
        """
        var = self.__dict__.pop("_live_var", None)
        var = self.running_var if var is None else var
        return (gamma.abs() / torch.sqrt(var.to(gamma.dtype) + self.eps)).max()

    def forward(self, gamma: Tensor) -> Tensor:
        """Return ``gamma / max(1, s / beta)``."""
        return gamma / torch.clamp(self.scale(gamma) / self.beta, min=1.0)

    def right_inverse(self, gamma: Tensor) -> Tensor:
        """Identity."""
        return gamma

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"beta={self.beta}, eps={self.eps}"


def _sync_running_var(bn: nn.Module, args: Any) -> None:
    """Forward pre-hook: share the BatchNorm's running_var with its BoundedBatchNormScale."""
    if parametrize.is_parametrized(bn, "weight"):
        for p in bn.parametrizations.weight:
            if isinstance(p, BoundedBatchNormScale):
                if _transforms_active():  # torch.func: no writes to captured modules
                    p.__dict__["_live_var"] = bn.running_var
                else:
                    p.__dict__.pop("_live_var", None)
                    if p.running_var is not bn.running_var:
                        p.running_var = bn.running_var


def sync_batchnorm_bounds(model: nn.Module) -> None:
    """Refresh every BoundedBatchNormScale's running_var (done before export and reports)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _sync_running_var(m, ())


def _plain_class(module: nn.Module) -> type[nn.Module]:
    """``Conv2d`` for a ``ParametrizedConv2d`` (parametrize injects a subclass)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _class_name(module: nn.Module) -> str:
    """``Conv2d`` for a ``ParametrizedConv2d``."""
    return _plain_class(module).__name__


def _find(module: nn.Module, name: str, kind: type[nn.Module]) -> nn.Module | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, kind):
            return p
    return None


def _ours(module: nn.Module) -> bool:
    """Whether ``module.weight`` is parametrized by bounds of this package only."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    bounds = (BoundedSpectralNorm, BoundedBatchNormScale)
    return all(isinstance(p, bounds) for p in module.parametrizations.weight)


def _load_plain_weight(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load-state-dict pre-hook: read a plain checkpoint's ``<layer>.weight`` (Note [plain load]).

    Renames it to ``<layer>.parametrizations.weight.original`` and fills the missing ``u`` with
    the current one, marked stale for :func:`_converge_loaded`. A state dict that already holds
    the normalized keys is left alone.
    """
    plain, original = f"{prefix}weight", f"{prefix}parametrizations.weight.original"
    if not _ours(module) or plain not in state_dict or original in state_dict:
        return
    state_dict[original] = state_dict.pop(plain)
    for i, p in enumerate(module.parametrizations.weight):
        if isinstance(p, BoundedSpectralNorm):
            state_dict.setdefault(f"{prefix}parametrizations.weight.{i}.u", p.u)
            p._stale_u = True


def _converge_loaded(module: nn.Module, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: converge ``u`` for a weight read from a plain checkpoint.

    A BatchNorm's bound shares its running_var again (``assign=True`` rebinds the buffer).
    """
    if not _ours(module):
        return
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        _sync_running_var(module, ())
    for p in module.parametrizations.weight:
        if p.__dict__.pop("_stale_u", False):
            p.converge(module.parametrizations.weight.original, REFRESH_ITERATIONS)


def _accept_plain_checkpoints(module: nn.Module) -> None:
    """Let ``module.load_state_dict`` read plain ``weight`` keys (once per module).

    Note [plain load]
        Parametrizing renames ``<layer>.weight`` to ``<layer>.parametrizations.weight.original``
        and adds ``u``. A checkpoint of the unmodified backbone then fails a strict load and, with
        ``strict=False``, would load no weight at all. A pre-hook maps the plain key onto
        ``original``; the ``u`` it lacks is converged for the loaded weight by a post-hook
        (``REFRESH_ITERATIONS`` Krylov steps, as :func:`refresh_spectral_norm`), since the stored
        one belongs to the old weight and would underestimate sigma. Checkpoints of the
        normalized model load as before (their ``u`` is kept). Both hooks do nothing once the
        bounds are removed.
    """
    hooks = [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()]
    if _load_plain_weight in hooks:
        return
    module.register_load_state_dict_pre_hook(_load_plain_weight)
    module.register_load_state_dict_post_hook(_converge_loaded)


def bounded_spectral_norm(module: nn.Module, name: str = "weight", **kwargs: Any) -> nn.Module:
    """Register :class:`BoundedSpectralNorm` on ``module.<name>``; returns the module.

    Args:
        module: Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d.
        name: the parametrized tensor; only ``"weight"`` defines the layer's operator.
        **kwargs: :class:`BoundedSpectralNorm` arguments (``input_shape``, ``beta``, ``method``,
            ``n_power_iterations``, ``init_iterations``, ``detach_uv``).

    Raises:
        ValueError: unsupported layer, a name other than "weight", bad arguments, or a layer that
            already has a bounded spectral norm.
    """
    if name != "weight":
        raise ValueError(f"only 'weight' defines the layer operator, got name={name!r}")
    if _find(module, name, BoundedSpectralNorm) is not None:
        raise ValueError(f"{_class_name(module)}.{name} already has a BoundedSpectralNorm")
    if isinstance(module, SUPPORTED_LAYERS) and parametrize.is_parametrized(module, name):
        # Our operator assumes ``weight`` is what the layer convolves with; another
        # parametrization underneath would make sigma wrong.
        raise ValueError(
            f"{_class_name(module)}.{name} is already parametrized "
            f"({[type(p).__name__ for p in module.parametrizations[name]]}); remove it first"
        )
    norm = BoundedSpectralNorm(module, **kwargs)
    parametrize.register_parametrization(module, name, norm)
    fused.install(module, norm)
    _accept_plain_checkpoints(module)
    return module


def remove_bounded_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Bake the normalized weight into ``module.<name>`` and remove the parametrization.

    The baked weight is the one an eval-mode forward uses; the parameter keeps its identity
    (``leave_parametrized=True``), so optimizers holding it stay valid.

    Raises:
        ValueError: no BoundedSpectralNorm on ``module.<name>``.
    """
    p = _find(module, name, BoundedSpectralNorm)
    if p is None:
        raise ValueError(f"{_class_name(module)}.{name} has no BoundedSpectralNorm to remove")
    _remove(module, name)
    return module


def _remove(module: nn.Module, name: str) -> None:
    """Remove all parametrizations of ``module.<name>``, baking the eval-mode value in."""
    _own_class(module)
    with eval_mode(module), torch.no_grad():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _sync_running_var(module, ())
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def _own_class(module: nn.Module, base: type[nn.Module] | None = None) -> None:
    """Give a parametrized module a class of its own before a removal edits the class.

    ``torch.nn.utils.parametrize`` injects one class per module and keeps the parametrized
    tensor as a property on it; ``copy.deepcopy`` shares that class between the copies, and
    removing the parametrization deletes the property from the class, so the other copy would
    lose its ``weight``. A fresh class with the same namespace keeps the copies apart. With
    ``base``, the fresh class derives from ``base`` instead (``convert_sync_batchnorm``).
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    if base is None:
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    else:
        module.__class__ = type(f"Parametrized{base.__name__}", (base,), namespace)


@torch.no_grad()
def refresh_spectral_norm(model: nn.Module, n_iter: int = REFRESH_ITERATIONS) -> nn.Module:
    """Converge every normalized layer's ``u`` for its current weight; returns ``model``.

    One round per training step lags behind weights that move fast: the reference's ELU-Net on
    Fashion-MNIST (Adam 1e-3, beta 1) ends 3 epochs with layers at 1.02-1.17 beta (exact norms),
    because eval forwards rescale by the sigma of a ``u`` that trails the weights; 50 power rounds
    from the stored ``u`` brought them to <= 1.0004 beta. The refresh runs up to ``n_iter``
    Golub-Kahan-Lanczos steps from the stored ``u`` instead (ops Note [Krylov refresh]; the same
    products as power rounds), which also converge where the top singular values nearly tie:
    100 power rounds left timm LeViT-128S's ``stem.conv3`` at 1.016 beta after five SGD steps
    from random init, 100 Krylov steps leave it within 2e-6. It stops early once a cycle of
    steps gains nothing. The estimate still approaches sigma from below; the report's upper
    bound is the guarantee. Only the ``u`` buffers change (no forward runs, BatchNorm statistics
    are untouched; layers inside :func:`freeze_spectral_norm` are skipped). While fitting, the
    classifier refreshes before each validation, at each epoch end and before a checkpoint
    (``model.sn_refresh_iterations``, default 100), so checkpoints and the final evaluation hold
    a converged ``u``.

    Args:
        model: a model with layers from :func:`apply_spectral_norm` / :func:`bounded_spectral_norm`.
        n_iter: Krylov steps per layer (at most; it stops once converged), >= 1.
    """
    n_iter = _check_int("n_iter", n_iter, 1)
    for module in model.modules():
        norm = _find(module, "weight", BoundedSpectralNorm)
        if norm is None or norm.frozen:  # freeze_spectral_norm: no u updates
            continue
        norm.converge(module.parametrizations.weight.original, n_iter)
    return model


@contextlib.contextmanager
def freeze_spectral_norm(model: nn.Module) -> Iterator[nn.Module]:
    """Stop ``u`` updates in every BoundedSpectralNorm of ``model`` (e.g. attack forwards).

    Forwards inside still rescale the weight from the stored ``u`` (Note [buffer updates]).
    The previous states are restored on exit, also when an exception is raised.

    Example:
        >>> with freeze_spectral_norm(model):
        ...     x_adv = attack(model, x, y)  # train-mode forwards leave u untouched
    """
    norms = [m for m in model.modules() if isinstance(m, BoundedSpectralNorm)]
    previous = [m.frozen for m in norms]
    for m in norms:
        m.frozen = True
    try:
        yield model
    finally:
        for m, frozen in zip(norms, previous, strict=True):
            m.frozen = frozen
