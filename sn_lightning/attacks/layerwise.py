"""Layerwise adversarial perturbation (Sankaranarayanan, Jain, Chellappa, Lim, AAAI 2018).

Regularizing Deep Networks Using Efficient Layerwise Adversarial Training (arXiv 1705.07819):
the outputs of chosen hidden layers are perturbed in the gradient's ascent direction, using the
activation gradients that the *previous* mini-batch's backward pass computed anyway. One forward
and one backward per step; no extra passes::

    delta[l] = none for each chosen layer l
    each training step:
        forward; at layer l send h_l + delta[l] downstream (skip if none or shapes differ)
        loss; backward: keep g_l = dLoss/dh_l; optimizer step
        delta[l] = eps_l * sign(g_l) (or eps_l * g_l / ||g_l||_2 per example), detached;
                   zero if g_l is not finite (e.g. a GradScaler-skipped step)
    eval mode, and inside an input attack (any mode): no perturbation, nothing recorded

Sample i of batch t receives the perturbation computed for sample i of batch t-1 (usually from a
different class, as in the paper); the staleness is intended. Use ``drop_last=True`` so batch
shapes match; a mismatched batch is left unperturbed.

Implementation: forward hooks return ``h + delta`` (out of place, so a later in-place ReLU cannot
corrupt the stored gradient) and register a tensor hook that keeps ``dLoss/dh`` during the
backward. Nothing synchronizes with the device: the finiteness check is folded into a
``torch.where``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sn_lightning.attacks.base import in_attack
from sn_lightning.attacks.threat import unit_l2
from sn_lightning.errors import ConfigError

__all__ = ["LayerwisePerturbation", "default_layerwise_layers", "layerwise_layers"]

_MODES = ("sign", "l2")


def _is_internal(name: str) -> bool:
    """Modules created by torch.nn.utils.parametrize are not layers of the network."""
    return "parametrizations." in name or name.endswith("parametrizations")


def default_layerwise_layers(model: nn.Module) -> list[str]:
    """The default layers to perturb: the stages of the backbone.

    * ResNets (torchvision, timm): the modules named ``layer1`` .. ``layer4`` (any prefix);
    * ViTs (timm): each transformer block ``blocks.<i>``;
    * otherwise: descend through wrappers with a single parametrized child (e.g. an input
      normalization followed by the network) to the first level with several parametrized
      children, and take all of them but the last (the classifier head).

    Args:
        model: the network.

    Returns:
        Module names (as in ``model.named_modules()``), in registration order.
    """
    names = [n for n, _ in model.named_modules() if n and not _is_internal(n)]
    stages = [n for n in names if n.rsplit(".", 1)[-1] in {"layer1", "layer2", "layer3", "layer4"}]
    if stages:
        return stages
    blocks = [n for n in names if n.split(".")[-2:-1] == ["blocks"] and n.split(".")[-1].isdigit()]
    if blocks:
        return blocks
    prefix, module = "", model
    while True:
        children = [(n, m) for n, m in module.named_children() if any(True for _ in m.parameters())]
        if len(children) != 1:
            break
        name, module = children[0]
        prefix = f"{prefix}{name}."
    if len(children) < 2:
        raise ConfigError(
            f"cannot choose default layers for {type(model).__name__}; pass layer name patterns"
        )
    return [prefix + n for n, _ in children[:-1]]


def layerwise_layers(model: nn.Module, layers: Sequence[str] | str | None = None) -> list[str]:
    """The module names that ``layers`` (fnmatch patterns; None: the default stages) choose.

    Returns:
        Names as in ``model.named_modules()``, each once, in the order the patterns match them.

    Raises:
        ConfigError: a pattern matches no module (the message lists some names).
    """
    if layers is None:
        return default_layerwise_layers(model)
    modules = [n for n, _ in model.named_modules() if n and not _is_internal(n)]
    names: list[str] = []
    for pattern in [layers] if isinstance(layers, str) else list(layers):
        matched = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            some = ", ".join(modules[:12])
            raise ConfigError(f"layer pattern {pattern!r} matches no module; names: {some}")
        names += [n for n in matched if n not in names]
    return names


class LayerwisePerturbation:
    """Perturb hidden activations with the previous step's activation gradients.

    Registers forward hooks on the chosen layers on construction; `remove` takes them off.
    Perturbs only modules in training mode; `paused` switches it off temporarily (for example
    around the forward passes of a train-mode input attack).

    Args:
        model: the network (the unwrapped module under DDP).
        layers: fnmatch patterns on module names (``model.named_modules()``); ``None`` uses
            `default_layerwise_layers`. Every pattern must match at least one module.
        eps: perturbation size (> 0) in activation units: one value, or a mapping from name
            patterns to values (first match wins; every chosen layer needs one).
        mode: ``"sign"``: ``delta = eps * sign(g)``; ``"l2"``: ``delta = eps * g / ||g||_2`` per
            example.

    Attributes:
        layers: the names of the hooked modules.
        deltas: name -> the perturbation for the next training forward (or absent).

    Examples::
        >>> layerwise = LayerwisePerturbation(model, eps=0.01)  # ResNet: layer1 .. layer4
        >>> for x, y in loader:  # drop_last=True
        ...     loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     optimizer.step()
        ...     optimizer.zero_grad()
        >>> layerwise.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | str | None = None,
        eps: float | Mapping[str, float] = 0.01,
        mode: Literal["sign", "l2"] = "sign",
    ) -> None:
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        self.mode = mode
        modules = dict(model.named_modules())
        names = layerwise_layers(model, layers)
        self.layers: list[str] = names
        self.eps: dict[str, float] = {n: self._eps_for(n, eps) for n in names}
        self.deltas: dict[str, Tensor] = {}
        self.enabled = True
        self._handles: list[RemovableHandle] = [
            modules[n].register_forward_hook(self._make_forward_hook(n)) for n in names
        ]

    @staticmethod
    def _eps_for(name: str, eps: float | Mapping[str, float]) -> float:
        if isinstance(eps, Mapping):
            value = next((v for p, v in eps.items() if fnmatch.fnmatchcase(name, p)), None)
            if value is None:
                raise ConfigError(f"no eps pattern in {list(eps)} matches layer {name!r}")
        else:
            value = eps
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"eps must be a number > 0, got {value!r} for layer {name!r}")
        return float(value)

    def _make_forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not (self.enabled and module.training and isinstance(output, Tensor)):
                return None
            if in_attack():  # an input attack's forward, e.g. with eval_mode=False
                return None
            delta = self.deltas.get(name)
            if delta is not None and delta.shape == output.shape:
                output = output + delta.to(output.device, output.dtype)  # out of place
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(self._make_grad_hook(name))
            return output

        return hook

    def _make_grad_hook(self, name: str) -> Any:
        eps = self.eps[name]

        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                direction = grad.sign() if self.mode == "sign" else unit_l2(grad)
                finite = torch.isfinite(grad).all()  # no host sync: folded into where()
                delta = torch.where(finite, eps * direction, torch.zeros_like(direction))
            self.deltas[name] = delta.detach()

        return hook

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Neither perturb nor record inside this block."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def reset(self) -> None:
        """Forget the stored perturbations (the next step is unperturbed)."""
        self.deltas.clear()

    def remove(self) -> None:
        """Remove all hooks and stored perturbations."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.deltas.clear()

    def __repr__(self) -> str:
        eps = sorted(set(self.eps.values()))
        eps_repr = f"{eps[0]:g}" if len(eps) == 1 else repr(self.eps)
        return f"LayerwisePerturbation(layers={self.layers}, eps={eps_repr}, mode={self.mode!r})"
