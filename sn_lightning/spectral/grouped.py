"""All of a model's CUDA spectral norms in one forward graph and one backward graph per step.

Note [one graph per model]
    Per-layer CUDA graphs (Note [CUDA graphs] in ``parametrization``) still cost the host about
    0.4 ms per layer and step: two replays, four copies, two clones and a Python autograd
    Function. A ResNet-18 step at 32 px is host-bound on an H100 even at batch 2048 (bf16), so
    that host time is the step time SN adds (2.11x plain at batch 128). :func:`install` therefore gives the model passed to
    ``apply_spectral_norm`` a forward pre-hook that, once per forward of that model, replays one
    graph holding every CUDA layer's estimate and ``u`` update, writes the rescaled weights of
    all layers with one ``_foreach_mul`` and hands each layer its own through
    ``BoundedSpectralNorm._pending``; the layer's parametrization returns it instead of
    computing its own (:meth:`BoundedSpectralNorm.forward`). The backward of all the rescales
    is one autograd node, :class:`_GroupRescale`, whose backward copies the incoming weight
    gradients into static buffers with one ``_foreach_copy_``, replays one graph and returns
    the gradients. Values, gradients and ``u`` are the per-layer path's (tests/test_cuda.py).
    ResNet-18, batch 128, H100: 1.29x a plain step against 2.11x with a graph pair per layer
    (``python -m benchmarks.sn_overhead --device cuda``; README, Performance); at 224 px the
    step is GPU-bound and both paths cost about 1.2x.

    Semantics: a forward of the model advances every grouped layer's ``u`` once, used or not; a
    layer called twice in one forward gets the grouped weight first and runs its own
    parametrization after (as every forward of it did before). The hook is skipped, and each
    layer runs the per-layer path, when any layer differs in mode (training, frozen), under
    ``parametrize.cached()`` (the cache already computes each weight once), ``torch.compile``,
    ``torch.fx`` and ``torch.jit`` tracing, a user's own capture, in ``DataParallel`` replicas,
    and for forwards of a submodule alone. Memory: one static gradient buffer per layer (the
    size of the normalized weights).
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sn_lightning.spectral.ops import _transforms_active
from sn_lightning.spectral.parametrization import (
    BoundedSpectralNorm,
    _float_dtype,
    _no_autocast,
    _warm_up,
)

try:  # newer torch: is_fx_tracing also counts torch.export, and warns
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing

__all__ = ["SpectralGroup", "install", "is_group_hook", "uninstall"]

# Set by tests only: run the grouped path without CUDA graphs (on any device) to check its logic.
_EAGER_FOR_TESTS = False


class _GroupGraph:
    """The captured forward and backward of one set of layers (Note [one graph per model]).

    ``state`` layout: every layer's ``u`` and ``k v`` flattened, then all sigmas, then all
    scales (so ``state[-n:]`` are the n scales and ``unbind`` gives them at once).
    """

    def __init__(
        self, norms: list[BoundedSpectralNorm], weights: list[Tensor], update: bool, capture: bool
    ) -> None:
        self.norms, self.weights, self.n = norms, weights, len(norms)
        self.weight_ptrs = [w.data_ptr() for w in weights]
        self.capture = capture

        def forward(store: bool) -> Tensor:
            us, kvs, sigmas, scales, us_full, kvs_full = [], [], [], [], [], []
            for norm, w in zip(norms, weights, strict=True):
                u, kv, sigma, scale = norm._coefficient_state(w, update=update, store=store)
                us_full.append(u)
                kvs_full.append(kv)
                us.append(u.reshape(-1))
                kvs.append(kv.reshape(-1))
                sigmas.append(sigma.reshape(1))
                scales.append(scale.reshape(1))
            self.layout = _layout([u.shape for u in us_full], [kv.shape for kv in kvs_full])
            return torch.cat([*us, *kvs, *sigmas, *scales])

        self._forward = forward
        self.saved = self.g_bufs = None
        self.backward_graph: torch.cuda.CUDAGraph | None = None
        if capture:
            device = weights[0].device
            _warm_up(lambda: forward(False), device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), _no_autocast("cuda"), torch.cuda.graph(self.graph):
                self.state = forward(True)

    def run(self) -> Tensor:
        """One forward's state (``u`` stored when updating); a fresh tensor."""
        if not self.capture:
            with torch.no_grad(), _no_autocast(self.weights[0].device.type):
                return self._forward(True)
        self.graph.replay()
        return self.state.clone()

    def member(self, state: Tensor, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Views ``(u, k v, scale)`` of layer ``i`` in ``state``."""
        (u_at, u_shape), (kv_at, kv_shape) = self.layout[i]
        u = state[u_at : u_at + math.prod(u_shape)].view(u_shape)
        kv = state[kv_at : kv_at + math.prod(kv_shape)].view(kv_shape)
        return u, kv, state[state.numel() - self.n + i]

    def _grads_into_buffers(self, state: Tensor) -> None:
        """Gradient of every rescale, in place in ``g_bufs`` (each the incoming gradient)."""
        assert self.g_bufs is not None
        for i, (norm, w, g_buf) in enumerate(
            zip(self.norms, self.weights, self.g_bufs, strict=True)
        ):
            norm._rescale_grad(w, g_buf, *self.member(state, i), inplace=True)

    def grads(self, grads: tuple[Tensor | None, ...], state: Tensor) -> list[Tensor | None]:
        """The weights' gradients for the rescaled weights' gradients ``grads``."""
        if self.g_bufs is None:
            self.g_bufs = [
                torch.zeros(w.shape, dtype=w.dtype, device=w.device) for w in self.weights
            ]
            self.saved = torch.zeros_like(state)
            if self.capture:
                _warm_up(lambda: self._grads_into_buffers(self.saved), state.device)
                self.backward_graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), _no_autocast("cuda"), torch.cuda.graph(self.backward_graph):
                    self._grads_into_buffers(self.saved)
        assert self.saved is not None
        assert self.g_bufs is not None
        present = [i for i, g in enumerate(grads) if g is not None]
        torch._foreach_copy_([self.g_bufs[i] for i in present], [grads[i] for i in present])
        for i in set(range(self.n)) - set(present):
            self.g_bufs[i].zero_()
        self.saved.copy_(state)
        if self.backward_graph is not None:
            self.backward_graph.replay()
        else:
            with torch.no_grad(), _no_autocast(state.device.type):
                self._grads_into_buffers(self.saved)
        out = torch._foreach_mul([self.g_bufs[i] for i in present], 1.0)  # fresh tensors
        result: list[Tensor | None] = [None] * self.n
        for i, g in zip(present, out, strict=True):
            result[i] = g
        return result


def _layout(
    u_shapes: list[torch.Size], kv_shapes: list[torch.Size]
) -> list[tuple[tuple[int, torch.Size], tuple[int, torch.Size]]]:
    """``[((u offset, u shape), (kv offset, kv shape))]`` in the state (``_GroupGraph``)."""
    offsets, at = [], 0
    for shape in (*u_shapes, *kv_shapes):
        offsets.append((at, shape))
        at += math.prod(shape)
    n = len(u_shapes)
    return [(offsets[i], offsets[n + i]) for i in range(n)]


class _GroupRescale(torch.autograd.Function):
    """``(W_1, ..., W_n) -> (s_1 W_1, ..., s_n W_n)``: every layer's rescale as one node."""

    @staticmethod
    def forward(
        ctx: Any, graph: _GroupGraph, state: Tensor, *weights: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.graph, ctx.state = graph, state
        ctx.save_for_backward(*weights)
        ctx.set_materialize_grads(False)  # a layer not called gets None, and gives None
        scales = list(state[state.numel() - graph.n :].unbind())
        return tuple(torch._foreach_mul(list(weights), scales))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        graph: _GroupGraph = ctx.graph
        weights = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: each layer's gradient as a graph
            return (
                None,
                None,
                *(
                    None if g is None else norm._graph_grad(w, g, graph.member(ctx.state, i)[0])
                    for i, (norm, g, w) in enumerate(zip(graph.norms, grads, weights, strict=True))
                ),
            )
        same = all(
            g is None or (g.dtype == w.dtype and g.shape == w.shape)
            for g, w in zip(grads, weights, strict=True)
        )
        if same and [w.data_ptr() for w in weights] == graph.weight_ptrs:
            return None, None, *graph.grads(grads, ctx.state)
        return None, None, *_eager_grads(graph, grads, weights, ctx.state)


def _eager_grads(
    graph: _GroupGraph, grads: tuple[Tensor | None, ...], weights: tuple[Tensor, ...], state: Tensor
) -> list[Tensor | None]:
    """The per-layer formula, layer by layer (a gradient whose dtype or shape the graph lacks)."""
    return [
        None if g is None else norm._rescale_grad(w, g, *graph.member(state, i))
        for i, (norm, g, w) in enumerate(zip(graph.norms, grads, weights, strict=True))
    ]


# Captured graphs per group (outside the group, so deepcopy and pickling never see them), keyed
# by what they bake in; a new key (moved weights, new beta, train vs eval) captures anew.
_GRAPHS: weakref.WeakKeyDictionary[SpectralGroup, dict[tuple, _GroupGraph | None]] = (
    weakref.WeakKeyDictionary()
)


class SpectralGroup:
    """The spectral norms one ``apply_spectral_norm`` call added, run together on CUDA.

    Holds ``(layer, norm)`` pairs; its :meth:`pre_hook` and :meth:`post_hook` are the model's
    forward hooks (Note [one graph per model]). A plain object: deepcopies and pickles of the
    model carry it, with the copied layers.
    """

    def __init__(self, members: list[tuple[nn.Module, BoundedSpectralNorm]]) -> None:
        self.members = members
        self.enabled = True

    def _eligible(self) -> tuple[list[BoundedSpectralNorm], list[Tensor], bool] | None:
        """The norms, weights and update flag of this forward; None: per-layer path."""
        norms, weights = [], []
        update = None
        for layer, norm in self.members:
            if not parametrize.is_parametrized(layer, "weight"):
                continue  # removed since
            plist = layer.parametrizations.weight
            if len(plist) != 1 or plist[0] is not norm:
                continue
            w = plist.original
            if not (_EAGER_FOR_TESTS or (w.is_cuda and norm.cuda_graph)):
                continue
            if not norm.detach_uv or math.isinf(norm.beta) or norm.u.device != w.device:
                continue
            flag = norm.training and not norm.frozen
            if update is None:
                update = flag
            elif flag != update:
                return None
            norms.append(norm)
            weights.append(w)
        if update is None or len({w.device for w in weights}) != 1:
            return None
        if len({_float_dtype(w.dtype) for w in weights}) != 1:
            return None
        return norms, weights, update

    def _graph(
        self, norms: list[BoundedSpectralNorm], weights: list[Tensor], update: bool
    ) -> _GroupGraph | None:
        key = (
            update,
            tuple((w.data_ptr(), w.dtype, w.shape) for w in weights),
            tuple(
                (id(n), n.u.data_ptr(), n.beta, n.n_power_iterations, n.min_norm, n.method)
                for n in norms
            ),
        )
        graphs = _GRAPHS.setdefault(self, {})
        if key not in graphs:
            if any(k[1:] != key[1:] for k in graphs):  # moved, re-typed or re-set: stale
                graphs.clear()
            try:
                graphs[key] = _GroupGraph(norms, weights, update, capture=not _EAGER_FOR_TESTS)
            except RuntimeError as err:  # pragma: no cover - depends on the CUDA build
                warnings.warn(
                    f"CUDA graph capture of the spectral norms failed ({err}); running each "
                    "layer on its own",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.enabled = False
                return None
        return graphs[key]

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        """Rescale every grouped layer's weight for this forward (Note [one graph per model])."""
        if (
            not self.enabled
            or getattr(module, "_is_replica", False)
            or parametrize._cache_enabled
            or torch.compiler.is_compiling()
            or _fx_tracing()
            or _transforms_active()
            or torch.jit.is_tracing()
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
        ):
            return
        eligible = self._eligible()
        if eligible is None:
            return
        norms, weights, update = eligible
        graph = self._graph(norms, weights, update)
        if graph is None:
            return
        state = graph.run()
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            outs = _GroupRescale.apply(graph, state, *weights)
        else:
            outs = torch._foreach_mul(weights, list(state[state.numel() - graph.n :].unbind()))
        for norm, w, out in zip(norms, weights, outs, strict=True):
            norm.__dict__["_pending"] = (w, out)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """Drop weights a layer did not take (not called in this forward)."""
        for _, norm in self.members:
            norm.__dict__["_pending"] = None


def install(model: nn.Module, members: list[tuple[nn.Module, BoundedSpectralNorm]]) -> None:
    """Give ``model`` the grouped pre/post forward hooks for ``members``."""
    group = SpectralGroup(members)
    model.register_forward_pre_hook(group.pre_hook)
    model.register_forward_hook(group.post_hook, always_call=True)


def is_group_hook(hook: Any) -> bool:
    """True for a SpectralGroup's forward pre-hook or hook.

    They hand each layer the weight its own parametrization would compute and change no input
    or output, so Lipschitz bounds and the attacks' BatchNorm fold may ignore them.
    """
    return isinstance(getattr(hook, "__self__", None), SpectralGroup)


def uninstall(model: nn.Module) -> None:
    """Remove every SpectralGroup hook from ``model`` and its submodules."""
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if is_group_hook(h)]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)
