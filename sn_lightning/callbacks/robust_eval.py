"""`RobustEvaluation`: adversarial accuracy on the validation and test sets under a list of attacks."""

from __future__ import annotations

import inspect

import lightning as L
import torch
from torch import Tensor

from sn_lightning._metrics import batch_weight
from sn_lightning.attacks import WRM, Attack
from sn_lightning.callbacks.adversarial import attack_precision, check_attack_config, resolve_attack
from sn_lightning.errors import ConfigError
from sn_lightning.evaluation import worse_logits


def attack_name(attack: Attack) -> str:
    """A short, metric-friendly name: ``pgd10_linf_0.1``, ``fgm_l2_1.5``, ``wrm_0.5``.

    Settings other than the class's defaults are appended, so that different attacks get
    different names: ``_rs`` (random start), ``_r5`` (5 random restarts), ``_step0.01`` (a
    step size), ``_s20`` (WRM's steps), ``_pred`` (predicted labels), ``_noclip`` (no [0, 1]
    box), ``_trainmode`` (the model's own modes); WRM with an unresolved ``gamma_rel`` is
    ``wrm_rel0.04``.
    """
    kind = type(attack).__name__.lower()
    if hasattr(attack, "steps") and hasattr(attack, "norm"):
        kind += str(attack.steps)
    if hasattr(attack, "norm"):
        eps = attack.eps if attack.eps is not None else f"rel{attack.eps_rel:g}"
        name = (
            f"{kind}_{attack.norm}_{eps:g}"
            if isinstance(eps, float)
            else f"{kind}_{attack.norm}_{eps}"
        )
    elif getattr(attack, "gamma", None) is not None:
        name = f"{kind}_{attack.gamma:g}"
    elif getattr(attack, "gamma_rel", None) is not None:
        name = f"{kind}_rel{attack.gamma_rel:g}"
    else:
        name = kind
    return name + "".join(_setting_suffixes(attack))


def _setting_suffixes(attack: Attack) -> list[str]:
    """The name suffixes of ``attack``'s settings that differ from its class's defaults."""
    suffixes = []
    restarts = getattr(attack, "restarts", 1)
    if restarts > 1:
        suffixes.append(f"_r{restarts}")  # restarts need a random start
    elif getattr(attack, "random_start", False):
        suffixes.append("_rs")
    if getattr(attack, "step_size", None) is not None:
        suffixes.append(f"_step{attack.step_size:g}")
    if isinstance(attack, WRM) and attack.steps != _WRM_STEPS:
        suffixes.append(f"_s{attack.steps}")
    if attack.labels == "predicted":
        suffixes.append("_pred")
    if not getattr(attack, "clip", True):
        suffixes.append("_noclip")
    if not attack.eval_mode:
        suffixes.append("_trainmode")
    return suffixes


_WRM_STEPS = inspect.signature(WRM).parameters["steps"].default


class RobustEvaluation(L.Callback):
    """Log ``val/robust_acc/<attack>`` (and ``test/...``) for each attack every `every_n_epochs`.

    The final train/test adversarial accuracies, their gap and margins go to results.json (see
    ``sn_lightning.fit``), over at most `final_max_examples` examples per split.

    Args:
        attacks: the attacks, e.g. PGD-20 linf at several eps; empty: off.
        every_n_epochs: evaluate on validation every this many epochs (the test stage always).
        max_batches: attack at most this many validation/test batches per epoch and rank (as
            Lightning's ``limit_val_batches`` counts: under DDP each rank its first
            ``max_batches`` of its share); null: all.
        final_max_examples: cap per split for the final adversarial evaluation; null: all.
    """

    def __init__(
        self,
        attacks: list[Attack] | None = None,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        final_max_examples: int | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"robust_eval every_n_epochs must be >= 1, got {every_n_epochs!r}")
        for name, value in (
            ("max_batches", max_batches),
            ("final_max_examples", final_max_examples),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"robust_eval {name} must be >= 1 or null (all), got {value!r}")
        self.attacks = list(attacks or [])
        self.every_n_epochs, self.max_batches = every_n_epochs, max_batches
        self.final_max_examples = final_max_examples
        names = [attack_name(a) for a in self.attacks]
        if len(set(names)) != len(names):
            raise ConfigError(f"robust_eval attacks must differ, got {names}")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve relative radii once."""
        for attack in self.attacks:
            resolve_attack(attack, trainer.datamodule, pl_module.hparams.get("input_shape"))

    def check_config(self, model: L.LightningModule, datamodule: object) -> None:
        """The attacks' radii against the data, before the trainer starts (fit's ``check_run``)."""
        for attack in self.attacks:
            check_attack_config(attack, model, datamodule)

    def named_attacks(self) -> dict[str, Attack]:
        """``{attack_name: attack}``."""
        return {attack_name(a): a for a in self.attacks}

    def _run(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: tuple[Tensor, Tensor],
        idx: int,
        stage: str,
    ) -> None:
        if not self.attacks or trainer.sanity_checking:
            return
        if self.max_batches is not None and idx >= self.max_batches:
            return
        x, y = batch
        for name, attack in self.named_attacks().items():
            with attack_precision(trainer):
                x_adv = attack(pl_module, x, y)
                with torch.no_grad():  # a clean error is never robust (worse_logits)
                    worse = worse_logits(pl_module(x), pl_module(x_adv), y)
                    acc = (worse.argmax(dim=1) == y).float().mean()
            pl_module.log(
                f"{stage}/robust_acc/{name}",
                acc,
                on_epoch=True,
                batch_size=batch_weight(len(y)),
                sync_dist=True,
            )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: tuple[Tensor, Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Attack the validation batch on evaluation epochs."""
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, batch, batch_idx, "val")

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: tuple[Tensor, Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Attack the test batch."""
        self._run(trainer, pl_module, batch, batch_idx, "test")
