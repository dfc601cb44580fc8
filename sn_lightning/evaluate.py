"""`python -m sn_lightning.evaluate --config X --ckpt_path Y`: PGD-k and AutoAttack on a checkpoint.

Writes ``evaluation.json`` (clean accuracy; accuracy per eps under PGD and under AutoAttack's
standard version or a subset of its attacks, through the ``pyautoattack`` package) and
``robustness_curve.png`` (accuracy against eps) into ``--eval.out`` (default: ``evaluation/``
beside the checkpoint's run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor, nn

from sn_lightning.attacks import PGD
from sn_lightning.attacks.base import check_l2_radius, check_linf
from sn_lightning.data import ImageDataModule
from sn_lightning.errors import ConfigError, check_radii, first_line
from sn_lightning.evaluation import evaluate
from sn_lightning.fit import (
    SEED_ENVIRON,
    SNLightningCLI,
    _OneLineErrorParser,
    _restored_environ,
    build_cli,
    held_startup_lines,
    one_line_errors,
    quiet_lightning,
    settings_mismatch,
    state_dict_mismatch,
)
from sn_lightning.lit import SNClassifier

DESCRIPTION = (
    "Evaluate a checkpoint: clean, PGD-k, AutoAttack and certified accuracy per eps; write "
    "evaluation.json and robustness_curve.png."
)

AutoAttackName = Literal["apgd-ce", "apgd-t", "fab-t", "square"]
STANDARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")  # in their order
PROGRESS = "evaluate: "  # the prefix of progress lines on stderr
DEFAULT_EPS = {"linf": [2 / 255, 4 / 255, 8 / 255, 16 / 255], "l2": [0.25, 0.5, 1.0, 2.0]}


class EvaluateCLI(SNLightningCLI):
    """The training CLI's config plus ``--eval.*`` keys."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The fit keys (so the same config works) and the evaluation's own."""
        super().add_arguments_to_parser(parser)
        for action in parser._actions:  # the fit CLI's key, another meaning here
            if action.dest == "ckpt_path":
                action.help = "checkpoint to evaluate (required)"
        parser.add_argument(
            "--eval.norm",
            type=Literal["linf", "l2"],
            default="linf",
            help="threat model of the PGD, AutoAttack and certified radii",
        )
        defaults = "; ".join(
            f"{norm}: {', '.join(f'{e * 255:g}/255' if norm == 'linf' else f'{e:g}' for e in eps)}"
            for norm, eps in DEFAULT_EPS.items()
        )
        parser.add_argument(
            "--eval.eps",
            type=list[float] | None,
            default=None,
            help=f"radii in [0, 1] pixel units; null: the norm's defaults ({defaults})",
        )
        parser.add_argument("--eval.steps", type=int, default=20, help="PGD steps")
        parser.add_argument("--eval.restarts", type=int, default=1, help="PGD random restarts")
        parser.add_argument(
            "--eval.autoattack", type=bool, default=True, help="also run AutoAttack (standard)"
        )
        parser.add_argument(
            "--eval.autoattack_attacks",
            type=list[AutoAttackName] | None,
            default=None,
            help="run only these of the standard version's attacks, with its settings "
            "(e.g. [apgd-ce, apgd-t]); null: all four",
        )
        parser.add_argument(
            "--eval.max_examples", type=int | None, default=1000, help="test examples; null: all"
        )
        parser.add_argument(
            "--eval.batch_size", type=int, default=250, help="examples per attack batch"
        )
        parser.add_argument(
            "--eval.device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ..."
        )
        parser.add_argument(
            "--eval.out",
            type=str | None,
            default=None,
            help="output folder; null: evaluation/ beside the checkpoint's checkpoints/ folder",
        )
        parser.add_argument(
            "--eval.progress",
            type=bool,
            default=True,
            help="a line on stderr as each attack finishes (AutoAttack's own lines included)",
        )


def _test_tensors(dm: ImageDataModule, max_examples: int | None) -> tuple[Tensor, Tensor]:
    xs, ys, n = [], [], 0
    for x, y in dm.split_dataloader("test"):
        xs.append(x)
        ys.append(y)
        n += len(y)
        if max_examples is not None and n >= max_examples:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:max_examples], y[:max_examples]) if max_examples is not None else (x, y)


def _batches(x: Tensor, y: Tensor, batch_size: int):
    for i in range(0, len(y), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def autoattack_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    device: torch.device,
    batch_size: int,
    attacks: Sequence[str] = STANDARD_ATTACKS,
    progress: bool = False,
) -> float:
    """Robust accuracy under AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square).

    ``attacks``: a subset of the standard version's four attacks, run in the standard order with
    the standard version's settings (APGD-T and FAB-T on 9 target classes, or all K - 1 other
    classes of a K < 10 class model; Square 5000 queries). An example counts as robust when none
    of them breaks it (Croce & Hein, ICML 2020).
    ``progress``: AutoAttack's own lines (per batch and attack) on stderr, prefixed with the eps.

    Raises:
        ValueError: an unknown attack name, or APGD-T on fewer than 4 classes (its targeted DLR
            loss needs the 4 largest logits).
    """
    unknown = [a for a in attacks if a not in STANDARD_ATTACKS]
    if unknown or not attacks:
        raise ValueError(
            f"AutoAttack attacks {list(attacks)}: name one or more of {', '.join(STANDARD_ATTACKS)}"
        )
    with torch.no_grad():
        classes = int(model(x[:1].to(device)).shape[1])
    problem = autoattack_class_problem(attacks, classes)
    if problem:
        raise ValueError(problem)
    from pyautoattack import AutoAttack

    adversary = AutoAttack(
        model,
        norm={"linf": "Linf", "l2": "L2"}[norm],
        eps=eps,
        version="standard",
        device=device,
        seed=0,
    )
    adversary.verbose = progress
    targets = autoattack_target_classes(classes)  # pyautoattack's 9 would index past K - 1
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
    adversary.attacks_to_run = [a for a in STANDARD_ATTACKS if a in attacks]  # the settings stay
    with _autoattack_lines(f"AutoAttack {norm} eps {eps:g}: ", progress):
        x_adv, _ = adversary.run_standard_evaluation(
            x.to(device), y.to(device), batch_size=batch_size
        )
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(1).cpu() for xb, _ in _batches(x_adv, y, batch_size)])
    return float((pred == y).float().mean())


def autoattack_target_classes(classes: int) -> int:
    """Target classes of APGD-T and FAB-T: the standard version's 9, at most the other K - 1."""
    return min(9, classes - 1)


def autoattack_class_problem(attacks: Sequence[str], classes: int) -> str | None:
    """Why AutoAttack's ``attacks`` cannot run on a ``classes``-class model, or None."""
    if "apgd-t" in attacks and classes < 4:
        rest = [a for a in attacks if a != "apgd-t"]
        instead = (
            f"--eval.autoattack_attacks=[{','.join(rest)}]" if rest else "--eval.autoattack=false"
        )
        return (
            f"AutoAttack's apgd-t needs at least 4 classes (its targeted DLR loss), the model has "
            f"{classes}; run without it: {instead}"
        )
    return None


@contextlib.contextmanager
def _autoattack_lines(prefix: str, show: bool) -> Iterator[None]:
    """Print pyautoattack's ``auto-attack`` log records (progress at DEBUG) on stderr after ``prefix``.

    Its checks' warnings (e.g. logits that look like probabilities) print either way.
    """
    logger = logging.getLogger("auto-attack")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROGRESS}{prefix}%(message)s"))
    handler.setLevel(logging.DEBUG if show else logging.WARNING)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if show else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _progress(show: bool, message: str) -> None:
    if show:
        sys.stderr.write(f"{PROGRESS}{message}\n")
        sys.stderr.flush()


def certified_report(
    model: SNClassifier,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps_list: list[float],
    device: torch.device,
    batch_size: int,
) -> dict[str, Any]:
    """Certified accuracy per eps from the sound pairwise LipLT bound, or why there is none.

    Certificates are l2; an linf radius eps is certified through the l2 ball of radius
    ``eps * sqrt(d)`` that contains it (sound, conservative).
    """
    from sn_lightning.lipschitz import certified_logits, certified_radius, liplt_bound

    shape = tuple(model.hparams.input_shape)
    try:
        with torch.no_grad():
            L = liplt_bound(model.model, shape, pairwise=True, certify=True).to(device)
    except ValueError as err:
        return {"reason": f"no sound certificate for this backbone: {err}"}
    scale = math.sqrt(math.prod(shape)) if norm == "linf" else 1.0
    radii = []
    for xb, yb in _batches(x, y, batch_size):
        logits = certified_logits(model.model, xb.to(device))
        radii.append(certified_radius(logits, yb.to(device), L).cpu())
    radius = torch.cat(radii)
    rule = "pairwise LipLT, sound"
    if norm == "linf":
        rule += "; linf eps certified through the l2 ball of radius eps * sqrt(d)"
    return {
        "rule": rule,
        "acc": {f"{eps:g}": float((radius > eps * scale).float().mean()) for eps in eps_list},
    }


def plot_curve(report: dict[str, Any], path: Path) -> None:
    """Accuracy against eps for each attack (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    aa = report.get("autoattack_settings", {})
    subset = f" ({', '.join(aa['attacks'])})" if aa.get("version") == "standard subset" else ""
    curves = {
        f"PGD-{report['pgd_settings']['steps']}": report.get("pgd"),
        f"AutoAttack{subset}": report.get("autoattack"),
        "certified (LipLT)": report.get("certified", {}).get("acc"),
    }
    for label, curve in curves.items():
        if curve:
            eps = [0.0, *[float(e) for e in curve]]
            acc = [report["clean_acc"], *curve.values()]
            ax.plot(eps, acc, marker="o", label=label)
    ax.set_xlabel(f"eps ({report['norm']}, [0, 1] pixel units)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(report.get("backbone", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _device(name: str) -> torch.device:
    """``--eval.device``: auto (CUDA when available), cpu, cuda, cuda:N, mps, ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"unknown eval device {name!r}; valid choices: auto, cpu, cuda, cuda:N, mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"eval device {name!r}: no CUDA device here; use auto or cpu")
    return device


def _load_weights(model: SNClassifier, datamodule: object, ckpt_path: Path) -> None:
    """Load a Lightning checkpoint's weights; a file or config that does not fit is a ConfigError."""
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling errors have many types
        raise ConfigError(
            f"{ckpt_path} is not a checkpoint torch.load can read (a .ckpt file that a training "
            f"run wrote): {first_line(err)}"
        ) from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    why = state_dict_mismatch(model, state["state_dict"])
    if why is not None:
        raise ConfigError(
            f"checkpoint {ckpt_path} does not fit the model built from this config (pass the "
            f"training run's config.yaml): {why}"
        )
    changed = settings_mismatch(model, datamodule, state)
    if changed:  # same weights' shapes, another function or other test images: wrong numbers
        raise ConfigError(
            f"checkpoint {ckpt_path} was trained with other settings: {', '.join(changed)}; pass "
            "the training run's config.yaml (in its run folder) without overriding these"
        )
    model.load_state_dict(state["state_dict"])


def check_eval(cli: EvaluateCLI) -> tuple[Path, list[float], torch.device]:
    """The checkpoint path, radii and device, checked; then the checkpoint's weights, loaded.

    Everything a user can get wrong is found here, before Lightning's start-up lines print:
    the radii and settings before the checkpoint is read, then a file that is not a checkpoint
    or one of another model.
    """
    cfg = cli.config
    ev = cfg.eval
    if cfg.ckpt_path is None:
        raise ConfigError("--ckpt_path is required: the checkpoint to evaluate")
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError(f"checkpoint {ckpt_path} does not exist")
    if ev.steps < 1 or ev.restarts < 1 or ev.batch_size < 1:
        raise ConfigError(
            f"eval steps, restarts, batch_size must be >= 1, got {ev.steps}, {ev.restarts}, {ev.batch_size}"
        )
    if ev.autoattack_attacks is not None and not ev.autoattack_attacks:
        raise ConfigError(
            "eval autoattack_attacks is empty; name some of apgd-ce, apgd-t, fab-t, square, "
            "null for all four, or turn AutoAttack off with --eval.autoattack=false"
        )
    classes = cli.model.hparams.get("num_classes")
    attacks = ev.autoattack_attacks or STANDARD_ATTACKS
    problem = autoattack_class_problem(attacks, classes) if ev.autoattack and classes else None
    if problem:
        raise ConfigError(problem)
    if ev.max_examples is not None and ev.max_examples < 1:
        raise ConfigError(f"eval max_examples must be >= 1 or null (all), got {ev.max_examples}")
    eps_list = ev.eps if ev.eps is not None else DEFAULT_EPS[ev.norm]
    check_radii("eval eps", eps_list, f"the defaults {DEFAULT_EPS[ev.norm]}")
    device = _device(ev.device)
    model: SNClassifier = cli.model
    shape = model.hparams.get("input_shape")
    for eps in eps_list:  # before the checkpoint and the data load
        if ev.norm == "linf":
            check_linf("linf", eps)
        elif shape is not None:
            check_l2_radius(eps, tuple(shape), "eval")
    _load_weights(model, cli.datamodule, ckpt_path)
    return ckpt_path, eps_list, device


def run(
    cli: EvaluateCLI, ckpt_path: Path, eps_list: list[float], device: torch.device
) -> dict[str, Any]:
    """Attack the test set with the loaded checkpoint, write the report and the plot.

    ``ckpt_path``, ``eps_list``, ``device``: as :func:`check_eval` returns them (it loaded the
    weights).
    """
    ev = cli.config.eval
    model: SNClassifier = cli.model
    model.to(device).eval()
    dm: ImageDataModule = cli.datamodule
    dm.prepare_data()
    dm.setup("test")
    x, y = _test_tensors(dm, ev.max_examples)
    report: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "backbone": model.hparams.backbone,
        "beta": model.hparams.beta,
        "norm": ev.norm,
        "n": len(y),
        "device": str(device),
        "clean_acc": evaluate(model.model, _batches(x, y, ev.batch_size), device)["acc"],
        "pgd_settings": {
            "steps": ev.steps,
            "restarts": ev.restarts,
            "step_size": "2.5 * eps / steps",
            "random_start": True,
        },
        "pgd": {},
    }
    _progress(
        ev.progress,
        f"clean acc {report['clean_acc']:.4f} (n={report['n']}); PGD-{ev.steps} and "
        + ("AutoAttack " if ev.autoattack else "")
        + f"at {ev.norm} eps {', '.join(f'{e:g}' for e in eps_list)}",
    )
    for eps in eps_list:
        start = time.perf_counter()
        attack = PGD(
            ev.norm,
            eps=eps,
            steps=ev.steps,
            step_size=2.5 * eps / ev.steps,
            random_start=True,
            restarts=ev.restarts,
        )
        report["pgd"][f"{eps:g}"] = evaluate(
            model.model, _batches(x, y, ev.batch_size), device, attack=attack
        )["acc"]
        _progress(
            ev.progress,
            f"PGD-{ev.steps} {ev.norm} eps {eps:g}: acc {report['pgd'][f'{eps:g}']:.4f} "
            f"({time.perf_counter() - start:.1f} s)",
        )
    report["certified"] = certified_report(
        model, x, y, norm=ev.norm, eps_list=eps_list, device=device, batch_size=ev.batch_size
    )
    certified = report["certified"]
    _progress(
        ev.progress,
        "certified acc "
        + (
            ", ".join(f"eps {eps} {acc:.4f}" for eps, acc in certified["acc"].items())
            if "acc" in certified
            else f"none ({certified['reason']})"
        ),
    )
    if ev.autoattack:
        attacks = [a for a in STANDARD_ATTACKS if a in (ev.autoattack_attacks or STANDARD_ATTACKS)]
        report["autoattack_settings"] = {
            "version": "standard" if len(attacks) == len(STANDARD_ATTACKS) else "standard subset",
            "attacks": attacks,
            "target_classes": autoattack_target_classes(model.hparams.num_classes),
        }
        report["autoattack"] = {
            f"{eps:g}": autoattack_accuracy(
                model.model,
                x,
                y,
                norm=ev.norm,
                eps=eps,
                device=device,
                batch_size=ev.batch_size,
                attacks=attacks,
                progress=ev.progress,
            )
            for eps in eps_list
        }
    out = Path(ev.out) if ev.out else ckpt_path.parent.parent / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curve(report, out / "robustness_curve.png")
    lines = [f"clean acc {report['clean_acc']:.4f} (n={report['n']})"]
    certified = report["certified"].get("acc", {})
    settings = report.get("autoattack_settings", {})
    aa_name = (
        f"AutoAttack[{','.join(settings['attacks'])}]"
        if settings.get("version") == "standard subset"
        else "AutoAttack"
    )
    for eps in report["pgd"]:
        aa = report.get("autoattack", {}).get(eps)
        lines.append(
            f"eps {eps}: PGD-{ev.steps} {report['pgd'][eps]:.4f}"
            + (f"  {aa_name} {aa:.4f}" if aa is not None else "")
            + (f"  certified {certified[eps]:.4f}" if eps in certified else "")
        )
    if "reason" in report["certified"]:
        lines.append(f"certified: none ({report['certified']['reason']})")
    sys.stdout.write("\n".join([*lines, f"report: {out / 'evaluation.json'}"]) + "\n")
    report["out"] = str(out)
    return report


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the report."""
    prog = "python -m sn_lightning.evaluate"
    with quiet_lightning(prog), one_line_errors(prog), _restored_environ(*SEED_ENVIRON):
        with held_startup_lines() as release:
            cli = build_cli(
                EvaluateCLI,
                model_class=SNClassifier,
                datamodule_class=ImageDataModule,
                run=False,
                args=args,
                parser_class=_OneLineErrorParser,
                save_config_callback=None,
                parser_kwargs={"prog": prog, "description": DESCRIPTION},
                auto_configure_optimizers=False,
                trainer_defaults={"logger": False, "enable_checkpointing": False},
                seed_everything_default=0,
            )
            checked = check_eval(cli)
            release()
        return run(cli, *checked)


if __name__ == "__main__":
    main()
