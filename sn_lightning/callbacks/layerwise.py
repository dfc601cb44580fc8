"""`LayerwiseTraining`: perturb hidden activations with the previous batch's gradients (AAAI 2018)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
from torch import Tensor

from sn_lightning.attacks import LayerwisePerturbation, layerwise_layers
from sn_lightning.errors import ConfigError, ConfigWarning


class LayerwiseTraining(L.Callback):
    """Layerwise adversarial training (Sankaranarayanan, Jain, Chellappa, Lim, AAAI 2018).

    The outputs of the chosen hidden layers get ``eps * sign(g)`` (or the per-example
    l2-normalized gradient), with ``g`` the activation gradients kept from the previous
    mini-batch's backward pass: exactly one forward and one backward per step. Nothing is
    perturbed in eval mode (validation, test), inside input attacks (in any mode: the
    stored perturbations stay those of the last training backward) or at the first step.

    Args:
        eps: perturbation size per layer in activation units; 0: off (this callback does nothing).
        layers: fnmatch patterns of module names under ``model`` (the normalization + backbone
            ``Sequential``: ``net.layer1``); null: the backbone's stages (ResNet ``layer1..4``,
            ViT ``blocks.<i>``, else the top-level blocks but the head).
        mode: sign (the paper) or l2 (per-example normalized gradient).
    """

    def __init__(
        self,
        eps: float = 0.0,
        layers: list[str] | None = None,
        mode: Literal["sign", "l2"] = "sign",
    ) -> None:
        if eps < 0:
            raise ConfigError(f"layerwise eps must be >= 0 (0 = off), got {eps!r}")
        if eps == 0 and (layers is not None or mode != "sign"):
            warnings.warn(
                "layerwise.eps is 0 (off), so layers and mode have no effect",
                ConfigWarning,
                stacklevel=2,
            )
        self.eps, self.layers, self.mode = eps, layers, mode
        self.perturbation: LayerwisePerturbation | None = None
        self._loaded_deltas: dict[str, Tensor] = {}

    def check_config(self, model: L.LightningModule, datamodule: object) -> None:
        """The layer patterns against the backbone, before the trainer starts (fit's ``check_run``)."""
        if self.eps > 0:
            layerwise_layers(model.model, self.layers)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Register the hooks on the backbone (once)."""
        if self.eps > 0 and self.perturbation is None:
            self.perturbation = LayerwisePerturbation(
                pl_module.model, layers=self.layers, eps=self.eps, mode=self.mode
            )
        if self.perturbation is not None and self._loaded_deltas:
            self.perturbation.deltas.update(self._loaded_deltas)
            self._loaded_deltas = {}

    def state_dict(self) -> dict[str, Any]:
        """The perturbations for the next training forward (the last backward's): exact resume."""
        deltas = self.perturbation.deltas if self.perturbation is not None else {}
        return {"deltas": {name: d.detach().clone() for name, d in deltas.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the perturbations (applied now, or when :meth:`setup` registers the hooks)."""
        deltas = dict(state_dict.get("deltas", {}))
        if self.perturbation is not None:
            self.perturbation.deltas.update(deltas)
        else:
            self._loaded_deltas = deltas

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        if self.perturbation is not None:
            self.perturbation.remove()
            self.perturbation = None
