"""`AdversarialTraining`: perturb each training batch with an attack before the training step."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from sn_lightning.attacks import Attack
from sn_lightning.attacks.base import check_l2_radius
from sn_lightning.errors import ConfigError, ConfigWarning


def resolve_attack(attack: Attack, datamodule: object, input_shape: object) -> Attack:
    """Turn a relative radius (``eps_rel``/``gamma_rel``) into an absolute one, once, from the data.

    The scale is the mean l2 norm of the full, unaugmented training split (PAPERS 1.5's C2),
    computed identically on every rank. ``input_shape``: one input (no batch dim) or None.

    Raises:
        ConfigError: the data module cannot give the scale, or the radius covers every input.
    """
    if not attack.is_resolved:
        if datamodule is None or not hasattr(datamodule, "mean_input_norm"):
            raise ConfigError(
                f"{attack!r} has a relative radius but the data module cannot give its scale"
            )
        attack.resolve_eps(datamodule.mean_input_norm())
    check_attack_radius(attack, input_shape)
    return attack


def check_attack_radius(attack: Attack, input_shape: object) -> None:
    """Refuse an absolute l2 radius that covers the whole [0, 1] box of ``input_shape`` inputs."""
    eps = getattr(attack, "eps", None)
    if getattr(attack, "norm", None) != "l2" or eps is None or not getattr(attack, "clip", True):
        return
    if input_shape is not None:
        check_l2_radius(eps, tuple(input_shape), type(attack).__name__)  # type: ignore[arg-type]


def check_attack_config(attack: Attack, model: L.LightningModule, datamodule: object) -> None:
    """Before training: resolve a relative radius where the data is on disk, check the l2 radius.

    Where the files are still to be downloaded (``prepare_data``), a relative radius is resolved,
    and checked, in ``setup`` instead.
    """
    shape = _input_shape(model)
    files_present = getattr(datamodule, "files_present", None)
    if attack.is_resolved or (files_present is not None and files_present()):
        resolve_attack(attack, datamodule, shape)


def attack_precision(trainer: L.Trainer) -> contextlib.AbstractContextManager[Any]:
    """The context attacks run in: the trainer's precision context, but float32 under fp16 AMP.

    PAPERS 5.1: input gradients under float16 autocast underflow (no loss scaler scales
    ``grad_x``; cross-entropy below ~6e-8 gives an exactly zero gradient, and sign(0) leaves the
    example unperturbed and counted as robust), so ``16-mixed`` attacks in float32; bf16 keeps
    float32's range and stays. ``16-true`` (float16 weights) is refused before training
    (:func:`check_attack_precision`).
    """
    plugin = trainer.precision_plugin
    if getattr(plugin, "precision", None) == "16-mixed":
        return torch.autocast(str(getattr(plugin, "device", "cuda")), enabled=False)
    return plugin.forward_context()


def check_attack_precision(trainer: L.Trainer) -> None:
    """Refuse ``precision: 16-true`` for a run that attacks: float16 input gradients underflow."""
    if str(getattr(trainer, "precision", "")) == "16-true":
        raise ConfigError(
            f"trainer.precision {trainer.precision!r} cannot take attacks' input gradients "
            "(float16 underflows them, PAPERS 5.1); use 16-mixed (attacks then run in float32), "
            "bf16-mixed, bf16-true or 32-true"
        )


def _input_shape(model: L.LightningModule) -> object:
    return getattr(model, "hparams", {}).get("input_shape")


class AdversarialTraining(L.Callback):
    """Replace each training batch by adversarial examples of the current model (in place).

    The attack runs on the unwrapped LightningModule (so not through DDP's wrapper), in eval mode
    by default, under the trainer's precision context (float32 under fp16 AMP,
    :func:`attack_precision`); it never touches parameter gradients,
    BatchNorm statistics or spectral-norm vectors. ``training_step`` sees the perturbed batch and
    logs ``train/adv_acc``.

    Args:
        attack: an `Attack` (FGM, PGD, WRM, ...); null: clean training (this callback does nothing).
        mix: weight of the clean loss, ``(1 - mix) * CE(x_adv) + mix * CE(x)``; 0 (the reference):
            adversarial examples only.
        start_epoch: first epoch with adversarial examples (clean training before it).
        eps_warmup_epochs: over this many epochs from `start_epoch`, scale the perturbation
            ``x_adv - x`` linearly from 0 to 1 per step (the scaled point lies in the scaled ball).
    """

    def __init__(
        self,
        attack: Attack | None = None,
        mix: float = 0.0,
        start_epoch: int = 0,
        eps_warmup_epochs: int = 0,
    ) -> None:
        if not 0.0 <= mix < 1.0:
            raise ConfigError(f"adversarial mix must be in [0, 1), got {mix!r}")
        if start_epoch < 0 or eps_warmup_epochs < 0:
            raise ConfigError(
                f"start_epoch and eps_warmup_epochs must be >= 0, got {start_epoch}, {eps_warmup_epochs}"
            )
        if attack is None and (mix > 0 or start_epoch > 0 or eps_warmup_epochs > 0):
            warnings.warn(
                "adversarial.attack is null (clean training), so mix, start_epoch and "
                "eps_warmup_epochs have no effect",
                ConfigWarning,
                stacklevel=2,
            )
        if attack is not None and 0 in (
            getattr(attack, "eps", None),
            getattr(attack, "eps_rel", None),
        ):
            warnings.warn(
                f"adversarial.attack {type(attack).__name__} has radius 0: it returns every input "
                "unchanged, so this run trains on clean inputs (adversarial.attack null says so)",
                ConfigWarning,
                stacklevel=2,
            )
        self.attack, self.mix = attack, mix
        self.start_epoch, self.eps_warmup_epochs = start_epoch, eps_warmup_epochs
        self._clean: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve a relative radius; claim the training objective when mixing clean loss in."""
        if self.attack is None:
            return
        if stage == "fit":
            self._warn_about_epochs(trainer.max_epochs)
        resolve_attack(self.attack, trainer.datamodule, _input_shape(pl_module))
        if self.claims_objective:
            pl_module.set_objective(self._mixed_objective, owner=self)

    @property
    def claims_objective(self) -> bool:
        """Whether this callback replaces the training loss (a clean term mixed in)."""
        return self.attack is not None and self.mix > 0

    def check_config(self, model: L.LightningModule, datamodule: object) -> None:
        """The attack's radius against the data, before the trainer starts (fit's ``check_run``)."""
        if self.attack is not None:
            check_attack_config(self.attack, model, datamodule)

    def _warn_about_epochs(self, max_epochs: int | None) -> None:
        if max_epochs is None or max_epochs <= 0:
            return
        if max_epochs <= self.start_epoch:
            rank_zero_warn(
                f"adversarial start_epoch {self.start_epoch} >= trainer.max_epochs {max_epochs}: "
                "this run trains on clean inputs only",
                category=ConfigWarning,
            )
        elif self.start_epoch + self.eps_warmup_epochs > max_epochs:
            reached = (max_epochs - self.start_epoch) / self.eps_warmup_epochs
            rank_zero_warn(
                f"adversarial start_epoch {self.start_epoch} + eps_warmup_epochs "
                f"{self.eps_warmup_epochs} > trainer.max_epochs {max_epochs}: the perturbation "
                f"reaches only {reached:.0%} of eps by the end of training",
                category=ConfigWarning,
            )

    def _warmup_factor(self, trainer: L.Trainer, batch_idx: int) -> float:
        if self.eps_warmup_epochs == 0:
            return 1.0
        per_epoch = max(1, trainer.num_training_batches)
        done = (trainer.current_epoch - self.start_epoch) * per_epoch + batch_idx + 1
        return min(1.0, done / (self.eps_warmup_epochs * per_epoch))

    def active(self, trainer: L.Trainer) -> bool:
        """Whether this epoch trains on adversarial examples."""
        return self.attack is not None and trainer.current_epoch >= self.start_epoch

    def on_train_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: tuple[Tensor, Tensor],
        batch_idx: int,
    ) -> None:
        """Replace x by attack(model, x, y), in place, before the training step."""
        pl_module.batch_perturbed = False
        if not self.active(trainer):
            return
        x, y = batch
        with attack_precision(trainer):
            x_adv = self.attack(pl_module, x, y)
        factor = self._warmup_factor(trainer, batch_idx)
        if factor < 1.0:
            x_adv = x + factor * (x_adv - x)
        if self.mix > 0:
            self._clean = x.clone()
        x.copy_(x_adv)
        pl_module.batch_perturbed = True

    def _mixed_objective(
        self, module: L.LightningModule, x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        logits = module(x)
        loss = module.loss(logits, y)
        if module.batch_perturbed and self._clean is not None:
            loss = (1.0 - self.mix) * loss + self.mix * module.loss(module(self._clean), y)
            self._clean = None
        return loss, logits
