"""Two-process CPU DDP (gloo) through the CLI: every training regime keeps the ranks identical.

Each test is one ``python -m sn_lightning.fit`` run with ``--trainer.devices=2
--trainer.strategy=ddp``, regimes combined where they compose, and checks after training:

* every tensor of the state (parameters, BatchNorm statistics, spectral-norm ``u`` vectors, CRM's
  LipLT power-iteration vectors) is bitwise identical on both ranks (``tests.ddp_helpers.DumpState``);
* every metric in ``trainer.callback_metrics`` has the same value on both ranks, once per epoch
  (``tests.ddp_helpers.DumpMetrics``), and the validation metrics equal those rank 0 computes on
  the full validation split afterwards (results.json), also for a split of odd size (no example
  counted twice);
* results.json is written once, by rank 0, with the expected keys.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# A narrow ResNet-18 (timm; BatchNorm, stages layer1..layer4): the regimes' code paths at 1/60 the size.
RESNET = (
    "--model.backbone=timm:resnet18",
    '--model.backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}',
)
RESULT_KEYS = {"train", "val", "test", "gap", "adversarial", "settings", "lipschitz_bound"}


def _fit_ddp(
    tmp_path: Path, *args: str, callbacks: tuple[dict, ...] = (), strategy: str = "ddp"
) -> subprocess.CompletedProcess:
    dumps = [
        {"class_path": f"tests.ddp_helpers.{name}", "init_args": {"out": str(tmp_path)}}
        for name in ("DumpState", "DumpMetrics")
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sn_lightning.fit",
            *args,
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            f"--trainer.strategy={strategy}",
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks={json.dumps([*dumps, *callbacks])}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_state_identical(tmp_path: Path, *, exits: bool = True) -> dict[str, torch.Tensor]:
    """Both ranks' full states are bitwise equal, and (``exits``: processes that exit through
    the interpreter, not forked children) both left the process group before exiting (a live
    gloo group aborted rank 1 at exit in ~1 run in 45, and Lightning then killed rank 0 before
    results.json); returns rank 0's."""
    for r in (0, 1) if exits else ():
        exit_state = json.loads((tmp_path / f"exit_rank{r}.json").read_text())
        assert exit_state == {"process_group_alive": False}, r
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    u_keys = [k for k in states[0] if "parametrizations" in k and k.endswith(".u")]
    assert u_keys, "no spectral-norm vectors: the run was meant to use SN"
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)
    return states[0]


def _assert_metrics_synchronised(tmp_path: Path, expected: set[str]) -> dict[str, float]:
    """Each epoch's callback metrics are equal on both ranks; returns rank 0's final ones.

    `expected` must be among the final metrics (callback_metrics keeps earlier epochs' keys).
    """
    ranks = [json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # after epoch 0 and after epoch 1 (the end)
    for epoch, (m0, m1) in enumerate(zip(*ranks, strict=True)):
        assert m0.keys() == m1.keys(), epoch
        unequal = {k: (m0[k], m1[k]) for k in m0 if m0[k] != m1[k]}
        assert not unequal, (epoch, unequal)
    final = ranks[0][-1]
    assert expected <= final.keys(), sorted(expected - final.keys())
    return final


def _results(tmp_path: Path, proc: subprocess.CompletedProcess) -> dict:
    """The one results.json (rank 0 writes it and prints its path; rank 1 prints nothing)."""
    (path,) = tmp_path.rglob("results.json")
    assert proc.stdout.count("results: ") == 1, proc.stdout[-2000:]
    saved = json.loads(path.read_text())
    assert saved.keys() >= RESULT_KEYS
    assert str(saved["settings"]["trainer"]["devices"]) == "2"
    return saved


def _assert_val_metrics_are_full_split(metrics: dict[str, float], results: dict) -> None:
    """The synchronised val/acc and val/loss equal rank 0's evaluation of the full split."""
    assert math.isclose(metrics["val/acc"], results["val"]["acc"], abs_tol=1e-6)
    assert math.isclose(metrics["val/loss"], results["val"]["loss"], rel_tol=1e-4)


@pytest.mark.ddp
def test_ddp_sn_pgd_layerwise_keeps_ranks_identical(tmp_path):
    """ResNet (BatchNorm) + SN + layerwise (+ PGD from epoch 1); no validation, so only the
    epoch-end broadcast makes the BatchNorm statistics equal (Note [DDP state])."""
    proc = _fit_ddp(
        tmp_path,
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(CONFIGS / "regime" / "layerwise.yaml"),
        *RESNET,
        "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=0",
        "--adversarial.start_epoch=1",  # epoch 0 clean (train/acc), epoch 1 PGD (train/adv_acc)
        "--robust_eval.final_max_examples=64",
    )
    state = _assert_state_identical(tmp_path)
    assert any(k.endswith("running_mean") for k in state)
    extras = json.loads((tmp_path / "extras_rank0.json").read_text())
    other = json.loads((tmp_path / "extras_rank1.json").read_text())
    # each rank trains on its own half of the shuffled split (the data module's VisitSampler)
    assert (extras["shard"], other["shard"]) == ([0, 2], [1, 2])
    assert extras["first_labels"] != other["first_labels"]
    # each rank keeps its own batch-shaped deltas (batch 32, drop_last), for layer1 .. layer4
    assert sorted(extras["layerwise_deltas"]) == [f"net.layer{i}" for i in range(1, 5)]
    assert {shape[0] for shape in extras["layerwise_deltas"].values()} == {32}
    metrics = _assert_metrics_synchronised(
        tmp_path, {"train/loss", "train/acc", "train/adv_acc", "sn/lipschitz_bound"}
    )
    assert not any(k.startswith("val/") for k in metrics)
    saved = _results(tmp_path, proc)
    assert "train_attack/pgd5_linf_0.1" in saved["adversarial"]
    assert saved["settings"]["layerwise"]["eps"] == 0.01


@pytest.mark.ddp
def test_ddp_datagrad_fgm_keeps_ranks_identical_and_metrics_synced(tmp_path):
    """ResNet + SN + exact DataGrad (double backward through DDP) on FGM-l2 examples."""
    proc = _fit_ddp(
        tmp_path,
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(CONFIGS / "attack" / "fgm_l2.yaml"),
        "--config",
        str(CONFIGS / "regime" / "datagrad.yaml"),
        *RESNET,
        "--trainer.limit_train_batches=4",
        "--robust_eval.every_n_epochs=1",
        "--robust_eval.max_batches=1",
        "--robust_eval.final_max_examples=64",
    )
    state = _assert_state_identical(tmp_path)
    assert any(k.endswith("running_mean") for k in state)
    metrics = _assert_metrics_synchronised(
        tmp_path,
        {
            "train/loss",
            "train/adv_acc",
            "train/datagrad_penalty",
            "val/loss",
            "val/acc",
            "val/robust_acc/pgd20_linf_0.1",
            "sn/lipschitz_bound",
        },
    )
    saved = _results(tmp_path, proc)
    _assert_val_metrics_are_full_split(metrics, saved)
    (name,) = (k for k in saved["adversarial"] if k.startswith("train_attack/"))
    assert name.startswith("train_attack/fgm_l2_")
    assert saved["settings"]["datagrad"]["form"] == "exact"


@pytest.mark.ddp
def test_ddp_crm_wrm_certified_keeps_ranks_identical(tmp_path):
    """MLP + SN + CRM (LipLT vectors) on WRM examples mixed with clean ones; certified accuracy
    at each validation equals rank 0's on the full split."""
    proc = _fit_ddp(
        tmp_path,
        "--config",
        str(CONFIGS / "digits_crm.yaml"),
        "--config",
        str(CONFIGS / "attack" / "wrm.yaml"),
        "--model.beta=1.0",
        "--model.crm_start_epoch=0",
        "--adversarial.mix=0.5",  # the mixed objective: a second (clean) forward per step
        "--trainer.limit_train_batches=6",
        "--data.val_size=143",  # odd: the ranks take 72 and 71, none counted twice
        f"--data.data_dir={tmp_path}",  # unused for digits: a warning, printed by rank 0 only
    )
    assert proc.stderr.count("is not used: dataset 'digits'") == 1, proc.stderr[-3000:]
    state = _assert_state_identical(tmp_path)
    assert any(k.startswith("_lip_state.u.") for k in state)
    certified = {"val/certified_acc/0.1", "val/certified_acc/0.25"}
    metrics = _assert_metrics_synchronised(
        tmp_path,
        {"train/loss", "train/adv_acc", "train/crm_penalty", "val/loss", "val/acc", *certified},
    )
    saved = _results(tmp_path, proc)
    assert saved["val"]["n"] == 143
    _assert_val_metrics_are_full_split(metrics, saved)
    for eps in ("0.1", "0.25"):
        assert math.isclose(
            metrics[f"val/certified_acc/{eps}"], saved["certified"]["eps"][eps]["val"], abs_tol=1e-6
        )
    assert any(k.startswith("train_attack/wrm_") for k in saved["adversarial"])


@pytest.mark.ddp
def test_ddp_resume_mid_epoch_is_bit_exact_on_both_ranks(tmp_path):
    """Resuming a 2-rank run from batch 3 of 6 repeats each rank's uninterrupted training:
    its shard of the shuffle, augmentation and PGD random starts (Note [exact resume])."""
    common = (
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--trainer.limit_train_batches=6",
        "--data.augment=true",
        "--adversarial.attack.init_args.random_start=true",
        "--robust_eval.every_n_epochs=100",
        "--robust_eval.final_max_examples=64",
    )
    every_3 = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "filename": "mid-{step}"},
    }
    _fit_ddp(tmp_path / "a", *common, callbacks=(every_3,))
    (mid,) = (tmp_path / "a").rglob("mid-step=3.ckpt")
    position = torch.load(mid, weights_only=False)["ImageDataModule"]
    assert position == {"train_pass": 0, "train_batch": 3, "train_batch_size": 32, "train_ranks": 2}
    _fit_ddp(tmp_path / "b", *common, f"--ckpt_path={mid}", callbacks=(every_3,))
    for run in ("a", "b"):
        _assert_state_identical(tmp_path / run)
    for rank in (0, 1):
        straight = torch.load(tmp_path / "a" / f"rank{rank}.pt")
        resumed = torch.load(tmp_path / "b" / f"rank{rank}.pt")
        assert straight.keys() == resumed.keys()
        for key, value in straight.items():
            assert torch.equal(value, resumed[key]), (rank, key)


@pytest.mark.ddp
def test_ddp_fork_keeps_one_run_folder(tmp_path):
    """ddp_fork trains in forked children; results.json lands beside their config.yaml and
    checkpoints (the parent had resolved a fresh version_1 for it)."""
    proc = _fit_ddp(
        tmp_path,
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--trainer.limit_train_batches=4",
        "--robust_eval.every_n_epochs=100",
        "--robust_eval.final_max_examples=32",
        strategy="ddp_fork",
    )
    _assert_state_identical(tmp_path, exits=False)  # forked children leave by os._exit
    saved = _results(tmp_path, proc)
    assert saved["test"]["n"] == 360
    runs = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert runs == ["version_0"]
    run = tmp_path / "lightning_logs" / "version_0"
    assert {"config.yaml", "metrics.csv", "results.json", "checkpoints"} <= {
        p.name for p in run.iterdir()
    }
