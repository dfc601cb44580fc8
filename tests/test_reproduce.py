"""benchmarks/reproduce.py: the run plan, the beta selection and the paper-form table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import reproduce as R

ROOT = Path(__file__).resolve().parents[1]


def test_plan_covers_the_grid_once_and_expresses_no_sn_by_omission():
    runs = R.plan(R.BUDGETS["small"], ["l2", "regimes", "linf"])
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    # ERM is shared by the three tables: 4 + 2 + 2 schemes x the budget's betas
    assert len(runs) == (4 + 2 + 2) * len(R.BUDGETS["small"].betas)
    assert len(R.plan(R.BUDGETS["full"], ["l2"])) == 4 * len(R.BETAS)
    nosn = next(r for r in runs if r.name == "elunet/pgm_l2/nosn")
    assert not any(a.startswith("--model.beta") for a in nosn.args)
    sn = next(r for r in runs if r.name == "elunet/pgm_l2/b1.6")
    assert "--trainer.num_sanity_val_steps=0" in sn.args
    assert "--model.beta=1.6" in sn.args
    assert "--data.train_subset=1000" in sn.args
    assert "--model.sn_refresh_iterations=0" in sn.args  # the paper's schedule, as stored


def test_planned_arguments_reach_the_model(tmp_path):
    """The exact argv of a planned run parses in the fit CLI with the intended values."""
    run = next(r for r in R.plan(R.BUDGETS["small"], ["linf"]) if r.name == "elunet/pgm_linf/b4")
    proc = subprocess.run(
        [sys.executable, "-m", "sn_lightning.fit", *run.args, "--print_config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["beta"] == 4.0
    assert cfg["model"]["sn_refresh_iterations"] == 0
    assert cfg["model"]["backbone"] == "sn_lightning:elu_net"
    attack = cfg["adversarial"]["attack"]
    assert attack["class_path"] == "sn_lightning.attacks.PGD"
    assert attack["init_args"]["norm"] == "linf"
    assert attack["init_args"]["eps"] == 0.1
    assert attack["init_args"]["steps"] == 15
    assert cfg["data"]["train_subset"] == 1000
    assert cfg["trainer"]["max_epochs"] == 5


def _record(scheme, beta, train, val, test):
    acc = {"train": {"acc": train}, "val": {"acc": val}, "test": {"acc": test}}
    return {
        "model": "elunet",
        "scheme": scheme,
        "beta": beta,
        "results": {**acc, "adversarial": {"train_attack/pgd15_l2_0.6": acc}},
    }


def test_best_beta_is_chosen_on_validation_and_the_row_reports_train_test_gap():
    records = [
        _record("pgm_l2", None, 0.90, 0.50, 0.52),
        _record("pgm_l2", 1.0, 0.60, 0.55, 0.56),
        _record("pgm_l2", 1.6, 0.70, 0.61, 0.58),  # best validation, not best test
        _record("pgm_l2", 4.0, 0.80, 0.57, 0.60),
    ]
    (row,) = R.table_rows(records, "elunet", ["pgm_l2"], {"pgm_l2": "train_attack"})
    assert row["best_beta"] == 1.6
    assert row["sn"]["test"] == 0.58
    assert row["sn"]["gap"] == pytest.approx(0.12)
    assert row["no_sn"]["gap"] == pytest.approx(0.38)
    assert list(row["curve"]) == ["b1", "b1.6", "b4", "nosn"]
    (line,) = R._fmt_rows([row])[2:]
    assert "0.520 → 0.580" in line
    assert "+0.380 → +0.120" in line


def test_report_writes_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "ROOT", tmp_path)
    out = tmp_path / "runs"
    for i, beta in enumerate((None, 1.0, 3.0)):
        rec = _record("fgm_l2", beta, 0.9 - 0.1 * i, 0.5 + 0.05 * i, 0.5 + 0.04 * i)
        d = out / "elunet/fgm_l2"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{R._beta_tag(beta)}.json").write_text(json.dumps(rec))
    summary = R.report(R.BUDGETS["small"], out)
    (row,) = summary["tables"]["elunet_l2"]
    assert row["best_beta"] == 1.0  # beta 3.0 is not on the budget's grid: ignored
    md = (tmp_path / "benchmarks/results/reproduce_small.md").read_text()
    assert "| fgm_l2 | training attack | 0.500 → 0.540 |" in md
    png = tmp_path / "docs/reproduce_small_elunet_l2.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_run_all_rejects_a_bad_job_count(tmp_path):
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        R.run_all([], tmp_path, tmp_path, jobs=0)


@pytest.mark.slow
def test_run_all_in_two_worker_processes_writes_every_record(tmp_path):
    quick = [
        f"--config={ROOT / 'configs' / 'quickstart.yaml'}",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--robust_eval.final_max_examples=64",
    ]
    runs = [
        R.Run("digits/erm/b2", (*quick,), {"model": "digits", "scheme": "pgd", "beta": 2.0}),
        R.Run("digits/erm/nosn", (*quick, "--model.beta=null"), {"model": "digits", "beta": None}),
    ]
    bad = R.Run("digits/erm/bad", (*quick, "--model.beta=-1"), {"model": "digits", "beta": -1})
    records = tmp_path / "records"
    # a failing run (a CLI error in its worker) does not stop the others; it is named at the end
    with pytest.raises(RuntimeError, match=r"1 of 3 runs failed: digits/erm/bad"):
        R.run_all([bad, *runs], tmp_path / "runs", records, jobs=2)
    saved = {
        p.relative_to(records).as_posix(): json.loads(p.read_text())
        for p in records.rglob("*.json")
    }
    assert set(saved) == {"digits/erm/b2.json", "digits/erm/nosn.json"}
    for rec in saved.values():
        assert rec["device"] == "cpu" and rec["torch_threads"] >= 1
        assert 0.5 < rec["results"]["test"]["acc"] <= 1.0
    assert saved["digits/erm/b2.json"]["results"]["settings"]["model"]["beta"] == 2.0
    assert saved["digits/erm/nosn.json"]["results"]["settings"]["model"]["beta"] is None
