"""Callbacks that DDP subprocesses import by class path (tests only)."""

import atexit
import json
import math
from pathlib import Path

import lightning as L
import torch


class DumpState(L.Callback):
    """Save each rank's full state after training.

    ``rank<r>.pt``: the state dict (parameters, SN vectors, BN statistics) plus the CRM LipLT
    power-iteration vectors (kept outside the state dict); ``extras_rank<r>.json``: the shapes of
    the layerwise perturbations held for the next step, the first training batch's labels and
    the training sampler's shard; ``exit_rank<r>.json``: whether the process group was still
    alive at interpreter exit.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.first_labels: list[int] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if self.first_labels is None:
            self.first_labels = batch[1].tolist()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        exit_file = Path(self.out) / f"exit_rank{trainer.global_rank}.json"
        atexit.register(_record_process_group, exit_file)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        lip_u = getattr(pl_module, "_lip_state", {}).get("u", {})
        state.update({f"_lip_state.u.{s}": u.detach().cpu().clone() for s, u in lip_u.items()})
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")
        layerwise = next(
            (cb for cb in trainer.callbacks if type(cb).__name__ == "LayerwiseTraining"), None
        )
        deltas = (
            {}
            if layerwise is None or layerwise.perturbation is None
            else layerwise.perturbation.deltas
        )
        sampler = trainer.train_dataloader.sampler
        extras = {
            "layerwise_deltas": {name: list(d.shape) for name, d in deltas.items()},
            "first_labels": self.first_labels,
            "shard": [getattr(sampler, "rank", None), getattr(sampler, "num_replicas", None)],
        }
        (Path(self.out) / f"extras_rank{trainer.global_rank}.json").write_text(json.dumps(extras))


def _record_process_group(path: Path) -> None:
    """At interpreter exit: whether a process group is still alive (its gloo thread can abort
    the process during shutdown, "terminate called without an active exception")."""
    path.write_text(json.dumps({"process_group_alive": torch.distributed.is_initialized()}))


class DumpMetrics(L.Callback):
    """Save each rank's ``trainer.callback_metrics`` once per epoch, all of it reduced and logged.

    A snapshot is taken at the start of every epoch after the first (the previous epoch's train
    epoch-level metrics, its validation and ``sn/*`` are then final) and at the end of training.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.snapshots: list[dict[str, float]] = []

    def _snapshot(self, trainer: L.Trainer) -> None:
        self.snapshots.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._snapshot(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._snapshot(trainer)
        text = json.dumps(
            [{k: (v if math.isfinite(v) else str(v)) for k, v in s.items()} for s in self.snapshots]
        )
        (Path(self.out) / f"metrics_rank{trainer.global_rank}.json").write_text(text)


class RecordBatchNorms(L.Callback):
    """Record each BatchNorm's class, bound and eval-mode scale after the first training step and
    at fit end (``on_fit_end`` comes after the strategy's teardown, which reverts synchronized
    classes): ``batchnorms_rank<r>.json``, ``{"step": {name: [class, bounded, scale]}, "end": ...}``.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.seen: dict[str, dict[str, list]] = {}

    def _record(self, pl_module: L.LightningModule) -> dict[str, list]:
        from torch.nn.utils import parametrize

        from sn_lightning.spectral import spectral_norms

        scales = spectral_norms(pl_module, normalized=True)
        out = {}
        for name, m in pl_module.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                cls = type(m)
                bounded = parametrize.is_parametrized(m, "weight")
                out[name] = [
                    (cls.__bases__[0] if bounded else cls).__name__,
                    bounded,
                    scales.get(name),
                ]
        return out

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.seen.setdefault("step", self._record(pl_module))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen["end"] = self._record(pl_module)
        path = Path(self.out) / f"batchnorms_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.seen))
