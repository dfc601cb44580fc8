"""Reproduce the seed paper's claim on Fashion-MNIST: does spectral normalization close the adversarial
generalization gap? (Farnia, Zhang, Tse, ICLR 2019; recipe in PAPERS.md 1.5-1.6.)

Every run is ``python -m sn_lightning.fit`` with the Fashion-MNIST ELU-Net config (Adam 1e-3, batch 128,
no augmentation, validation = the first 500 test images, test = the other 9,500) plus the scheme's
attack/regime fragment and ``--model.beta``, executed in this process through the same CLI. Groups:

- ``l2``:   ERM, FGM, PGM (15 steps of 2 eps / 15), WRM; l2 eps = 0.05 x mean training-input norm,
            WRM gamma = 0.04 x that norm; predicted labels; beta in {1.0, 1.3, 1.6, 2.0, 4.0, no SN}.
            Adversarial accuracy is measured with the training attack, as the paper did.
- ``linf``: FGM and PGM (15 steps) in the linf ball of radius 0.1 (pixel units), same beta grid.
- ``regimes``: layerwise adversarial training and DataGrad (l1, exact) against ERM, same beta grid,
            evaluated clean and under the l2 PGM attack above.
- ``crm``:  certified training (4C3F): CE vs CE + CRM, certified l2 accuracy with the naive product
            bound vs the sound pairwise LipLT bound.
- ``alexnet``: the ``l2`` group with mini-AlexNet (about 15x ELU-Net's FLOPs: not among the small
            budget's default groups; ``--groups alexnet --jobs 8`` on a GPU: 16 runs took about
            6 min on an H100; on 2 CPU cores a PGM or WRM run takes about 30 min).

The beta of the "SN" column is the one with the best validation accuracy (adversarial under the training
attack for adversarial schemes, clean for ERM; PGM-adversarial for the regimes table), as in the paper.

    python -m benchmarks.reproduce --budget small            # ELU-Net, 1,000 training images, ~85-90 min on 2 cores
    python -m benchmarks.reproduce --budget full             # all 60,000 images, 30 epochs, + mini-AlexNet (GPU)
    python -m benchmarks.reproduce --budget small --groups alexnet --jobs 8   # 8 runs at a time (GPU)
    python -m benchmarks.reproduce --budget small --groups l2 --dry-run   # print the commands only
    python -m benchmarks.reproduce --budget small --report-only           # tables and plots from saved runs

Each finished run leaves a compact record in ``benchmarks/results/reproduce_<budget>/`` (committed with
the tables); runs with a record are skipped, so an interrupted reproduction resumes, also on another
machine. Writes ``benchmarks/results/reproduce_<budget>.{json,md}`` and ``docs/reproduce_<budget>_*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BETAS: tuple[float | None, ...] = (1.0, 1.3, 1.6, 2.0, 4.0, None)
BASE = "configs/fashion_mnist_elunet.yaml"
GROUPS = ("l2", "linf", "regimes", "crm", "alexnet")


@dataclass(frozen=True)
class Budget:
    """How much of the data and how many epochs a budget spends (said next to every number)."""

    name: str
    train_subset: int | None  # None: all 60,000 training images
    epochs: int
    eval_max: int | None  # cap per split for adversarial evaluation (clean accuracy is always full)
    betas: tuple[float | None, ...]  # None: no spectral normalization
    groups: tuple[str, ...]
    crm_train_subset: int | None
    crm_epochs: int
    crm_start_epoch: int


BUDGETS = {
    "small": Budget("small", 1000, 5, 500, BETAS, ("l2", "regimes", "crm", "linf"), 2000, 8, 2),
    "full": Budget("full", None, 30, None, BETAS, GROUPS, None, 60, 10),
}


def _attack(kind: str, norm: str, **init: Any) -> str:
    """A JSON ``class_path``/``init_args`` value for ``--adversarial.attack`` or a list item."""
    init = {"norm": norm, **init} if kind != "WRM" else init
    return json.dumps({"class_path": f"sn_lightning.attacks.{kind}", "init_args": init})


PGM_L2 = _attack("PGD", "l2", eps_rel=0.05, steps=15, labels="predicted")
ATTACKS = {
    "fgm_l2": _attack("FGM", "l2", eps_rel=0.05, labels="predicted"),
    "pgm_l2": PGM_L2,
    "wrm": _attack("WRM", "l2", gamma_rel=0.04, steps=15, labels="predicted"),
    "fgm_linf": _attack("FGM", "linf", eps=0.1, labels="predicted"),
    "pgm_linf": _attack("PGD", "linf", eps=0.1, steps=15, labels="predicted"),
}
SCHEMES = {
    "l2": ("erm", "fgm_l2", "pgm_l2", "wrm"),
    "linf": ("erm", "fgm_linf", "pgm_linf"),
    "regimes": ("erm", "layerwise", "datagrad"),
    "alexnet": ("erm", "fgm_l2", "pgm_l2", "wrm"),
}
CERTIFY_EPS = (0.1, 0.25, 0.5)
CRM_MODELS = ("c4f3", "c6f2")


@dataclass(frozen=True)
class Run:
    """One training run: its directory (relative to the output root) and its CLI arguments."""

    name: str
    args: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def _beta_tag(beta: float | None) -> str:
    return "nosn" if beta is None else f"b{beta:g}"


def plan(budget: Budget, groups: Sequence[str]) -> list[Run]:
    """The runs of `groups` under `budget`, deduplicated (ERM runs serve several tables)."""
    common = [
        f"--trainer.max_epochs={budget.epochs}",
        f"--trainer.check_val_every_n_epoch={budget.epochs}",  # the final evaluation covers val
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=false",
        "--data.num_workers=0",
        # The paper's schedule alone (one power iteration a step), as the stored runs were made:
        # they predate the classifier's refresh of u (docs/SPECTRAL.md, "Trained weights can outrun u").
        "--model.sn_refresh_iterations=0",
    ]
    if budget.train_subset is not None:
        common.append(f"--data.train_subset={budget.train_subset}")
    if budget.eval_max is not None:
        common.append(f"--robust_eval.final_max_examples={budget.eval_max}")
    runs: dict[str, Run] = {}
    for group in groups:
        if group == "crm":
            runs.update({r.name: r for r in _crm_runs(budget)})
            continue
        model = "alexnet" if group == "alexnet" else "elunet"
        for scheme in SCHEMES[group]:
            for beta in budget.betas:
                name = f"{model}/{scheme}/{_beta_tag(beta)}"
                args = [f"--config={BASE}", *common, *_scheme_args(scheme, budget)]
                if model == "alexnet":
                    args.append("--model.backbone=sn_lightning:mini_alexnet")
                if beta is not None:
                    args.append(f"--model.beta={beta}")
                meta = {"model": model, "scheme": scheme, "beta": beta}
                runs[name] = Run(name, tuple(args), meta)
    return list(runs.values())


def _scheme_args(scheme: str, budget: Budget) -> list[str]:
    """Attack or regime keys; ERM and the regimes are also evaluated under the l2 PGM attack."""
    if scheme in ATTACKS:
        return [f"--adversarial.attack={ATTACKS[scheme]}"]
    robust = [f"--robust_eval.attacks=[{PGM_L2}]", f"--robust_eval.every_n_epochs={budget.epochs}"]
    if scheme == "layerwise":
        return ["--config=configs/regime/layerwise.yaml", *robust]
    if scheme == "datagrad":
        return ["--config=configs/regime/datagrad.yaml", *robust]
    return robust  # erm


def _crm_runs(budget: Budget) -> list[Run]:
    base = [
        "--config=configs/mnist_c4f3_crm.yaml",
        "--data.dataset=fashion_mnist",
        "--data.data_dir=/usr/share/datasets/fashion-mnist",
        "--data.download=false",
        "--data.val_size=500",
        "--data.val_source=test",
        "--data.batch_size=128",
        "--data.num_workers=0",
        f"--trainer.max_epochs={budget.crm_epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=false",
        f"--model.certify_eps=[{', '.join(f'{e:g}' for e in CERTIFY_EPS)}]",
    ]
    if budget.crm_train_subset is not None:
        base.append(f"--data.train_subset={budget.crm_train_subset}")
    crm = [
        "--model.crm_lambda=10.0",
        "--model.crm_r0=0.7",
        f"--model.crm_start_epoch={budget.crm_start_epoch}",
    ]
    return [
        Run("c4f3/ce/nosn", (*base, "--model.crm_lambda=0.0"), {"model": "c4f3", "scheme": "ce"}),
        Run("c4f3/crm/nosn", (*base, *crm), {"model": "c4f3", "scheme": "crm"}),
        # 6C2F (the CIFAR-10 architecture, here on 1x28x28): LipLT tightness after CRM training
        Run(
            "c6f2/crm/nosn",
            (*base, *crm, "--model.backbone=sn_lightning:c6f2"),
            {"model": "c6f2", "scheme": "crm"},
        ),
    ]


# ----------------------------------------------------------------------------------------- running


def execute(run: Run, out: Path, records: Path) -> dict[str, Any]:
    """Train and evaluate one run in this process (the fit CLI), return and save its record."""
    import torch

    from sn_lightning.data import ImageDataModule
    from sn_lightning.fit import SNLightningCLI
    from sn_lightning.fit import run as fit_run
    from sn_lightning.lit import SNClassifier

    run_dir = out / run.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run without a record is redone from scratch
    args = [*run.args, f"--trainer.default_root_dir={run_dir}"]
    start = time.perf_counter()
    cli = SNLightningCLI(
        SNClassifier,
        ImageDataModule,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    results = fit_run(cli)
    record = {**run.meta, "name": run.name, "args": args, "results": results}
    if run.meta.get("model") in CRM_MODELS:
        record["naive_certified"] = _naive_certified(cli.model, cli.datamodule)
    record["seconds"] = time.perf_counter() - start
    record["torch_threads"] = torch.get_num_threads()
    device = cli.trainer.strategy.root_device  # where the run trained, not what the host has
    record["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    record["results"].pop("spectral", None)  # per-layer report: in the run's results.json
    path = records / f"{run.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_all(todo: Sequence[Run], out: Path, records: Path, jobs: int = 1) -> None:
    """Execute `todo`: in this process (``jobs=1``) or in ``jobs`` spawned worker processes."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(todo) <= 1:
        for i, r in enumerate(todo, 1):
            rec = execute(r, out, records)
            print(f"[{i}/{len(todo)}] {r.name}: {rec['seconds']:.0f} s", flush=True)
        return
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be re-initialized in a fork
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(execute, r, out, records): r for r in todo}
        failed = []
        for i, fut in enumerate(as_completed(futures), 1):
            name = futures[fut].name
            try:
                rec = fut.result()
            except (Exception, SystemExit) as err:  # CLI errors exit; keep the others going
                failed.append(name)
                print(f"[{i}/{len(todo)}] {name}: FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            print(f"[{i}/{len(todo)}] {name}: {rec['seconds']:.0f} s", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} runs failed: {', '.join(failed)}")


def _naive_certified(model: Any, dm: Any) -> dict[str, Any]:
    """Certified accuracy (l2) with the naive bound: Lip(f_p - f_q) <= sqrt(2) * prod of layer bounds."""
    import torch

    from sn_lightning.fit import certified_accuracy_by_split
    from sn_lightning.lipschitz import naive_bound

    lip = naive_bound(model.model, tuple(model.hparams.input_shape))  # sound per-layer bounds
    c = model.hparams.num_classes
    pairwise = torch.full((c, c), math.sqrt(2.0) * lip, device=model.device)
    eps = certified_accuracy_by_split(model, dm, pairwise, CERTIFY_EPS)
    return {"lipschitz_naive": lip, "eps": eps}


def records_dir(budget: Budget) -> Path:
    """Where the budget's run records live (committed next to the tables)."""
    return ROOT / "benchmarks" / "results" / f"reproduce_{budget.name}"


def load_records(records: Path) -> list[dict[str, Any]]:
    """Every finished run's record under `records`."""
    return [json.loads(p.read_text()) for p in sorted(records.rglob("*.json"))]


# ----------------------------------------------------------------------------------------- report


def _row_numbers(rec: dict[str, Any], metric: str) -> dict[str, float]:
    """train / val / test accuracy of one run: clean, under its training attack, or under PGM l2."""
    res = rec["results"]
    if metric == "clean":
        return {s: res[s]["acc"] for s in ("train", "val", "test")}
    adv = res["adversarial"]
    if metric == "train_attack":
        key = next(k for k in adv if k.startswith("train_attack/"))
    else:  # "pgm_l2": the robust-evaluation attack
        key = next(k for k in adv if not k.startswith("train_attack/"))
    # the seed paper's measure: accuracy on the attack's points ("attack_acc"; records from before
    # session 26 stored it as "acc"), not the robust accuracy that also counts clean errors
    return {s: adv[key][s].get("attack_acc", adv[key][s]["acc"]) for s in ("train", "val", "test")}


def best_beta(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The SN run with the highest validation accuracy under `metric` (ties: the larger beta)."""
    sn = [r for r in records if r["beta"] is not None]
    if not sn:
        return None
    return max(sn, key=lambda r: (_row_numbers(r, metric)["val"], r["beta"]))


def table_rows(
    records: list[dict[str, Any]], model: str, schemes: Sequence[str], metric_of: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per scheme: no-SN and best-beta train/test accuracy and gap, plus the per-beta curve."""
    rows = []
    for scheme in schemes:
        runs = [r for r in records if r["model"] == model and r["scheme"] == scheme]
        base = next((r for r in runs if r["beta"] is None), None)
        metric = metric_of[scheme]
        best = best_beta(runs, metric)
        if base is None or best is None:
            continue
        b, s = _row_numbers(base, metric), _row_numbers(best, metric)
        curve = {
            _beta_tag(r["beta"]): _row_numbers(r, metric)
            for r in sorted(runs, key=lambda r: math.inf if r["beta"] is None else r["beta"])
        }
        rows.append(
            {
                "scheme": scheme,
                "metric": metric,
                "no_sn": {**b, "gap": b["train"] - b["test"]},
                "sn": {**s, "gap": s["train"] - s["test"]},
                "best_beta": best["beta"],
                "curve": curve,
            }
        )
    return rows


def _fmt_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| scheme | accuracy | test: no SN → SN | train: no SN → SN | gap: no SN → SN | best β |",
        "|---|---|---|---|---|---|",
    ]
    label = {"clean": "clean", "train_attack": "training attack", "pgm_l2": "PGM l2"}
    for r in rows:
        n, s = r["no_sn"], r["sn"]
        lines.append(
            f"| {r['scheme']} | {label[r['metric']]} | {n['test']:.3f} → {s['test']:.3f} | "
            f"{n['train']:.3f} → {s['train']:.3f} | {n['gap']:+.3f} → {s['gap']:+.3f} | "
            f"{r['best_beta']:g} |"
        )
    return lines


def plot_rows(
    rows: list[dict[str, Any]], title: str, path: Path, betas: tuple[float | None, ...] = BETAS
) -> None:
    """Test accuracy and gap against beta (no SN drawn at the right end), one line per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ticks = [_beta_tag(b) for b in betas]
    labels = [("∞ (no SN)" if b is None else f"{b:g}") for b in betas]
    for r in rows:
        xs = [i for i, t in enumerate(ticks) if t in r["curve"]]
        pts = [r["curve"][ticks[i]] for i in xs]
        axes[0].plot(xs, [p["test"] for p in pts], "o-", label=r["scheme"])
        axes[1].plot(xs, [p["train"] - p["test"] for p in pts], "o-", label=r["scheme"])
    for ax, ylabel in zip(axes, ("test accuracy", "gap (train - test)"), strict=True):
        ax.set_xticks(range(len(ticks)), labels)
        ax.set_xlabel("β (per-layer spectral-norm bound)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crm_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Certified test accuracy per eps: naive product bound vs sound pairwise LipLT, CE vs CRM."""
    rows = []
    for rec in records:
        if rec["model"] not in CRM_MODELS:
            continue
        cert = rec["results"]["certified"]
        rows.append(
            {
                "model": rec["model"],
                "scheme": rec["scheme"],
                "clean_test": rec["results"]["test"]["acc"],
                "lipschitz_naive": cert["lipschitz_naive"],
                "lipschitz_liplt": cert["lipschitz_liplt"],
                "naive": {e: v["test"] for e, v in rec["naive_certified"]["eps"].items()},
                "liplt": {e: v["test"] for e, v in cert["eps"].items()},
            }
        )
    return rows


def report(budget: Budget, records_path: Path | None = None) -> dict[str, Any]:
    """Tables (markdown + JSON) and plots from the saved records (of the budget's betas)."""
    allowed = {_beta_tag(b) for b in budget.betas}
    records = [
        r
        for r in load_records(records_path or records_dir(budget))
        if _beta_tag(r.get("beta")) in allowed  # CRM runs have no beta: "nosn"
    ]
    adv = dict.fromkeys(("fgm_l2", "pgm_l2", "wrm", "fgm_linf", "pgm_linf"), "train_attack")
    tables: dict[str, Any] = {}
    md = [
        f"Budget `{budget.name}`: "
        + (
            f"the first {budget.train_subset:,} of a seeded shuffle of the 60,000 training images"
            if budget.train_subset
            else "all 60,000 training images"
        )
        + f", {budget.epochs} epochs; validation = first 500 test images, test = the other 9,500"
        + (
            f" (adversarial accuracy on the first {budget.eval_max:,} of train and test)."
            if budget.eval_max
            else "."
        ),
        "",
    ]
    specs = [
        ("elunet_l2", "elunet", SCHEMES["l2"], {"erm": "clean", **adv}, "ELU-Net, l2"),
        ("elunet_linf", "elunet", SCHEMES["linf"], {"erm": "clean", **adv}, "ELU-Net, linf 0.1"),
        (
            "elunet_regimes",
            "elunet",
            SCHEMES["regimes"],
            dict.fromkeys(SCHEMES["regimes"], "pgm_l2"),
            "ELU-Net, layerwise and DataGrad vs ERM, under PGM l2",
        ),
        ("alexnet_l2", "alexnet", SCHEMES["alexnet"], {"erm": "clean", **adv}, "mini-AlexNet, l2"),
    ]
    for key, model, schemes, metric_of, title in specs:
        rows = table_rows(records, model, schemes, metric_of)
        if all(r["scheme"] == "erm" for r in rows):  # nothing but the shared baseline yet
            continue
        tables[key] = rows
        png = ROOT / "docs" / f"reproduce_{budget.name}_{key}.png"
        plot_rows(rows, f"Fashion-MNIST {title} ({budget.name} budget)", png, budget.betas)
        md += [f"### {title}", "", *_fmt_rows(rows), "", f"![{title}]({png.relative_to(ROOT)})", ""]
    certified = crm_rows(records)
    if certified:
        tables["crm"] = certified
        head = " / ".join(f"{e:g}" for e in CERTIFY_EPS)
        md += [
            "### Certified accuracy (l2), 4C3F and 6C2F",
            "",
            f"| model | training | clean test | Lipschitz naive / LipLT (ratio) | certified, naive "
            f"bound, ε = {head} | certified, LipLT bound, ε = {head} |",
            "|---|---|---|---|---|---|",
        ]
        for r in certified:
            naive = " / ".join(f"{v:.3f}" for v in r["naive"].values())
            liplt = " / ".join(f"{v:.3f}" for v in r["liplt"].values())
            md.append(
                f"| {r['model']} | {r['scheme']} | {r['clean_test']:.3f} | "
                f"{r['lipschitz_naive']:.3g} / {r['lipschitz_liplt']:.3g} "
                f"({r['lipschitz_naive'] / r['lipschitz_liplt']:.2f}×) | {naive} | {liplt} |"
            )
        md.append("")
    seconds = sum(r.get("seconds", 0.0) for r in records)
    by_device: dict[str, list[float]] = {}
    for r in records:
        by_device.setdefault(r.get("device", "cpu"), []).append(r.get("seconds", 0.0))
    where = "; ".join(
        f"{len(t)} on {d}, {sum(t) / 60:.0f} min of run time" for d, t in sorted(by_device.items())
    )
    md.append(f"{len(records)} runs ({where}; runs may overlap in time with `--jobs`).")
    summary = {
        "budget": budget.__dict__,
        "tables": tables,
        "runs": len(records),
        "seconds": seconds,
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"reproduce_{budget.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / f"reproduce_{budget.name}.md").write_text("\n".join(md) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Run (or list) the budget's runs, then write the tables and plots."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--groups", help=f"comma-separated subset of {', '.join(GROUPS)}")
    parser.add_argument(
        "--out", type=Path, help="run directories (default runs/reproduce/<budget>)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the fit commands and stop")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (a GPU is shared; CPU threads are split)",
    )
    parser.add_argument("--report-only", action="store_true", help="tables/plots from saved runs")
    ns = parser.parse_args(argv)
    budget = BUDGETS[ns.budget]
    groups = budget.groups if not ns.groups else tuple(ns.groups.split(","))
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        parser.error(f"unknown group(s) {bad}; valid choices: {', '.join(GROUPS)}")
    out = ns.out or ROOT / "runs" / "reproduce" / budget.name
    runs = plan(budget, groups)
    if ns.dry_run:
        for r in runs:
            print(shlex.join([sys.executable, "-m", "sn_lightning.fit", *r.args]))
        return
    records = records_dir(budget)
    if not ns.report_only:
        todo = [r for r in runs if not (records / f"{r.name}.json").exists()]
        print(f"{len(runs)} runs, {len(runs) - len(todo)} already done", flush=True)
        run_all(todo, out, records, ns.jobs)
    summary = report(budget, records)
    print((ROOT / "benchmarks" / "results" / f"reproduce_{budget.name}.md").read_text())
    print(f"{summary['runs']} runs in the report")


if __name__ == "__main__":
    main()
