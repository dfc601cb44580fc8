"""Conv → BatchNorm folding for attack loops: the same eval-mode function with fewer kernels.

An eval-mode BatchNorm after a convolution is a per-channel affine map, so the pair is one
convolution with weight ``W * s`` and bias ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``
(per output channel). An attack runs the model forward and backward (input gradient only) k times
with fixed weights, so folding once per attack call removes every BatchNorm kernel from the k
forward and backward passes. The weights are read through the layers' parametrizations (spectral
norm included) when the view is refreshed, inside the attack's ``parametrize.cached()`` context.

The folded view is a ``torch.fx`` trace of the model with each foldable pair replaced; models that
``torch.fx.symbolic_trace`` cannot trace (data-dependent control flow), and models with a forward
hook on any module (the view would bypass hooks of folded layers and of modules traced through),
are attacked as they are.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, fx, nn

from sn_lightning.spectral.grouped import is_group_hook

__all__ = ["FoldedConv", "folded_view"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], _View | None]] = (
    weakref.WeakKeyDictionary()
)


class FoldedConv(nn.Module):
    """A convolution with its following eval-mode BatchNorm folded in; weights are constants.

    Call :meth:`refresh` whenever the source weights or BatchNorm statistics may have changed.

    Args:
        conv: the Conv1d/2d/3d (possibly parametrized); not registered as a submodule.
        bn: the BatchNorm that consumes the conv's output (``track_running_stats=True``).
    """

    def __init__(self, conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self._src = (conv, bn)  # a tuple: not registered, not in any state dict
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Fold the current weights and running statistics (no autograd history)."""
        conv, bn = self._src
        w = conv.weight.detach()
        assert bn.running_var is not None
        assert bn.running_mean is not None
        # at least float32 (half weights), float64 for float64 models
        dt = torch.promote_types(w.dtype, torch.float32)
        scale = torch.rsqrt(bn.running_var.to(dt) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(dt)
        shift = -bn.running_mean.to(dt) * scale
        if conv.bias is not None:
            shift = shift + conv.bias.detach().to(dt) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(dt)
        view = (-1,) + (1,) * (w.dim() - 1)
        self.weight = (w.to(dt) * scale.view(view)).to(w.dtype)
        self.bias = shift.to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``bn(conv(x))`` in eval mode, as one convolution."""
        assert self.weight is not None, "call refresh() first"
        return self._src[0]._conv_forward(x, self.weight, self.bias)


class _View:
    def __init__(self, module: fx.GraphModule, folds: list[FoldedConv]) -> None:
        self.module, self.folds = module, folds


def _hooked(m: nn.Module) -> bool:
    """Has a hook that may change values (the spectral norms' grouped hooks do not)."""
    hooks = (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    return bool(m._backward_hooks) or not all(is_group_hook(h) for h in hooks)


def _signature(model: nn.Module) -> tuple[int, ...]:
    """Changes when modules, parameters or buffers are added, replaced or rebound, or hooked.

    The cached view is then rebuilt. Tensors matter because the trace holds the parameters and
    buffers of the modules it traced through (e.g. ``InputNormalize``'s mean and std) by
    reference, and ``model.to(device)`` (Lightning's teardown moves the model to the CPU) or
    ``load_state_dict(assign=True)`` rebind them to new tensors.
    """
    modules = (id(m) * 2 + _hooked(m) for m in model.modules())
    tensors = (id(t) for t in (*model.parameters(), *model.buffers()))
    return (*modules, -1, *tensors)


def _build(model: nn.Module) -> _View | None:
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # any tracing failure means: attack the model as it is
        return None
    modules = dict(gm.named_modules())
    folds: list[FoldedConv] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        conv = modules.get(node.target)
        (user,) = node.users
        bn = modules.get(user.target) if user.op == "call_module" else None
        if not (
            isinstance(conv, _CONVS)
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.track_running_stats
            and bn.running_var is not None
            and bn.num_features == conv.out_channels
            and not _hooked(conv)
            and not _hooked(bn)
            and len(user.args) == 1
            and not user.kwargs
        ):
            continue
        fold = FoldedConv(conv, bn)
        name = f"_sn_fold_{len(folds)}"
        gm.add_submodule(name, fold)
        node.target = name
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        folds.append(fold)
    if not folds:
        return None
    gm.graph.lint()
    gm.delete_all_unused_submodules()  # the folded convs and BatchNorms (FoldedConv keeps refs)
    gm.recompile()
    return _View(gm, folds)


def folded_view(model: nn.Module) -> nn.Module:
    """`model` with every Conv → eval-mode BatchNorm pair folded, or `model` itself.

    For attack loops only: call in eval mode (BatchNorm uses running statistics) inside
    ``parametrize.cached()``; the view's folded weights are constants (no parameter gradients)
    snapshotted now, so build it again after the weights change (one call per attack).

    Args:
        model: any module mapping inputs to logits.

    Returns:
        A ``torch.fx.GraphModule`` sharing `model`'s other submodules, or `model` when it has
        nothing to fold, cannot be traced, has a hook, or has a BatchNorm in training mode.
    """
    if any(
        _hooked(m) or (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training)
        for m in model.modules()
    ):
        return model
    sig = _signature(model)
    hit = _CACHE.get(model)
    if hit is None or hit[0] != sig:
        hit = (sig, _build(model))
        _CACHE[model] = hit
    view = hit[1]
    if view is None:
        return model
    for fold in view.folds:
        fold.refresh()
    return view.module


def _clear_cache() -> Any:
    """Forget every cached view (tests)."""
    _CACHE.clear()
