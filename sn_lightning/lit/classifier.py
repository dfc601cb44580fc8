"""`SNClassifier`: backbone from a spec string, optional exact spectral normalization, cross-entropy."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.utils import parametrize
from torchmetrics.classification import MulticlassAccuracy

from sn_lightning._metrics import batch_weight
from sn_lightning.data.sampling import derive_seed, reseed_global_rngs
from sn_lightning.errors import ConfigError, ConfigWarning, check_radii, first_line
from sn_lightning.models import create_backbone
from sn_lightning.modes import eval_mode

OPTIMIZERS = ("sgd", "adam", "adamw")
Objective = Callable[["SNClassifier", Tensor, Tensor], tuple[Tensor, Tensor]]  # -> (loss, logits)
LR_SCHEDULES = ("cosine", "step", "none")


def _check_backbone(
    model: torch.nn.Module, backbone: str, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """Fail before training when ``model`` cannot map ``(2, *input_shape)`` to ``(2, num_classes)``.

    One eval-mode, no-grad forward of zeros (train/eval modes are restored afterwards).
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with eval_mode(model):
        try:
            with torch.no_grad():
                out = model(torch.zeros((2, *input_shape), device=device))
        except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as err:
            raise ConfigError(
                f"backbone {backbone!r} cannot take inputs of shape {input_shape} (the dataset's): "
                f"{first_line(err)}"
            ) from err
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(
            f"backbone {backbone!r} maps a batch of 2 inputs {input_shape} to {got}, "
            f"expected logits of shape (2, {num_classes})"
        )


class ReseedEachBatch(L.Callback):
    """Reseed the global RNGs before each training batch from (seed, epoch, batch, rank).

    Random attack starts and dropout of a run resumed from any checkpoint, mid-epoch included,
    then repeat the uninterrupted run's (Note [exact resume] in ``sn_lightning.data.sampling``;
    about 35 µs a batch). It must run before the other callbacks' ``on_train_batch_start``
    (the attack of :class:`~sn_lightning.callbacks.AdversarialTraining` draws there), so
    :meth:`SNClassifier.setup` puts it first. Without a seed (``seed_everything: false``)
    nothing changes.
    """

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Reseed (seed_everything unset: nothing)."""
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            parts = (int(seed), trainer.current_epoch, batch_idx, trainer.global_rank)
            reseed_global_rngs(derive_seed(*parts))


class SyncBatchNormKeepingBounds(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm=True`` plugin with bounds and timm activations kept.

    Lightning's own converts with ``nn.SyncBatchNorm.convert_sync_batchnorm``, which raises a
    TypeError on ``sn_batchnorm: bound`` scales and drops the activation of timm's
    BatchNormAct2d (EfficientNet, RegNet, ...); this one converts with
    :func:`~sn_lightning.spectral.convert_sync_batchnorm` and reverts to the original classes
    after fitting. :class:`SNClassifier` puts it in place of Lightning's own; other modules can
    pass it as ``Trainer(plugins=[SyncBatchNormKeepingBounds()], sync_batchnorm=True)``.
    """

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """BatchNorm -> SyncBatchNorm in place (classes change, objects and bounds stay)."""
        from sn_lightning.spectral import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        """The classes before :meth:`apply`, in place."""
        from sn_lightning.spectral import revert_sync_batchnorm

        return revert_sync_batchnorm(model)


def objective_conflict(owners: Sequence[object]) -> ConfigError:
    """The error for two training callbacks that both replace the loss (``set_objective``)."""
    names = " and ".join(sorted(type(o).__name__ for o in owners))
    return ConfigError(f"{names} both change the training loss; use one of them")


class SNClassifier(L.LightningModule):
    """Image classifier with optional spectral normalization of every Conv/Linear layer.

    Keys a sweep touches are flat scalars (``model.beta``, ``model.lr``, ...). ``num_classes``,
    ``input_shape``, ``mean`` and ``std`` are linked from the data module by the CLI.

    Args:
        backbone: ``timm:<name>``, ``torchvision:<name>`` or ``sn_lightning:<name>``.
        num_classes: number of classes (linked from ``data``).
        input_shape: (C, H, W) of one input (linked from ``data``).
        mean: per-channel mean of the input normalization, the model's first layer (linked).
        std: per-channel std of the input normalization (linked).
        pretrained: load the backbone's pretrained weights (needs network access).
        backbone_kwargs: extra keyword arguments for the backbone constructor (e.g. ``img_size``).
        optimizer: sgd (with momentum), adam or adamw.
        lr: learning rate (> 0).
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 weight decay (decoupled for adamw).
        lr_schedule: cosine (per step, to 0 at the end of training), step, or none.
        lr_step_epochs: for ``step``: multiply the lr by ``lr_gamma`` every this many epochs.
        lr_gamma: for ``step``: the decay factor.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        beta: per-layer spectral-norm bound (> 0); null: no spectral normalization.
        sn_method: operator (exact norm of the conv operator) or matrix (reshaped-kernel norm).
        sn_power_iterations: power iterations per training forward.
        sn_init_iterations: warm-up Krylov steps at registration (Golub-Kahan-Lanczos on the
            layer's products, at least as accurate as as many power rounds).
        sn_include: fnmatch patterns of layer names to normalize (default all Conv/Linear).
        sn_exclude: fnmatch patterns of layer names to leave alone.
        sn_batchnorm: leave BatchNorm alone (reference) or bound its affine scale by beta.
        sn_detach: detach the power-iteration vectors (PyTorch's choice); false lets gradients
            flow through them (the reference's choice).
        sn_cuda_graph: on CUDA, replay each layer's power iteration and rescale backward as
            captured CUDA graphs (fewer kernel launches); false runs them eagerly.
        sn_batch_fold: on CPU, training forwards of plain Conv/Linear layers compute the power
            iteration inside their own batch and rescale the output (same values, less time);
            false always rescales the weight.
        sn_refresh_iterations: while fitting, Krylov steps (at most) that converge every layer's
            ``u`` for the current weights before each validation, at each epoch end and before a
            mid-epoch checkpoint (one round per step lags behind fast training; validated,
            checkpointed and final models then hold their layers at beta to the accuracy of the
            Krylov estimate: ``refresh_spectral_norm``); 0: never (the paper's schedule alone).
        sn_bound_every_n_epochs: log the sound network bound ``sn/lipschitz_bound`` every this
            many epochs and after the last one; 0: never while fitting. It certifies every layer
            (dense Gram or FFT bounds: ~5 s for ResNet-18 at 32 px, ~21 s for VGG-11 at 32 px,
            ~43 s for ResNet-50 at 224 px on 2 CPU cores); results.json gets the final bound
            whatever this is.
        crm_lambda: weight of the CRM certified-radius term (Fazlyab et al. 2023); 0: off. Needs a
            feed-forward backbone LipLT can bound (built-ins c4f3/c6f2/c8f2/mlp1/mlp2/elu_net).
        crm_r0: only points whose certified radius is below this are penalized (R0).
        crm_t: temperature of the soft-min over classes.
        crm_start_epoch: first epoch with the CRM term (the reference: 10).
        lip_n_iter: power iterations per training step for the differentiable LipLT bound.
        certify_eps: l2 radii (pixel units) at which certified accuracy is logged each validation
            epoch (``val/certified_acc/<eps>``) and reported in results.json, with the sound
            (converged + guaranteed upper bound) pairwise LipLT bound; null: off.
    """

    def __init__(
        self,
        backbone: str = "sn_lightning:digits_cnn",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 8, 8),
        mean: list[float] | None = None,
        std: list[float] | None = None,
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "step", "none"] = "cosine",
        lr_step_epochs: int = 30,
        lr_gamma: float = 0.1,
        label_smoothing: float = 0.0,
        beta: float | None = None,
        sn_method: Literal["operator", "matrix"] = "operator",
        sn_power_iterations: int = 1,
        sn_init_iterations: int = 20,
        sn_include: list[str] | None = None,
        sn_exclude: list[str] | None = None,
        sn_batchnorm: Literal["leave", "bound"] = "leave",
        sn_detach: bool = True,
        sn_cuda_graph: bool = True,
        sn_batch_fold: bool = True,
        sn_refresh_iterations: int = 100,
        sn_bound_every_n_epochs: int = 1,
        crm_lambda: float = 0.0,
        crm_r0: float = 0.2,
        crm_t: float = 5.0,
        crm_start_epoch: int = 0,
        lip_n_iter: int = 5,
        certify_eps: list[float] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}"
            )
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown lr_schedule {lr_schedule!r}; valid choices: {', '.join(LR_SCHEDULES)}"
            )
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr!r}")
        for key, value, ok, valid in (
            ("weight_decay", weight_decay, 0 <= weight_decay < math.inf, ">= 0 and finite"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
            ("lr_step_epochs", lr_step_epochs, lr_step_epochs >= 1, "an integer >= 1"),
            ("lr_gamma", lr_gamma, 0 < lr_gamma <= 1, "in (0, 1]"),
            ("crm_lambda", crm_lambda, 0 <= crm_lambda < math.inf, ">= 0 and finite"),
            ("crm_r0", crm_r0, 0 < crm_r0 < math.inf, "> 0 and finite"),
            ("crm_t", crm_t, 0 < crm_t < math.inf, "> 0 and finite"),
            ("crm_start_epoch", crm_start_epoch, crm_start_epoch >= 0, "an integer >= 0"),
            ("lip_n_iter", lip_n_iter, lip_n_iter >= 1, "an integer >= 1"),
        ):
            if not ok:
                raise ConfigError(f"{key} must be {valid}, got {value!r}")
        if beta is not None and not beta > 0:
            raise ConfigError(
                f"beta must be positive or null (no spectral normalization), got {beta!r}"
            )
        if certify_eps is not None:
            check_radii("certify_eps", certify_eps, "no certified accuracy")
        for key, value, least in (
            ("sn_power_iterations", sn_power_iterations, 1),
            ("sn_init_iterations", sn_init_iterations, 0),
            ("sn_refresh_iterations", sn_refresh_iterations, 0),
            ("sn_bound_every_n_epochs", sn_bound_every_n_epochs, 0),
        ):
            if not isinstance(value, int) or value < least:
                raise ConfigError(f"{key} must be an integer >= {least}, got {value!r}")
        if sn_include is not None and len(sn_include) == 0:
            raise ConfigError(
                "sn_include [] names no layer; give fnmatch patterns (e.g. ['layer1.*']) or null "
                "(every Conv/Linear layer)"
            )
        if beta is None:
            _warn_unused_sn_options(locals())
        self.save_hyperparameters()
        c, h, w = input_shape
        try:
            self.model = create_backbone(
                backbone,
                num_classes=num_classes,
                in_chans=c,
                input_size=(h, w),
                mean=mean,
                std=std,
                pretrained=pretrained,
                **(backbone_kwargs or {}),
            )
        except ConfigError:
            raise
        except (RuntimeError, ValueError, TypeError, AssertionError, LookupError) as err:
            # a KeyError's text is the bare key (e.g. an unknown activation name)
            cause = f"unknown key {err}" if isinstance(err, KeyError) else first_line(err)
            raise ConfigError(
                f"backbone {backbone!r} (backbone_kwargs {backbone_kwargs or {}}) cannot be "
                f"built for inputs of shape {tuple(input_shape)}: {cause}"
            ) from err
        _check_backbone(self.model, backbone, tuple(input_shape), num_classes)
        if beta is not None:
            from sn_lightning.spectral import apply_spectral_norm

            apply_spectral_norm(
                self.model,
                beta=beta,
                input_shape=tuple(input_shape),
                method=sn_method,
                include=("*",) if sn_include is None else tuple(sn_include),
                exclude=tuple(sn_exclude or ()),
                n_power_iterations=sn_power_iterations,
                init_iterations=sn_init_iterations,
                detach_uv=sn_detach,
                batchnorm=sn_batchnorm,
                cuda_graph=sn_cuda_graph,
                batch_fold=sn_batch_fold,
            )
        if crm_lambda > 0 or certify_eps:
            from sn_lightning.lipschitz import parse_model

            try:  # fail before training when LipLT cannot bound this backbone
                parse_model(self.model, tuple(input_shape))
            except ValueError as err:
                raise ConfigError(
                    f"CRM / certification needs a LipLT-compatible backbone: {err}"
                ) from err
        self._lip_state: dict[str, Any] = {}
        self._certified_L: Tensor | None = None
        self._refreshed_at: int | None = None  # global step of the last refresh_spectral_norm
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_adv_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

        # Set by training callbacks: a replacement objective (DataGrad, mixed adversarial loss) and
        # whether the current training batch holds adversarial examples.
        self.objective: Objective | None = None
        self._objective_owner: object | None = None
        self.batch_perturbed = False

    def set_objective(self, objective: Objective, owner: object) -> None:
        """Let one training callback replace cross-entropy on the batch; a second one is an error."""
        if self._objective_owner is not None and self._objective_owner is not owner:
            raise objective_conflict([self._objective_owner, owner])
        self.objective, self._objective_owner = objective, owner

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, C, H, W) in [0, 1] -> logits (N, num_classes)."""
        return self.model(x)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy with the configured label smoothing."""
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on the batch as the callbacks left it (perturbed under adversarial training)."""
        x, y = batch
        hp = self.hparams
        crm = hp.crm_lambda > 0 and self.current_epoch >= hp.crm_start_epoch
        # With CRM, every spectral-norm weight is computed once for the step (one power
        # iteration, as in the paper) and the LipLT bound reads the forward's own weights; an
        # uncached second read would advance u again and bound other weights.
        with parametrize.cached() if crm else contextlib.nullcontext():
            if self.objective is None:
                logits = self(x)
                loss = self.loss(logits, y)
            else:
                loss, logits = self.objective(self, x, y)
            if crm:
                from sn_lightning.lipschitz import crm_penalty, liplt_bound

                L = liplt_bound(
                    self.model,
                    tuple(hp.input_shape),
                    pairwise=True,
                    n_iter=hp.lip_n_iter,
                    state=self._lip_state,
                )
                penalty = crm_penalty(logits, y, L, hp.crm_r0, hp.crm_t)
                loss = loss + hp.crm_lambda * penalty
                self.log(
                    "train/crm_penalty",
                    penalty.detach(),
                    on_step=False,
                    on_epoch=True,
                    sync_dist=True,
                )
        # Note [synchronised metrics]
        #   Under DDP every logged value is the same on all ranks: a scalar computed per rank is
        #   logged with sync_dist=True (batch-size-weighted mean over ranks), an accuracy through
        #   a torchmetrics metric (counts summed over ranks). tests/test_ddp.py checks it.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        if self.batch_perturbed:
            self.train_adv_acc(logits.detach(), y)
            self.log(
                "train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True, prog_bar=True
            )
        else:
            self.train_acc(logits.detach(), y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(
        self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy
    ) -> None:
        x, y = batch
        logits = self(x)
        metric(logits, y)
        self.log(
            f"{stage}/loss", self.loss(logits, y), batch_size=batch_weight(len(y)), sync_dist=True
        )
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def certified_lipschitz(self) -> Tensor:
        """The sound pairwise LipLT bound (C, C) of the current weights (converged + upper bounds)."""
        from sn_lightning.lipschitz import liplt_bound

        with torch.no_grad():
            return liplt_bound(
                self.model, tuple(self.hparams.input_shape), pairwise=True, certify=True
            )

    def refresh_spectral_norm(self) -> None:
        """Converge every layer's ``u`` (``sn_refresh_iterations`` Krylov steps) once per optimizer step.

        Only while fitting (not in the sanity check, ``validate`` or ``test``): before each
        validation, at each epoch end ahead of ModelCheckpoint, and before a checkpoint saved at
        another moment (``every_n_train_steps``), so what is validated, checkpointed and finally
        evaluated holds a converged ``u``. Skipped when no optimizer step ran since the last
        refresh: the checkpoint and the model stay identical.
        """
        n = self.hparams.sn_refresh_iterations
        if self.hparams.beta is None or not n or self._trainer is None:
            return
        if self.trainer.state.fn != "fit" or self.trainer.sanity_checking:
            return
        step = self.trainer.global_step
        if step == self._refreshed_at:
            return
        from sn_lightning.spectral import refresh_spectral_norm

        refresh_spectral_norm(self.model, n)
        self._refreshed_at = step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refresh ``u`` for checkpoints saved mid-epoch and store when it was last refreshed."""
        before = self._refreshed_at
        self.refresh_spectral_norm()
        if self._refreshed_at != before and "state_dict" in checkpoint:
            for key, value in self.state_dict().items():
                if key.endswith(".u") and key in checkpoint["state_dict"]:
                    checkpoint["state_dict"][key] = value.detach().clone()
        checkpoint["sn_refreshed_at"] = self._refreshed_at
        # CRM's LipLT power-iteration vectors carry over between steps (exact resume)
        vectors = self._lip_state.get("u")
        if vectors:
            checkpoint["liplt_u"] = {k: v.detach().clone() for k, v in vectors.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the refresh step and CRM's LipLT vectors.

        Checkpoints from before the refresh existed keep the paper's schedule.
        """
        self._refreshed_at = checkpoint.get("sn_refreshed_at")
        if "sn_refresh_iterations" not in checkpoint.get("hyper_parameters", {}):
            self.hparams.sn_refresh_iterations = 0
        if checkpoint.get("liplt_u"):
            from sn_lightning.lipschitz import load_liplt_vectors

            load_liplt_vectors(
                self._lip_state, self.model, tuple(self.hparams.input_shape), checkpoint["liplt_u"]
            )

    def on_validation_epoch_start(self) -> None:
        """Refresh ``u``; compute the sound pairwise bound once per validation epoch when certifying."""
        self.refresh_spectral_norm()
        if self.hparams.certify_eps and not self.trainer.sanity_checking:
            self._certified_L = self.certified_lipschitz().to(self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log val/loss, val/acc and, when certifying, val/certified_acc/<eps>."""
        self._eval_step(batch, "val", self.val_acc)
        if self._certified_L is not None and not self.trainer.sanity_checking:
            from sn_lightning.lipschitz import certified_logits, certified_radius

            x, y = batch
            # the margins in float32 or wider, autocast and TF32 off: logits from bf16 autocast
            # are off by up to ~1e-1, which certified points whose float32 radius is below eps
            logits = certified_logits(self, x)
            radius = certified_radius(logits, y, self._certified_L)
            for eps in self.hparams.certify_eps:
                acc = (radius > eps).float().mean()
                self.log(
                    f"val/certified_acc/{eps:g}",
                    acc,
                    batch_size=batch_weight(len(y)),
                    sync_dist=True,
                )

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log test/loss and test/acc."""
        self._eval_step(batch, "test", self.test_acc)

    def on_train_epoch_end(self) -> None:
        """Sync the DDP ranks' state, refresh ``u``; log each layer's σ and the network bound (``sn/*``).

        ``sn/<layer>/sigma``: the estimate for the layer in use, ``min(sigma_raw, beta)``;
        ``sn/<layer>/sigma_raw``: that of the unnormalized weight (how hard the bound binds).
        The state is rank 0's buffers and LipLT vectors (Note [DDP state]).
        """
        self._broadcast_state()
        self.refresh_spectral_norm()
        if self.hparams.beta is None:
            return
        from sn_lightning.spectral import normalized_layers, spectral_norms

        layers = normalized_layers(self.model)
        for name, sigma in spectral_norms(self.model).items():
            self.log(f"sn/{name}/sigma", min(sigma, layers[name][1].beta), sync_dist=True)
            self.log(f"sn/{name}/sigma_raw", sigma, sync_dist=True)
        if not self._bound_due():
            return
        bound = self.lipschitz_bound()
        if bound is not None:
            self.log("sn/lipschitz_bound", bound, sync_dist=True)

    def _bound_due(self) -> bool:
        """Whether this epoch end logs the network bound (``sn_bound_every_n_epochs``)."""
        every = self.hparams.get("sn_bound_every_n_epochs", 1)
        if every == 0:
            return False
        trainer = self.trainer
        last = (
            trainer.should_stop
            or (trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs)
            or 0 <= trainer.max_steps <= trainer.global_step
        )
        return last or (trainer.current_epoch + 1) % every == 0

    def _broadcast_state(self) -> None:
        """Copy rank 0's buffers and LipLT power-iteration vectors to every rank (Note [DDP state]).

        Note [DDP state]
            DDP all-reduces gradients, so parameters stay identical, and broadcasts rank 0's
            buffers at the start of every forward of the *wrapped* module. Spectral-norm ``u``
            vectors are advanced from the (identical) weights alone, but BatchNorm running
            statistics are updated from each rank's own batch in the training forward, so after
            the epoch's last step they differ until the next wrapped forward (validation, if any,
            or the next epoch). The LipLT vectors of CRM are plain tensors, never broadcast by
            DDP. Broadcasting all of them once per epoch makes the ranks' states identical at
            every epoch end (checkpoints, the end of training), whether or not validation ran.
        """
        import torch.distributed as dist

        if self._trainer is None or self.trainer.world_size < 2 or not dist.is_initialized():
            return
        vectors = self._lip_state.get("u", {})
        for key, u in vectors.items():  # restored from a checkpoint: on the saving rank's device
            vectors[key] = u.to(self.device)
        tensors = [*self.buffers(), *vectors.values()]
        with torch.no_grad():
            for tensor in tensors:  # same modules, same order, same shapes on every rank
                dist.broadcast(tensor, src=0)

    def lipschitz_bound(self) -> float | None:
        """A sound l2 Lipschitz bound of the eval-mode model, or None where none is sound."""
        from sn_lightning.spectral import network_lipschitz_bound

        bound, _ = network_lipschitz_bound(self.model, input_shape=tuple(self.hparams.input_shape))
        return bound

    def setup(self, stage: str) -> None:
        """Put :class:`ReseedEachBatch` first among the trainer's callbacks.

        With ``sync_batchnorm=True``, swap Lightning's plugin for :class:`SyncBatchNormKeepingBounds`
        (the strategy applies it after this hook). Before fitting, also warn when the CRM term
        would never switch on.
        """
        strategy = self.trainer.strategy
        if type(getattr(strategy, "_layer_sync", None)) is TorchSyncBatchNorm:
            strategy._layer_sync = SyncBatchNormKeepingBounds()
        callbacks = self.trainer.callbacks
        if not any(isinstance(cb, ReseedEachBatch) for cb in callbacks):
            callbacks.insert(0, ReseedEachBatch())
        hp, max_epochs = self.hparams, self.trainer.max_epochs
        if stage == "fit" and hp.crm_lambda > 0 and 0 < (max_epochs or -1) <= hp.crm_start_epoch:
            rank_zero_warn(
                f"crm_start_epoch {hp.crm_start_epoch} >= trainer.max_epochs {max_epochs}: this "
                "run never uses the CRM term",
                category=ConfigWarning,
            )

    def on_train_start(self) -> None:
        """Re-plan a cosine schedule restored from a checkpoint of a run with another length.

        ``--trainer.max_epochs=20 --ckpt_path=<epoch 15 of a 15-epoch run>`` restores the old
        ``T_max``; past it the learning rate would climb again. The schedule is set to the cosine
        over the new total at the restored step (exact: the scheduler's recursion continues from
        the closed form).
        """
        if self.hparams.lr_schedule != "cosine":
            return
        total = self._total_steps()
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
                continue
            if sched.T_max == total:
                continue
            old, sched.T_max = sched.T_max, total
            step = min(sched.last_epoch, total)
            for group, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):
                group["lr"] = (
                    sched.eta_min
                    + (base - sched.eta_min) * (1 + math.cos(math.pi * step / total)) / 2
                )
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
            rank_zero_info(
                f"cosine schedule re-planned from {old} to {total} steps at step {step} "
                f"(lr {sched._last_lr[0]:.4g})"
            )

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run (the cosine schedule's length)."""
        return max(1, int(self.trainer.estimated_stepping_batches))

    def configure_optimizers(self) -> Any:
        """The configured optimizer and, unless ``none``, its LR schedule."""
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                params,
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov and hp.momentum > 0,
                weight_decay=hp.weight_decay,
            )
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "none":
            return opt
        if hp.lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self._total_steps())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.lr_step_epochs, gamma=hp.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _warn_unused_sn_options(args: dict[str, Any]) -> None:
    """Warn about spectral-norm keys set away from their defaults while ``beta`` is null."""
    defaults = inspect.signature(SNClassifier.__init__).parameters
    changed = [k for k in defaults if k.startswith("sn_") and args[k] != defaults[k].default]
    if changed:
        warnings.warn(
            f"model.beta is null (no spectral normalization), so {', '.join(changed)} "
            f"{'has' if len(changed) == 1 else 'have'} no effect",
            ConfigWarning,
            stacklevel=3,
        )
