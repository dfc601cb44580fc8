"""Logged metrics: their names for a config, and how per-batch means are weighted.

Note [uneven ranks]
    Under DDP the validation and test shares are unpadded (``ImageDataModule._loader``), so the
    ranks may hold different numbers of examples. Lightning's epoch mean of a logged value is
    ``sum_r value_r / sum_r n_r``, each synchronised with a mean over ranks; the count ``n_r`` is
    an integer tensor when ``batch_size`` is an int, and its mean over ranks is truncated
    (Lightning 2.6, ``_sync_ddp``: 143 examples on 2 ranks averaged to 71, not 71.5, which put
    ``val/loss`` and ``val/certified_acc`` 143/142 too high). A float ``batch_size`` keeps the
    count a float tensor; the weights themselves are unchanged.
"""

from __future__ import annotations

import importlib
import math
from typing import Any


def batch_weight(n: int) -> float:
    """``batch_size`` for ``self.log``: the example count as a float (Note [uneven ranks])."""
    return float(n)


def _instantiate(spec: Any) -> Any:
    """An object from a ``class_path``/``init_args`` namespace (used for attack names)."""
    module, _, name = spec.class_path.rpartition(".")
    init_args = spec.get("init_args")
    kwargs = dict(vars(init_args)) if init_args is not None else {}
    return getattr(importlib.import_module(module), name)(**kwargs)


def _robust_epoch(config: Any) -> bool:
    """Whether some epoch validates and evaluates ``robust_eval`` (``val/robust_acc/*``).

    Validation runs after epochs ``e`` with ``(e + 1) % check_val_every_n_epoch == 0`` and the
    robust evaluation at those with ``(e + 1) % robust_eval.every_n_epochs == 0``: both need
    ``max_epochs`` to reach their least common multiple (no limit: ``max_epochs`` -1 or null).
    """
    if config.get("data.val_size") == 0:
        return False
    max_epochs = config.get("trainer.max_epochs")
    if max_epochs is None or max_epochs < 0:
        return True
    every = math.lcm(
        config.get("trainer.check_val_every_n_epoch") or 1,
        config.get("robust_eval.every_n_epochs") or 1,
    )
    return max_epochs >= every


def logged_metric_names(config: Any) -> list[str]:
    """Names (fnmatch patterns) of the metrics a run with this parsed config logs.

    Relative-radius attacks (``eps_rel``) get their absolute radius from the data at setup, so
    their names are only known up to that number (``val/robust_acc/pgd15_l2_*``).
    """
    from sn_lightning.callbacks.robust_eval import attack_name

    names = ["epoch", "train/loss", "final/*"]
    if config.get("adversarial.attack") is None or (config.get("adversarial.start_epoch") or 0):
        names.append("train/acc")  # clean batches (none once the training attack is on)
    if config.get("adversarial.attack") is not None:
        names.append("train/adv_acc")
    validation = config.get("data.val_size") != 0  # 0: no validation split, no val/* metric
    if validation:
        names += ["val/loss", "val/acc"]
    for spec in config.get("robust_eval.attacks") or [] if _robust_epoch(config) else []:
        attack = _instantiate(spec)
        name = attack_name(attack) if attack.is_resolved else f"{type(attack).__name__.lower()}*"
        names.append(f"val/robust_acc/{name}")
    if validation:
        names += [f"val/certified_acc/{eps:g}" for eps in config.get("model.certify_eps") or []]
    if (config.get("model.crm_lambda") or 0) > 0:
        names.append("train/crm_penalty")
    if (config.get("datagrad.lam") or 0) > 0:
        names.append("train/datagrad_penalty")
    if config.get("model.beta") is not None:
        names.append("sn/*")
    return names
