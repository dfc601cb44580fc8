"""Conv → BatchNorm folding for attack loops: the same eval-mode function with fewer kernels.

An eval-mode BatchNorm after a convolution is a per-channel affine map, so the pair is one
convolution with weight ``W * s`` and bias ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``
(per output channel). An attack runs the model forward and backward (input gradient only) k times
with fixed weights, so folding once per attack call removes every BatchNorm kernel from the k
forward and backward passes. The weights are read through the layers' parametrizations (spectral
norm included) when the view is refreshed, inside the attack's ``parametrize.cached()`` context.

The folded view is a ``torch.fx`` trace of the model with each foldable pair replaced; models that
``torch.fx.symbolic_trace`` cannot trace (data-dependent control flow), and models with a hook on
any module or a global module hook (the view would bypass hooks of folded layers and of modules
traced through), are attacked as they are. Only stock convolutions and BatchNorms fold (a subclass
or parametrized class with its own forward, e.g. timm's ``Conv2dSame`` or ``BatchNormAct2d``,
computes more than the pair). A trace also drops what fx does not record (a ``torch.no_grad()``
block inside a forward, a branch on a Python attribute); so each new view is checked once against
the model on the attack's first examples (logits and input gradients) and dropped if they differ,
and views are rebuilt when a module's plain attributes change.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.modules.module as torch_module
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from sn_lightning.spectral.grouped import is_group_hook
from sn_lightning.spectral.ops import forward_kind

__all__ = ["FoldedConv", "folded_view"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], _View | None]] = (
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
        self.checked = False  # compared with the model on an example (`_agrees`)


def _hooked(m: nn.Module) -> bool:
    """Has a hook that may change values (the spectral norms' grouped hooks do not)."""
    hooks = (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    return (
        bool(m._backward_hooks or m._backward_pre_hooks)
        or "forward" in vars(m)  # patched on the instance: fx traces the class's
        or not all(is_group_hook(h) for h in hooks)
    )


def _global_hooks() -> bool:
    """A module hook registered for every module (``register_module_forward_hook`` and kin)."""
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


_MODULE_STATE = frozenset(vars(nn.Module())) - {"training"}  # the containers, hooks and flags
_PLAIN = (int, float, bool, str, type(None))


def _attributes(m: nn.Module) -> Iterator[object]:
    """A module's own attributes as a trace bakes them in: plain values by value, others by id."""
    for key, value in vars(m).items():
        if key in _MODULE_STATE:
            continue
        plain = isinstance(value, _PLAIN) or (
            isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
        )
        yield key, (value if plain else id(value))


def _signature(model: nn.Module) -> tuple[object, ...]:
    """Changes when modules, parameters, buffers or modules' attributes change, or hooks.

    The cached view is then rebuilt. A trace bakes in attributes (``self.scale = 10.0``, a tensor
    attribute that is not a buffer, ``self.training``). Tensors matter because the trace holds
    the parameters and buffers of the modules it traced through (e.g. ``InputNormalize``'s mean
    and std) by reference, and ``model.to(device)`` (Lightning's teardown moves the model to the
    CPU) or ``load_state_dict(assign=True)`` rebind them to new tensors.
    """
    modules = ((id(m), _hooked(m), *_attributes(m)) for m in model.modules())
    tensors = (id(t) for t in (*model.parameters(), *model.buffers()))
    return (*modules, -1, *tensors)


def _stock_batchnorm(bn: nn.Module) -> bool:
    """A BatchNorm whose forward is torch's own (a subclass may add an activation, e.g. timm's)."""
    cls = type(bn).__bases__[0] if parametrize.is_parametrized(bn) else type(bn)
    stock = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
    return "forward" not in vars(bn) and cls.forward in stock


def _agrees(model: nn.Module, view: nn.Module, x: Tensor) -> bool:
    """Whether ``view`` computes ``model``'s logits and input gradients at ``x[:2]``.

    Both run from the same RNG state, which is restored afterwards; the tolerance allows for the
    fold's rounding (float32: 1e-3 of the largest value; half and bfloat16: 3e-2).
    """
    x = x[:2].detach().clone()
    if x.device.type == "meta":
        return True  # no values to compare
    tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 3e-2
    fork = {"devices": [x.device]} if x.device.type == "cuda" else {"devices": []}
    results = []
    for net in (model, view):
        with torch.random.fork_rng(**fork), torch.enable_grad():
            leaf = x.clone().requires_grad_(True)
            out = net(leaf)
            if not isinstance(out, Tensor) or not out.is_floating_point():
                return False
            gen = torch.Generator(device=out.device).manual_seed(0)
            weights = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
            (grad,) = torch.autograd.grad((out * weights).sum(), leaf, allow_unused=True)
        if grad is None:
            return False
        results.append((out.detach(), grad))
    for a, b in zip(results[0], results[1], strict=True):
        scale = float(a.abs().max())
        if not float((a - b).abs().max()) <= tol * scale:  # `not <=`: NaN disagrees
            return False
    return True


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
            and forward_kind(conv) == "base"
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and _stock_batchnorm(bn)
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


def folded_view(model: nn.Module, example: Tensor | None = None) -> nn.Module:
    """`model` with every Conv → eval-mode BatchNorm pair folded, or `model` itself.

    For attack loops only: call in eval mode (BatchNorm uses running statistics) inside
    ``parametrize.cached()``; the view's folded weights are constants (no parameter gradients)
    snapshotted now, so build it again after the weights change (one call per attack).

    Args:
        model: any module mapping inputs to logits.
        example: inputs ``(N, ...)`` the model takes; a view not yet checked must match the model's
            logits and input gradients on its first two (else `model` is returned).

    Returns:
        A ``torch.fx.GraphModule`` sharing `model`'s other submodules, or `model` when it has
        nothing to fold, cannot be traced, has a hook, or has a BatchNorm in training mode.
    """
    if _global_hooks() or any(
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
    if example is not None and len(example) > 0 and not view.checked:
        if not _agrees(model, view.module, example):
            _CACHE[model] = (sig, None)
            return model
        view.checked = True
    return view.module


def _clear_cache() -> Any:
    """Forget every cached view (tests)."""
    _CACHE.clear()
