"""Training forwards of a spectrally normalized Conv/Linear layer with ``A u`` inside the batch.

Note [power iteration in the batch]
    With ``sigma = ||A u||`` (Note [estimate, then advance] in ``ops``) the product the estimate
    needs is the layer's own map applied to one more input, ``u``. A training forward of a
    plain ``nn.Conv1d/2d/3d`` or ``nn.Linear`` on CPU therefore runs the layer once on
    ``cat([x, u])`` (:class:`_FoldedLayer`): the last row is ``A u``, which gives sigma and
    ``v = A u / sigma``, and the output is rescaled instead of the weight,
    ``y = s A x + b`` with ``s = min(1, beta / sigma)``. The backward runs the layer's input
    gradient on ``[s g; v]``: rows ``:n`` are the input gradient, row ``n`` is ``A^T v``, the
    adjoint half round, so ``u`` advances in the backward. The weight gradient runs on
    ``[s g; k v]`` against ``[x; u]``, which adds the sigma term ``k v (x) u`` with
    ``k = dL/dsigma = -s <g, A x> / sigma`` (``<g, A x> = <A^T g, x>``, read off the input
    gradient) at the cost of one more image. Compared with the parametrization (``W -> s W``)
    no weight-sized tensor is written, read or multiplied and no single-image product runs
    (a forward that no backward will follow takes the adjoint half round as one). Values,
    gradients and ``u`` equal the parametrization's to float rounding
    (tests/spectral/test_fused.py), double backward included (exact DataGrad): it recomputes
    the layer with autograd. Because ``u`` advances in the backward, two forwards before one
    backward both estimate from the stored ``u`` (the parametrization advances it in between),
    and a grad-enabled training forward that is never backpropagated leaves ``u`` where it was
    (under ``no_grad`` it advances in the forward). Memory: the layer keeps ``cat([x, u])``
    besides ``x``, one more input-sized tensor until the backward.

    The fold is skipped, and the parametrization path runs, for eval and frozen forwards,
    accelerators (CUDA graphs there), autocast, dtype mismatches, ``method="matrix"``,
    ``detach_uv=False``, grouped convolutions (ops Note [blocks]), non-zero or asymmetric
    padding, inputs at another resolution than ``u``, ``parametrize.cached()``, ``torch.compile``, an input that needs no gradient while
    the weight does (a first layer: the fold reads ``<g, A x>`` off the input gradient), and
    layers whose batch output is over ``FOLD_RATIO`` times their weight (rescaling the output
    would then cost more than rescaling the weight).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize

from sn_lightning.spectral.ops import _power_iteration, _transforms_active

__all__ = ["FOLD_RATIO", "fused_forward", "supports_fold"]

# Fold while the batch output has at most this many elements per weight element: past it the
# activation-sized passes (concatenated input, output rescale, gradient copy, dot) cost more than
# the parametrization's weight-sized ones. ResNet-18 at 32 px, batch 128: the stem (ratio 223) is
# +9 ms a step folded, layers 3-4 (ratio <= 4) gain, layer1 (14) and layer2 (2-32) are within noise
# either way; ViT-Tiny at 32 px (64 tokens a batch row, ratio 5-22 for its Linear layers) was
# 1.06x plain folded at ratio 64 and 1.01-1.03x on the parametrization.
FOLD_RATIO = 4.0
_BASES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def supports_fold(layer: nn.Module) -> bool:
    """True for plain ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (stock ``forward``/``_conv_forward``)."""
    for base in _BASES:
        if isinstance(layer, base):
            cls = type(layer)
            if base is nn.Linear:
                return cls.forward is base.forward
            return cls.forward is base.forward and cls._conv_forward is base._conv_forward  # type: ignore[attr-defined]
    return False


@dataclass(frozen=True)
class _Geometry:
    """How the layer maps a batch: ``kind`` "linear" or "conv" with symmetric zero padding."""

    kind: str
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def apply(self, X: Tensor, W: Tensor) -> Tensor:
        """``A X`` for a batch ``X``, no bias."""
        if self.kind == "linear":
            return X @ W.t()
        conv = _CONV[W.dim() - 2]
        return conv(X, W, None, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, G: Tensor, X: Tensor, W: Tensor) -> Tensor:
        """``A^T G`` (``X`` gives the input shape)."""
        if self.kind == "linear":
            return G @ W
        return torch.ops.aten.convolution_backward(
            G, X, W, None, self.stride, self.padding, self.dilation, False,
            [0] * len(self.stride), self.groups, [True, False, False],
        )[0]  # fmt: skip

    def weight_grad(self, G: Tensor, X: Tensor, W: Tensor) -> Tensor:
        """``sum_b G_b (x) X_b``: the weight gradient of ``<G, A X>``."""
        if self.kind == "linear":
            return G.t() @ X
        return torch.ops.aten.convolution_backward(
            G, X, W, None, self.stride, self.padding, self.dilation, False,
            [0] * len(self.stride), self.groups, [False, True, False],
        )[1]  # fmt: skip


def _geometry(norm: Any) -> _Geometry | None:
    """The fold geometry of a BoundedSpectralNorm's layer; None where it does not apply."""
    spec = norm.spec
    if norm.method != "operator":
        return None
    if spec.kind == "linear":
        return _Geometry("linear")
    if spec.kind != "conv" or spec.padding_mode != "zeros":
        return None
    if any(lo != hi for lo, hi in spec.padding):
        return None
    if spec.groups > 1:  # per-group iteration (ops Note [blocks]): the parametrization's path
        return None
    return _Geometry(
        "conv", spec.stride, tuple(lo for lo, _ in spec.padding), spec.dilation, spec.groups
    )


def _alias(Y: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The first rows of ``Y`` as a tensor of ``shape`` that is not an autograd view.

    A custom Function may not return a view of its own intermediate (in-place ops on it, such
    as a following ``ReLU(inplace=True)``, would raise); a fresh tensor on the same storage is
    not a view, and its memory is disjoint from the row ``A u`` that is read before.
    """
    if Y.dim() == 2 and Y.is_contiguous():  # linear: any leading shape, row-major
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    elif Y.is_contiguous() or (Y.dim() == 4 and Y.is_contiguous(memory_format=torch.channels_last)):
        stride = Y.stride()  # batch outermost: the first rows are a prefix of the storage
    else:
        return Y[: shape[0]].reshape(shape).clone()
    return Y.new_empty(()).set_(Y.untyped_storage(), Y.storage_offset(), shape, stride)


class _FoldedLayer(torch.autograd.Function):
    """``y = min(1, beta / ||A u||) A x + b``, with ``A u`` computed as the batch's last row."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        norm: Any,
        geo: _Geometry,
        defer: bool,
    ) -> Tensor:
        """``x`` ``(B, C, *spatial)`` (conv) or ``(..., in)`` (linear); returns the layer output.

        ``defer``: a backward will follow, which advances ``u`` from its input gradient;
        otherwise the adjoint half round runs here.
        """
        linear = geo.kind == "linear"
        xf = x.reshape(-1, x.shape[-1]) if linear else x
        n = xf.shape[0]
        eps, vnorm = norm.min_norm, torch.linalg.vector_norm
        u = norm.u  # stored unit, but a loaded or re-typed one may be off by rounding
        if norm.n_power_iterations > 1:
            u, _, _ = _power_iteration(*norm._operator(weight), u, norm.n_power_iterations - 1, eps)
        u_norm = float(vnorm(u))
        X = torch.cat([xf, u])
        Y = geo.apply(X, weight)
        Au = Y[n:]  # = ||u|| A u_hat for the unit u_hat
        Au_norm = float(vnorm(Au))
        # ||A u_hat||; 0 for a zero u, as the parametrization (0/0 read as 1 scaled by beta)
        sigma = Au_norm / u_norm if u_norm > eps else 0.0
        v = Au / max(Au_norm, eps)
        if not defer:
            _advance(norm, norm._operator(weight)[1](v))
        clamp = sigma > norm.beta
        scale = norm.beta / sigma if clamp else 1.0
        shape = (*x.shape[:-1], Y.shape[1]) if linear else (n, *Y.shape[1:])
        y = _alias(Y, shape)
        if clamp:
            y.mul_(scale)
        if bias is not None:
            y.add_(bias if linear else bias.view(-1, *([1] * (y.dim() - 2))))
        ctx.save_for_backward(x, weight, bias, X)
        ctx.v, ctx.geo, ctx.n, ctx.sigma, ctx.scale, ctx.clamp = v, geo, n, sigma, scale, clamp
        ctx.norm, ctx.defer, ctx.u_norm = norm, defer, u_norm
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, W, bias, X = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None, None, None)
        # create_graph (double backward) or a vmapped backward (is_grads_batched: no out= or host
        # reads on the batched gradient): recompute with autograd
        if torch.is_grad_enabled() or _is_batched(g):
            if ctx.defer:
                with torch.no_grad():
                    _advance(ctx.norm, ctx.norm._operator(W)[1](ctx.v))
            return (*_differentiable_grads(ctx, g, x, W, bias, X), *none)
        geo, n, s = ctx.geo, ctx.n, ctx.scale
        gf = g.reshape(n, g.shape[-1]) if geo.kind == "linear" else g
        grad_b = gf.sum([d for d in range(gf.dim()) if d != 1]) if need_b else None
        # One input-gradient product for [s g, v]: s A^T g for x, and A^T v, the adjoint half
        # round that advances u (ops Note [estimate, then advance]).
        G = gf.new_empty((n + 1, *gf.shape[1:]))
        torch.mul(gf, s, out=G[:n])
        G[n:] = ctx.v
        gX = geo.input_grad(G, X, W)
        if ctx.defer:
            _advance(ctx.norm, gX[n:])
        grad_w = None
        if need_w:
            if ctx.clamp:
                # <g, A x> = <A^T g, x> = <gX, x> / s;  dL/dsigma = -s <g, A x> / sigma, and
                # the row holds u = ||u|| u_hat, so its factor carries 1 / ||u||.
                dot = float(torch.vdot(gX[:n].reshape(-1), X[:n].reshape(-1))) / s
                G[n:] *= -s * dot / (ctx.sigma * ctx.u_norm)
                grad_w = geo.weight_grad(G, X, W)
            else:
                grad_w = geo.weight_grad(G[:n], X[:n], W)
        return (gX[:n].view(x.shape) if need_x else None), grad_w, grad_b, *none


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is vmapped: ``torch.func.vmap`` or the older vmap of ``is_grads_batched``."""
    functorch = torch._C._functorch
    legacy = getattr(functorch, "is_legacy_batchedtensor", None)
    return bool(functorch.is_batchedtensor(t) or (legacy is not None and legacy(t)))


def _advance(norm: Any, w: Tensor) -> None:
    """Store ``u = w / ||w||`` (``w = A^T v``, one input); keep ``u`` where ``w`` is 0 (``ops._next_u``)."""
    w_norm = float(torch.linalg.vector_norm(w))
    if w_norm > norm.min_norm:
        torch.div(w, w_norm, out=norm.u)


def _differentiable_grads(
    ctx: Any, g: Tensor, x: Tensor, W: Tensor, bias: Tensor | None, X: Tensor
) -> tuple[Tensor | None, ...]:
    """The layer's gradients as a graph (double backward): the forward redone with autograd.

    ``sigma = <A u, v>`` with ``u`` (the batch's last row) and ``v`` constants, as in the
    parametrization's rescale, so first and second derivatives match it.
    """
    geo, n = ctx.geo, ctx.n
    linear = geo.kind == "linear"
    with torch.enable_grad():
        xf = x.reshape(-1, x.shape[-1]) if linear else x
        Y = geo.apply(torch.cat([xf, X[n:]]), W)
        y = Y[:n]
        if ctx.clamp:
            sigma = torch.vdot(Y[n:].reshape(-1), ctx.v.reshape(-1)) / ctx.u_norm
            y = y * (ctx.norm.beta / sigma)
        if bias is not None:
            y = y + (bias if linear else bias.view(-1, *([1] * (y.dim() - 2))))
        y = y.reshape(g.shape)
        wanted = [t for t, need in zip((x, W, bias), ctx.needs_input_grad[:3], strict=True) if need]
        grads = iter(torch.autograd.grad(y, wanted, g, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])


def _fold_norm(layer: nn.Module, x: Tensor) -> Any:
    """The layer's BoundedSpectralNorm if this forward can fold (Note above), else None."""
    if not parametrize.is_parametrized(layer, "weight") or parametrize._cache_enabled:
        return None
    plist = layer.parametrizations.weight
    norm = plist[0]
    if len(plist) != 1 or getattr(norm, "_fold_geometry", None) is None:  # not a foldable SN
        return None
    if not (norm.batch_fold and norm.training and not norm.frozen):
        return None
    if norm.method != "operator" or not norm.detach_uv:
        return None
    W = plist.original
    if W.device.type != "cpu" or x.device != W.device or torch.is_autocast_enabled("cpu"):
        return None
    if not (x.dtype == W.dtype == norm.u.dtype) or torch.compiler.is_compiling():
        return None
    if forward_ad._current_level >= 0 or _transforms_active():  # _FoldedLayer has no jvp/vmap
        return None
    if norm.spec.kind == "linear":
        if x.dim() < 1 or x.shape[-1] != W.shape[1]:
            return None
        out_numel = x.numel() // W.shape[1] * W.shape[0]
    else:
        if x.dim() != W.dim() or x.shape[1:] != norm.u.shape[1:]:
            return None
        out_numel = x.shape[0] * norm.output_numel
    if out_numel > FOLD_RATIO * W.numel():
        return None
    if torch.is_grad_enabled() and W.requires_grad and not x.requires_grad:
        return None
    return norm


def check_resolution(layer: nn.Module, x: Tensor) -> None:
    """Warn once (per model) if a convolution normalized at one input size runs at another.

    ``u`` and the bound are those of the operator at the recorded size (``apply_spectral_norm``'s
    ``input_shape``); the same kernel at another size is another operator, whose norm can exceed
    beta (ResNet-18 normalized at 32 px and run at 64 px: layer4 at 1.88 beta).
    """
    if not isinstance(x, Tensor) or not parametrize.is_parametrized(layer, "weight"):
        return  # an fx Proxy: tracing, not running
    norm = layer.parametrizations.weight[0]  # type: ignore[union-attr, index]
    flag = getattr(norm, "resolution_warning", None)
    if flag is None or flag["warned"] or norm.method != "operator":
        return
    if norm.spec.kind != "conv":
        return
    u = norm.u
    seen = tuple(x.shape[1:]) if x.dim() == u.dim() else tuple(x.shape)
    if seen != tuple(u.shape[1:]):
        flag["warned"] = True
        name = repr(norm.layer_name) if norm.layer_name else type(layer).__name__
        recorded = "x".join(map(str, u.shape[1:]))
        warnings.warn(
            f"layer {name} was normalized for inputs {recorded} but now sees "
            f"{'x'.join(map(str, seen))}: its operator norm at this size is not bounded by beta, "
            "nor are other layers' at other sizes (apply_spectral_norm at the resolution you "
            "train and evaluate at; warned once per model)",
            stacklevel=3,
        )


def fused_forward(self: nn.Module, input: Tensor) -> Tensor:
    """Forward of a parametrized plain Conv/Linear: the fold when it applies, else the stock one.

    Installed on the class that ``torch.nn.utils.parametrize`` injects for this one module (so
    deepcopies and DataParallel replicas share it, and removing the parametrization removes it).
    Also warns once when a convolution runs at another resolution than its ``u``.
    """
    if not torch.compiler.is_compiling():
        check_resolution(self, input)
    norm = _fold_norm(self, input)
    if norm is None:
        base = next(b for b in _BASES if isinstance(self, b))
        return base.forward(self, input)
    W, bias = self.parametrizations.weight.original, self.bias
    defer = torch.is_grad_enabled() and (
        input.requires_grad or W.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _FoldedLayer.apply(input, W, bias, norm, norm._fold_geometry, defer)


def install(layer: nn.Module, norm: Any) -> None:
    """Give a freshly parametrized plain Conv/Linear the fused forward (no-op for others)."""
    geo = _geometry(norm) if supports_fold(layer) else None
    norm._fold_geometry = geo
    norm.output_numel = (
        math.prod(norm.spec.output_shape(layer.parametrizations.weight.original.detach()))
        if geo is not None and geo.kind == "conv"
        else 0
    )
    if supports_fold(layer):  # the fold where geo applies; the resolution check everywhere
        type(layer).forward = fused_forward
