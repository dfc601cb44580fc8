"""`python -m sn_lightning.fit --config configs/x.yaml [--a.b=value ...]`: train, evaluate, write results.json.

Every option can be overridden in the ``--a.b=value`` form that ``wandb agent`` produces;
``--print_config`` prints the resolved config without training; ``--ckpt_path`` resumes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sn_lightning.callbacks import (
    AdversarialTraining,
    DataGrad,
    LayerwiseTraining,
    RobustEvaluation,
)
from sn_lightning.callbacks.robust_eval import attack_name
from sn_lightning.data import ImageDataModule
from sn_lightning.errors import ConfigError
from sn_lightning.evaluation import evaluate
from sn_lightning.lit import SNClassifier

RESULTS_FILE = "results.json"


class _OneLineErrorParser(LightningArgumentParser):
    """Parser errors (unknown key, bad value, malformed YAML) as one line, no usage dump, exit 2."""

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        """Print one line and exit 2; raise as usual where jsonargparse handles the error itself."""
        if not getattr(self, "exit_on_error", True):
            super().error(message, ex)
        first = " ".join(str(message).split())  # collapse jsonargparse's multi-line explanations
        sys.stderr.write(f"{self.prog}: error: {first}\n")
        raise SystemExit(2)


class SNLightningCLI(LightningCLI):
    """LightningCLI with the data module's facts linked into the model and a ``--ckpt_path`` key."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link num_classes, input_shape, mean, std from the data module; add --ckpt_path."""
        for key in ("num_classes", "input_shape", "mean", "std"):
            parser.link_arguments(
                "data",
                f"model.{key}",
                compute_fn=lambda dm, k=key: getattr(dm, k),
                apply_on="instantiate",
            )
        parser.add_lightning_class_args(AdversarialTraining, "adversarial")
        parser.add_lightning_class_args(LayerwiseTraining, "layerwise")
        parser.add_lightning_class_args(DataGrad, "datagrad")
        parser.add_lightning_class_args(RobustEvaluation, "robust_eval")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="checkpoint to resume from"
        )


def _key_settings(config: Any) -> dict[str, Any]:
    """The resolved settings worth keeping next to the numbers (model, data, seed, trainer basics)."""
    as_dict = config.as_dict()
    trainer = as_dict.get("trainer", {})
    return {
        "seed_everything": as_dict.get("seed_everything"),
        "model": as_dict.get("model"),
        "data": as_dict.get("data"),
        "trainer": {
            k: trainer.get(k)
            for k in ("max_epochs", "max_steps", "precision", "devices", "accelerator")
        },
        **{k: as_dict.get(k) for k in ("adversarial", "layerwise", "datagrad", "robust_eval")},
    }


def _callback(trainer: Any, kind: type) -> Any:
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


def _adversarial_results(trainer: Any, model: SNClassifier, dm: ImageDataModule) -> dict[str, Any]:
    """Train/val/test accuracy under the training attack and each robust-evaluation attack.

    The adversarial generalization gap (train minus test adversarial accuracy) is the seed paper's
    headline; the training attack is evaluated as the paper did, with the attack it trained on.
    """
    adversarial = _callback(trainer, AdversarialTraining)
    robust = _callback(trainer, RobustEvaluation)
    attacks = {}
    if adversarial is not None and adversarial.attack is not None:
        attacks[f"train_attack/{attack_name(adversarial.attack)}"] = adversarial.attack
    if robust is not None:
        attacks.update(robust.named_attacks())
    cap = robust.final_max_examples if robust is not None else None
    loaders = {"train": dm.train_eval_dataloader, "test": dm.test_dataloader}
    if dm.val_set is not None:
        loaders["val"] = dm.val_dataloader
    out: dict[str, Any] = {}
    for name, attack in attacks.items():
        entry: dict[str, Any] = {"attack": repr(attack)}
        for split, loader in loaders.items():
            with trainer.precision_plugin.forward_context():
                entry[split] = evaluate(
                    model, loader(), model.device, attack=attack, max_examples=cap
                )
        entry["gap"] = entry["train"]["acc"] - entry["test"]["acc"]
        out[name] = entry
    return out


def run(cli: SNLightningCLI) -> dict[str, Any]:
    """Fit, then evaluate on the full train / val / test splits; write results.json (rank 0)."""
    start = time.perf_counter()
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=dm, ckpt_path=cli.config.ckpt_path)
    train_time = time.perf_counter() - start
    # trainer.log_dir broadcasts under DDP: every rank must ask, before the others return.
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    if not trainer.is_global_zero:
        return {}
    dm.setup("test")
    device = model.device
    results: dict[str, Any] = {"train": evaluate(model, dm.train_eval_dataloader(), device)}
    if dm.val_set is not None:
        results["val"] = evaluate(model, dm.val_dataloader(), device)
    results["test"] = evaluate(model, dm.test_dataloader(), device)
    results["gap"] = results["train"]["acc"] - results["test"]["acc"]
    results["adversarial"] = _adversarial_results(trainer, model, dm)
    if model.hparams.certify_eps:
        results["certified"] = _certified_results(model, dm)
    results.update(_final_extras(model))
    results["settings"] = _key_settings(cli.config)
    results["train_time_s"] = train_time
    results["wall_time_s"] = time.perf_counter() - start
    summary = {
        f"final/{split}_acc": results[split]["acc"]
        for split in ("train", "val", "test")
        if split in results
    }
    summary["final/gap"] = results["gap"]
    for name, entry in results["adversarial"].items():
        summary[f"final/{name}/test_acc"] = entry["test"]["acc"]
        summary[f"final/{name}/gap"] = entry["gap"]
    for logger in trainer.loggers:
        logger.log_metrics(summary, step=trainer.global_step)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    results["path"] = str(path)
    lines = [
        f"train acc {results['train']['acc']:.4f}  test acc {results['test']['acc']:.4f}  gap {results['gap']:+.4f}"
    ]
    for name, entry in results["adversarial"].items():
        lines.append(
            f"{name}: train adv acc {entry['train']['acc']:.4f}  test adv acc {entry['test']['acc']:.4f}  "
            f"gap {entry['gap']:+.4f}"
        )
    for eps, entry in results.get("certified", {}).get("eps", {}).items():
        lines.append(
            f"certified (l2, eps {eps}): train {entry['train']:.4f}  test {entry['test']:.4f}"
        )
    if results.get("lipschitz_bound") is not None:
        lines.append(f"Lipschitz bound (l2, sound): {results['lipschitz_bound']:.4g}")
    sys.stdout.write("\n".join([*lines, f"results: {path}"]) + "\n")
    return results


def _certified_results(model: SNClassifier, dm: ImageDataModule) -> dict[str, Any]:
    """Certified accuracy (l2, pairwise LipLT rule) per eps on train/val/test, and the bounds."""
    import torch

    from sn_lightning.lipschitz import certified_radius, liplt_bound, naive_bound

    shape = tuple(model.hparams.input_shape)
    L = model.certified_lipschitz().to(model.device)
    with torch.no_grad():
        out: dict[str, Any] = {
            "rule": "pairwise LipLT, sound (converged iterations + guaranteed upper bounds)",
            "lipschitz_naive": naive_bound(model.model, shape),
            "lipschitz_liplt": float(liplt_bound(model.model, shape, certify=True)),
            "eps": {f"{e:g}": {} for e in model.hparams.certify_eps},
        }
    loaders = {"train": dm.train_eval_dataloader, "test": dm.test_dataloader}
    if dm.val_set is not None:
        loaders["val"] = dm.val_dataloader
    model.eval()
    for split, loader in loaders.items():
        radii = []
        with torch.no_grad():
            for x, y in loader():
                x, y = x.to(model.device), y.to(model.device)
                radii.append(certified_radius(model(x).float(), y, L).cpu())
        r = torch.cat(radii)
        for e in model.hparams.certify_eps:
            out["eps"][f"{e:g}"][split] = float((r > e).float().mean())
    return out


def _final_extras(model: SNClassifier) -> dict[str, Any]:
    """The spectral-norm report (per layer σ, upper bound, β) and the network Lipschitz bound."""
    from sn_lightning.spectral import spectral_norm_report

    report = spectral_norm_report(
        model.model, n_iter=100, input_shape=tuple(model.hparams.input_shape)
    )
    return {"lipschitz_bound": report.lipschitz_bound, "spectral": report.as_dict()}


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the results dict (empty on ranks other than 0)."""
    try:
        cli = SNLightningCLI(
            SNClassifier,
            ImageDataModule,
            run=False,
            args=args,
            parser_class=_OneLineErrorParser,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m sn_lightning.fit"},
            auto_configure_optimizers=False,
        )
        return run(cli)
    except ConfigError as err:
        sys.stderr.write(f"python -m sn_lightning.fit: error: {err}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
