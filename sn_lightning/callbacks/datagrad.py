"""`DataGrad`: input-gradient regularization of the training loss (Ororbia et al. 2017)."""

from __future__ import annotations

import warnings
from typing import Literal

import lightning as L
from torch import Tensor

from sn_lightning.attacks import datagrad_fd_loss, datagrad_penalty
from sn_lightning.errors import ConfigError, ConfigWarning


class DataGrad(L.Callback):
    """Train on ``CE + lam * mean_i R(grad_x CE_i)``, ``R = ||.||_1`` or ``||.||_2^2``.

    Args:
        lam: penalty weight; 0: off (this callback does nothing).
        norm: l1 or l2 (squared).
        form: exact (double backprop, one forward, about 2-3x a plain step) or fd (finite
            difference with step `phi`: 2 forwards, 2 backwards; with l1 exactly FGSM training
            with clean weight ``1 - lam/phi``; needs ``lam <= phi``).
        phi: the finite-difference step in [0, 1] pixel units (form fd only).

    The loss is the model's cross-entropy, with its ``label_smoothing``. The logged
    ``train/datagrad_penalty`` is exact for ``exact`` and the finite-difference estimate of the same
    quantity for ``fd``.
    """

    def __init__(
        self,
        lam: float = 0.0,
        norm: Literal["l1", "l2"] = "l1",
        form: Literal["exact", "fd"] = "exact",
        phi: float = 0.1,
    ) -> None:
        if lam < 0:
            raise ConfigError(f"datagrad lam must be >= 0 (0 = off), got {lam!r}")
        if form not in ("exact", "fd"):
            raise ConfigError(f"unknown datagrad form {form!r}; valid choices: exact, fd")
        if norm not in ("l1", "l2"):
            raise ConfigError(f"unknown datagrad norm {norm!r}; valid choices: l1, l2")
        if form == "fd" and not 0 < lam <= phi and lam > 0:
            raise ConfigError(f"datagrad form fd needs 0 < lam <= phi, got lam={lam}, phi={phi}")
        if lam == 0 and (norm, form, phi) != ("l1", "exact", 0.1):
            warnings.warn(
                "datagrad.lam is 0 (off), so norm, form and phi have no effect",
                ConfigWarning,
                stacklevel=2,
            )
        self.lam, self.norm, self.form, self.phi = lam, norm, form, phi

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Claim the training objective when on."""
        if self.claims_objective:
            pl_module.set_objective(self._objective, owner=self)

    @property
    def claims_objective(self) -> bool:
        """Whether this callback replaces the training loss (``lam > 0``)."""
        return self.lam > 0

    def _objective(self, module: L.LightningModule, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        smoothing = float(getattr(module, "hparams", {}).get("label_smoothing", 0.0))
        # fp16 AMP: the data gradient is taken of the loss times the GradScaler's scale (PAPERS
        # 5.1: unscaled, it underflows)
        trainer = getattr(module, "_trainer", None)  # None: called outside a fit
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        if self.form == "exact":
            loss, penalty, logits = datagrad_penalty(
                module, x, y, self.norm, grad_scale=scale, label_smoothing=smoothing
            )
            loss = loss + self.lam * penalty
        else:
            loss, penalty, logits = datagrad_fd_loss(
                module,
                x,
                y,
                self.lam,
                self.phi,
                self.norm,
                label_smoothing=smoothing,
                grad_scale=scale,
            )
        module.log(  # Note [synchronised metrics] (lit/classifier.py)
            "train/datagrad_penalty", penalty.detach(), on_step=False, on_epoch=True, sync_dist=True
        )
        return loss, logits
