"""Callbacks that DDP subprocesses import by class path (tests only)."""

from pathlib import Path

import lightning as L
import torch


class DumpState(L.Callback):
    """Save each rank's full state dict (parameters, SN vectors, BN statistics) after training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")
