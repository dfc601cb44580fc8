import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from sn_lightning.fit import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def _fit(tmp_path, *extra):
    return main(["--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}", *extra])


def _fit_process(tmp_path, *extra) -> subprocess.CompletedProcess:
    """The quickstart config with ``extra`` flags in a real ``python -m sn_lightning.fit``."""
    command = [sys.executable, "-m", "sn_lightning.fit", "--config", QUICKSTART, *extra]
    command.append(f"--trainer.default_root_dir={tmp_path}")
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_quickstart_config_end_to_end(tmp_path):
    results = _fit(tmp_path, "--trainer.max_epochs=3")
    path = Path(results["path"])
    assert path.name == "results.json" and path.parent.parent.parent == tmp_path
    saved = json.loads(path.read_text())
    assert saved["test"]["acc"] > 0.85 and saved["train"]["n"] == 1293 and saved["test"]["n"] == 360
    assert saved["gap"] == pytest.approx(saved["train"]["acc"] - saved["test"]["acc"])
    assert saved["settings"]["model"]["backbone"] == "sn_lightning:digits_cnn"
    assert saved["settings"]["trainer"]["max_epochs"] == 3
    assert saved["wall_time_s"] > 0
    # quickstart: SN (beta 2) + PGD training; PGD-20 robust evaluation; sound network bound
    adv = saved["adversarial"]
    assert set(adv) == {"train_attack/pgd5_linf_0.1", "pgd20_linf_0.1"}
    for entry in adv.values():
        assert 0 < entry["test"]["acc"] <= saved["test"]["acc"]
        assert entry["gap"] == pytest.approx(entry["train"]["acc"] - entry["test"]["acc"])
    assert saved["settings"]["model"]["beta"] == 2.0
    assert saved["lipschitz_bound"] is not None and saved["lipschitz_bound"] > 0
    # the final numbers reach the default CSV logger too (written after the fit ended)
    rows = (path.parent / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("final/test_acc")]) == pytest.approx(saved["test"]["acc"])
    assert float(last[header.index("final/pgd20_linf_0.1/gap")]) == pytest.approx(
        adv["pgd20_linf_0.1"]["gap"]
    )
    # the training attack under a key that does not depend on its radius (eps grids)
    assert float(last[header.index("final/train_attack/test_acc")]) == pytest.approx(
        adv["train_attack/pgd5_linf_0.1"]["test"]["acc"]
    )


def test_overrides_in_wandb_agent_form_reach_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    results = _fit(
        tmp_path,
        "--trainer.max_epochs=1",
        "--model.lr=0.02",
        "--model.optimizer=adam",
        "--data.batch_size=64",
        "--seed_everything=3",
    )
    settings = results["settings"]
    assert settings["model"]["lr"] == 0.02 and settings["model"]["optimizer"] == "adam"
    assert settings["data"]["batch_size"] == 64 and settings["seed_everything"] == 3
    # the run's seed does not outlive it: a later seed_everything: false run in this process
    # would otherwise be reseeded from seed 3 by ReseedEachBatch
    assert "PL_GLOBAL_SEED" not in os.environ


def test_seed_everything_true_draws_a_seed_and_ddp_ranks_take_the_launchers(tmp_path, monkeypatch):
    """Lightning 2 seeds ``true`` with 0; here it is a random draw, and a DDP rank (launched with
    the first process's PL_GLOBAL_SEED in its environment) takes that seed instead."""
    import sn_lightning.fit as fit

    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--data.train_subset=64"]
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setattr(fit.secrets, "randbelow", lambda n: 12345 if n == 2**32 else -1)
    drawn = _fit(tmp_path / "a", *quick, "--seed_everything=true")
    assert drawn["settings"]["seed_everything"] == 12345
    monkeypatch.setenv("PL_GLOBAL_SEED", "777")
    rank = _fit(tmp_path / "b", *quick, "--seed_everything=true")
    assert rank["settings"]["seed_everything"] == 777


def test_print_config_does_not_train(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, "--model.lr=0.123", "--print_config")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "lr: 0.123" in out and "backbone: sn_lightning:digits_cnn" in out
    assert not list(tmp_path.rglob("results.json"))


def _logged_epochs(results: dict) -> set[str]:
    rows = (Path(results["path"]).parent / "metrics.csv").read_text().splitlines()
    epoch_col = rows[0].split(",").index("epoch")
    return {row.split(",")[epoch_col] for row in rows[1:] if row.split(",")[epoch_col]}


def test_resume_from_checkpoint(tmp_path, caplog):
    save_last = ("--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true")
    first = _fit(tmp_path / "a", "--trainer.max_epochs=1", *save_last)
    ckpts = sorted((tmp_path / "a").rglob("*.ckpt"))
    assert [c.name for c in ckpts] == ["epoch=0-step=40.ckpt", "last.ckpt"]
    second = _fit(tmp_path / "b", "--trainer.max_epochs=2", f"--ckpt_path={ckpts[0]}")
    assert first["test"]["n"] == second["test"]["n"]
    assert "other settings" not in caplog.text
    # another beta from here on: allowed, and said (the bound changes mid-run)
    _fit(tmp_path / "c", "--trainer.max_epochs=2", f"--ckpt_path={ckpts[0]}", "--model.beta=1.5")
    assert (
        f"warning: resuming {ckpts[0]} with other settings than it was trained with: "
        "model.beta 2.0 (this config: 1.5); the run goes on with this config's"
    ) in caplog.text
    assert _logged_epochs(second) == {"1"}  # resumed run trained only the second epoch
    # "last": the newest last.ckpt of the runs under the root (Lightning alone looks in the new
    # run's empty version_1 and starts from scratch)
    third = _fit(tmp_path / "a", "--trainer.max_epochs=2", "--ckpt_path=last")
    assert Path(third["path"]).parent.name == "version_1"
    assert _logged_epochs(third) == {"1"} and third["test"] == second["test"]


def _assert_same_checkpoint(a_path: Path, b_path: Path) -> dict:
    a = torch.load(a_path, map_location="cpu", weights_only=False)
    b = torch.load(b_path, map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["global_step"] == b["global_step"]
    return a


def test_resume_is_bit_exact_at_an_epoch_boundary_and_mid_epoch(tmp_path):
    """Resuming from epoch 0's end, from its batch 20 of 40 (saved before that batch's
    validation, and after it) and from its last batch (saved before the epoch's end) repeats
    the uninterrupted run exactly: shuffle, augmentation in 2 DataLoader workers, PGD's random
    starts (Note [exact resume])."""
    common = (
        "--trainer.max_epochs=2",
        "--trainer.val_check_interval=20",  # validation at batches 20 and 40 of each epoch
        "--data.num_workers=2",
        "--data.augment=true",
        "--adversarial.attack.init_args.random_start=true",
        "--robust_eval.every_n_epochs=100",
        "--robust_eval.final_max_examples=64",  # the final PGD-20 numbers compared, on fewer
        "--trainer.callbacks+=ModelCheckpoint",  # saves after each validation
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks+=ModelCheckpoint",  # saves after a training batch
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.every_n_train_steps=20",
        "--trainer.callbacks.filename=mid-{step}",
    )
    straight = _fit(tmp_path / "a", *common)
    saved = {c.name: c for c in (tmp_path / "a").rglob("*.ckpt")}
    after_val = [f"epoch={k // 40 - (k % 40 == 0)}-step={k}.ckpt" for k in (20, 40, 60, 80)]
    assert sorted(saved) == sorted([*after_val, *(f"mid-step={k}.ckpt" for k in (20, 40, 60, 80))])
    loops = torch.load(saved["mid-step=20.ckpt"], weights_only=False)["loops"]
    # the next batch to train: batch 20 of pass 0 (of 32 examples, on one rank)
    position = {"train_pass": 0, "train_batch": 20, "train_batch_size": 32, "train_ranks": 1}
    assert loops["fit_loop"]["state_dict"]["combined_loader"] == [position]
    for name in ("mid-step=20.ckpt", "epoch=0-step=20.ckpt"):
        assert torch.load(saved[name], weights_only=False)["ImageDataModule"] == position
    final_name = "epoch=1-step=80.ckpt"
    # saved after the last batch's validation, before the epoch's end: the epoch's (empty) rest
    last = torch.load(saved[final_name], weights_only=False)["ImageDataModule"]
    assert last == {**position, "train_pass": 1, "train_batch": 40}
    for start in ("epoch=0-step=40.ckpt", "mid-step=20.ckpt", "epoch=0-step=20.ckpt",
                  "mid-step=40.ckpt"):  # fmt: skip
        run = tmp_path / start.removesuffix(".ckpt")
        resumed = _fit(run, *common, f"--ckpt_path={saved[start]}")
        (end,) = run.rglob(final_name)
        final = _assert_same_checkpoint(saved[final_name], end)
        assert final["global_step"] == 80
        for split in ("train", "test"):
            assert straight[split] == resumed[split], start
        assert straight["lipschitz_bound"] == resumed["lipschitz_bound"]


def test_resume_is_bit_exact_with_crm_and_layerwise_training(tmp_path):
    """The CRM bound's power-iteration vectors and the layerwise perturbations carry over from
    one step to the next; the checkpoint keeps both."""
    common = (
        "--trainer.max_epochs=1",
        "--model.backbone=mlp2",
        "--model.backbone_kwargs={width: 32}",
        "--model.crm_lambda=0.5",
        "--model.crm_start_epoch=0",
        "--layerwise.eps=0.01",
        "--adversarial.attack=null",
        "--robust_eval.attacks=[]",
        "--data.train_subset=320",  # 10 batches
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.every_n_train_steps=5",
        "--trainer.callbacks.filename=mid-{step}",
    )
    _fit(tmp_path / "a", *common)
    saved = {c.name: c for c in (tmp_path / "a").rglob("*.ckpt")}
    checkpoint = torch.load(saved["mid-step=5.ckpt"], weights_only=False)
    assert checkpoint["liplt_u"] and checkpoint["callbacks"]["LayerwiseTraining"]["deltas"]
    _fit(tmp_path / "b", *common, f"--ckpt_path={saved['mid-step=5.ckpt']}")
    (end,) = (tmp_path / "b").rglob("mid-step=10.ckpt")
    _assert_same_checkpoint(saved["mid-step=10.ckpt"], end)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.backbone=timm:resnt18"],
            "unknown backbone 'resnt18' (not a built-in or timm model); did you mean resnet18",
        ),
        (["--data.dataset=cifar"], "unknown dataset 'cifar'; valid choices: digits"),
        (
            ["--data.dataset=mnist", "--data.data_dir=/nonexistent"],
            "/nonexistent for dataset 'mnist' does not exist",
        ),
        (["--model.lr=-0.1"], "lr must be positive, got -0.1"),
        (["--trainer.devices=-3"], "trainer: `devices` selected with `CPUAccelerator` should be"),
        (
            ["--trainer.devices=abc"],
            "should be an int > 0 (given devices='abc'); devices takes a count >= 1, a list of",
        ),
        (
            ["--trainer.devices=0"],
            "devices takes a count >= 1, a list of device indices or auto",
        ),
        pytest.param(
            ["--trainer.accelerator=gpu"],
            "trainer: No supported gpu backend found; valid here: --trainer.accelerator=cpu or auto",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
        ),
        pytest.param(
            ["--trainer.accelerator=tpu"],
            "trainer: Requirement 'torch_xla",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is there"
            ),
        ),
        (["--data.batch_size=0"], "batch_size must be a positive integer, got 0"),
        (
            ["--config", str(ROOT / "configs/regime/datagrad.yaml"), "--adversarial.mix=0.5"],
            "AdversarialTraining and DataGrad both change the training loss; use one of them",
        ),
        (
            ["--model.lrr=0.1"],
            "unrecognized arguments: --model.lrr=0.1; did you mean model.lr? keys under 'model': "
            "backbone, backbone_kwargs, beta,",
        ),
        (["--modell.beta=1"], "did you mean model.beta? keys under 'the top level': adversarial,"),
        (
            ["--trainer.precision=17"],
            "--trainer.precision: invalid value '17'; expected one of 64, 32, 16, ",
        ),
        (
            ["--adversarial.attack=PGD", "--adversarial.attack.init_args.norm=l3"],
            "--adversarial.attack.init_args.norm: invalid value 'l3'; expected one of linf, l2",
        ),
        (
            ["--adversarial.attack.init_args.eps=nan"],
            "--adversarial.attack.init_args.eps: invalid value 'nan'; expected a finite number or "
            "null",
        ),
        (["--model.lr=nan"], "--model.lr: invalid value 'nan'; expected a finite number"),
        (["--model.lr=-inf"], "--model.lr: invalid value '-inf'; expected a finite number"),
        (
            ["--robust_eval.attacks=PGD"],
            "--robust_eval.attacks: invalid value 'PGD'; expected a list of attacks (FGM, PGD, WRM "
            "or full class paths; append one with --robust_eval.attacks+=PGD) or null",
        ),
        (
            ["--model.backbone_kwargs=[1, 2]"],
            "--model.backbone_kwargs: invalid value '[1, 2]'; expected a mapping like "
            "{drop_rate: 0.1} or null",
        ),
        (
            ["--trainer.callbacks+=Foo"],
            "--trainer.callbacks: invalid value 'Foo'; expected a list of callbacks or a callback "
            "class path (e.g. lightning.pytorch.callbacks.EarlyStopping) or null",
        ),
        (["--model.momentum=1.5"], "momentum must be in [0, 1), got 1.5"),
        (["--data.val_size=1.0"], "val_size 1.0 is ambiguous: a fraction must be in (0, 1)"),
        (
            ["--trainer.strategy=foo"],
            "trainer: You selected an invalid strategy name: `strategy='foo'`",
        ),
        (["--model.optimizer=rmsprop"], "rmsprop"),
        (
            ["--trainer.strategy=ddp_spawn", "--trainer.devices=2", "--trainer.accelerator=cpu"],
            "use --trainer.strategy=ddp",
        ),
        (
            [
                "--trainer.strategy=ddp",
                "--trainer.devices=2",
                "--trainer.accelerator=cpu",
                "--trainer.sync_batchnorm=true",
                "--model.backbone=torchvision:resnet18",
            ],
            "trainer.sync_batchnorm true needs GPUs (DistributedDataParallel runs torch's "
            "SyncBatchNorm only on CUDA); use --trainer.sync_batchnorm=false on CPU",
        ),
        # raised in a class's __init__ and wrapped by jsonargparse: named by the class
        (["--adversarial.attack.steps=0"], "PGD: steps must be >= 1, got 0"),
        (["--adversarial.attack.eps=-0.1"], "PGD: eps must be a finite number >= 0, got -0.1"),
        (["--model.sn_power_iterations=0"], "sn_power_iterations must be an integer >= 1, got 0"),
        (["--model.sn_exclude=[nomatch]"], "exclude pattern 'nomatch' matches no"),
        (["--data.num_workers=-1"], "num_workers must be an integer >= 0, got -1"),
        (["--model.backbone=timm:vit_tiny_patch16_224"], "cannot take inputs of shape (1, 8, 8)"),
        (["--trainer.max_epochs=-5"], "trainer: `max_epochs` must be a non-negative integer"),
        (["--ckpt_path=/nonexistent.ckpt"], "ckpt_path '/nonexistent.ckpt' is not a file"),
        (
            ["--adversarial.attack=FOO"],
            "--adversarial.attack: invalid value 'FOO'; expected an attack: FGM, PGD, WRM",
        ),
        (["--model.beta=abc"], "--model.beta: invalid value 'abc'; expected a number or null"),
        (
            ["--adversarial.attack.epss=0.1"],
            "--adversarial.attack: PGD has no option 'epss'; valid: norm, eps, eps_rel, steps,",
        ),
        (
            ["--robust_eval.attacks=[{class_path: PDG, init_args: {eps: 0.1}}]"],
            "--robust_eval.attacks: invalid value 'PDG'; expected an attack: FGM, PGD, WRM",
        ),
        (
            ["--robust_eval.attacks=[{class_path: PGD, init_args: {norm: linf, eps: abc}}]"],
            "--robust_eval.attacks: PGD eps: invalid value 'abc'; expected a number or null",
        ),
        (
            ["--robust_eval.attacks=[{class_path: PGD, init_args: {norm: l3, eps: 0.1}}]"],
            "--robust_eval.attacks: PGD norm: invalid value 'l3'; expected one of linf, l2",
        ),
        (
            ["--adversarial.attack.eps=8"],
            "PGD: linf eps 8 >= 1 covers the whole [0, 1] pixel range; radii are in [0, 1] pixel "
            "units (did you mean 8/255 = 0.03137?)",
        ),
        (["--adversarial.attack.step_size=0"], "PGD: step_size must be a finite number > 0, got 0"),
        (
            ["--data.train_subset=5000"],
            "train_subset 5000 exceeds the 1293 training examples of digits (after the validation "
            "split); use at most 1293, or null (all)",
        ),
        (
            ["--robust_eval.max_batches=-1"],
            "robust_eval max_batches must be >= 1 or null (all), got -1",
        ),
        (
            ["--robust_eval.final_max_examples=0"],
            "robust_eval final_max_examples must be >= 1 or null (all), got 0",
        ),
        # a unique prefix of a key is not that key (argparse would take it silently)
        (
            ["--trainer.max_epoch=3"],
            "unrecognized arguments: --trainer.max_epoch=3; did you mean trainer.max_epochs",
        ),
        (["--adversarial.eps=3"], "unrecognized arguments: --adversarial.eps=3; keys under"),
        (
            ["--model.sn_include=net.0"],
            "--model.sn_include: invalid value 'net.0'; expected a list like ['layer1.*', 'fc'] "
            "or null",
        ),
        (
            ["--data.mean=0.5"],
            "--data.mean: invalid value '0.5'; expected a list of numbers like [0.1, 0.2] or null",
        ),
        (
            ['--model.beta={"net.0": 1.0}'],
            "--model.beta: invalid value \"{'net.0': 1.0}\"; expected a number or null; a "
            "per-layer beta mapping is for apply_spectral_norm",
        ),
        (
            ["--adversarial.attack=null", "--adversarial.attack.eps=0.1"],
            "--adversarial.attack.eps: no class is set for --adversarial.attack; set "
            "--adversarial.attack first to an attack: FGM, PGD, WRM",
        ),
        (["--model.sn_include=[]"], "sn_include [] names no layer; give fnmatch patterns"),
        (
            ["--ckpt_path=last"],
            "ckpt_path 'last': no last.ckpt under ",
        ),
        (
            ["--trainer.precision=16-true"],
            "trainer.precision '16-true' cannot take attacks' input gradients (float16 underflows "
            "them, PAPERS 5.1); use 16-mixed (attacks then run in float32), bf16-mixed",
        ),
        (
            ["--trainer.precision=bf16-true", "--model.certify_eps=[0.1]"],
            "model.certify_eps with trainer.precision 'bf16-true': certificates need float32 "
            "margins, and these weights are half precision; use 32-true, 16-mixed or bf16-mixed",
        ),
        (
            ["--adversarial.attack.norm=l2", "--adversarial.attack.eps=8"],
            "PGD: l2 eps 8 >= 8, the diameter of the [0, 1] box of (1, 8, 8) inputs, covers "
            "every input",
        ),
        # a Lightning callback refusing its arguments: at parse time, and while it is built
        (
            ["--trainer.callbacks+=EarlyStopping"],
            "--trainer.callbacks: EarlyStopping: the following arguments are required: monitor",
        ),
        (
            [
                "--trainer.callbacks+=EarlyStopping",
                "--trainer.callbacks.monitor=val/acc",
                "--trainer.callbacks.mode=maxx",
            ],
            "trainer.callbacks: EarlyStopping: `mode` can be min, max, got maxx",
        ),
        (
            [
                "--trainer.callbacks+=ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=15",
                "--trainer.callbacks.every_n_epochs=1",
            ],
            "trainer.callbacks: ModelCheckpoint: Combination of parameters every_n_train_steps=15, "
            "every_n_epochs=1 and train_time_interval=None should be mutually exclusive.",
        ),
        # a monitor the run does not log at every validation (Lightning fails after an epoch)
        (
            ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/accc"],
            "trainer.callbacks: EarlyStopping monitors 'val/accc', which this run does not log; "
            "it logs train/loss, train/adv_acc, val/loss, val/acc, val/robust_acc/pgd20_linf_0.1, "
            "sn/*",
        ),
        (
            ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=train/acc"],
            "trainer.callbacks: ModelCheckpoint monitors 'train/acc', which this run does not "
            "log; it logs epoch, train/loss, train/adv_acc,",
        ),
        (
            [
                "--trainer.callbacks+=ModelCheckpoint",
                "--trainer.callbacks.monitor=val/robust_acc/pgd20_linf_0.1",
            ],
            "monitors 'val/robust_acc/pgd20_linf_0.1', which is logged every 5 epochs "
            "(robust_eval.every_n_epochs=5), and Lightning fails on a validation without it; set "
            "robust_eval.every_n_epochs=1 or monitor val/acc",
        ),
        (
            [
                "--adversarial.start_epoch=1",
                "--trainer.callbacks+=EarlyStopping",
                "--trainer.callbacks.monitor=train/adv_acc",
            ],
            "EarlyStopping monitors 'train/adv_acc', which is logged only from "
            "adversarial.start_epoch 1",
        ),
        (
            ["--trainer.gradient_clip_val=-1"],
            "trainer.gradient_clip_val must be a finite number >= 0 (0 or null: no clipping), "
            "got -1",
        ),
        (  # keys the data module sets (before: "argument mean_of(data) --> model.mean: ...")
            ["--model.mean=[0.5]"],
            "--model.mean is set from the data module; set --data.mean instead",
        ),
        (
            ["--model.num_classes=5"],
            "--model.num_classes is set from the data module (the dataset's classes; "
            "imagefolder: its class folders); it cannot be given",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, *args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_lightning_subcommand_is_one_line_naming_the_commands(tmp_path, capsys, subcommand):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"python -m sn_lightning.fit: error: python -m sn_lightning.fit takes no subcommand "
        f"({subcommand!r}): it trains, then evaluates the final model and writes results.json; "
        f"run python -m sn_lightning.fit --config ... (without {subcommand!r}), and python -m "
        "sn_lightning.evaluate --config ... --ckpt_path ... to evaluate a checkpoint"
    )


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")),
    reason="tensorboard is installed here",
)
def test_a_logger_whose_package_is_missing_is_one_line(tmp_path, capsys):
    config = tmp_path / "tb.yaml"
    config.write_text(
        "trainer:\n  logger:\n    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
        f"      init_args: {{save_dir: {tmp_path}}}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, "--config", str(config))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if "error:" in x]
    assert line.endswith(
        "error: trainer.logger: TensorBoardLogger: Neither `tensorboard` nor `tensorboardX` is "
        "available. Try `pip install`ing either."
    )


def test_without_a_logger_a_second_run_in_the_same_folder_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")  # an earlier run's
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, "--trainer.logger=false")
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        f"trainer.logger=false writes results.json and config.yaml into "
        f"trainer.default_root_dir {str(tmp_path)!r}, which holds another run's results.json; "
        "set another --trainer.default_root_dir, or keep a logger"
    ) in line
    assert (tmp_path / "results.json").read_text() == "{}"


def test_a_monitor_logged_at_every_validation_is_accepted(tmp_path):
    results = _fit(
        tmp_path,
        "--trainer.max_epochs=2",
        "--robust_eval.every_n_epochs=1",
        "--robust_eval.max_batches=1",
        "--robust_eval.final_max_examples=32",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.monitor=val/robust_acc/pgd20_linf_0.1",
        "--trainer.callbacks.mode=max",
        "--trainer.callbacks.filename=best-{epoch}",
    )
    best = list(Path(results["path"]).parent.glob("checkpoints/best-epoch=*.ckpt"))
    assert len(best) == 1


class LogsMyMetric(Callback):
    """A user's callback that logs a metric of its own."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("my/metric", 1.0)


def test_monitors_of_other_callbacks_metrics_are_accepted(tmp_path, caplog):
    results = _fit(
        tmp_path,
        "--trainer.max_epochs=1",
        "--robust_eval.final_max_examples=32",
        "--trainer.callbacks+=tests.test_fit.LogsMyMetric",
        "--trainer.callbacks+=LearningRateMonitor",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.monitor=lr-SGD",
        "--trainer.callbacks+=EarlyStopping",
        "--trainer.callbacks.monitor=my/metric",
    )
    assert Path(results["path"]).is_file()
    err = caplog.text
    assert "ModelCheckpoint monitors" not in err  # LearningRateMonitor's lr-* are known
    assert (
        "trainer.callbacks: EarlyStopping monitors 'my/metric', which neither the model nor "
        "sn-lightning's callbacks log"
    ) in err and "fine if LogsMyMetric logs it" in err


def test_results_record_the_precision_that_ran():
    from jsonargparse import Namespace
    from lightning.pytorch import Trainer

    from sn_lightning.fit import _key_settings

    config = Namespace(trainer=Namespace(precision="16-mixed", max_epochs=1))
    with pytest.warns(UserWarning, match="bf16-mixed"):  # Lightning: 16-mixed on a CPU
        trainer = Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    settings = _key_settings(config, trainer)
    assert settings["trainer"]["precision"] == "bf16-mixed"
    assert settings["trainer"]["max_epochs"] == 1


def test_no_arguments_print_what_to_pass(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "python -m sn_lightning.fit: error: nothing to run: pass a config, e.g. --config "
        "configs/quickstart.yaml, and keys such as --model.beta=1.0 (--help lists them)"
    )


def test_malformed_yaml_and_unknown_yaml_key(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [1\n")
    with pytest.raises(SystemExit):
        _fit(tmp_path, "--config", str(bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"python -m sn_lightning.fit: error: --config {bad}: malformed YAML at line 3, "
        "column 1: expected ',' or ']', but got '<stream end>'"
    ]
    # a relative path: jsonargparse parses the file from inside its folder, and the name was lost
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.yaml").write_text("model:\n  beta: 2\n  lr: [0.1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        _fit(tmp_path, "--config", "sub/bad.yaml")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "python -m sn_lightning.fit: error: --config sub/bad.yaml: malformed YAML at line 4, "
        "column 1: expected ',' or ']', but got '<stream end>'"
    ]
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    with pytest.raises(SystemExit):
        _fit(tmp_path, f"--config={listed}")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--config {listed}: expected a mapping of keys" in err[0], err
    assert "got a list" in err[0]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  betaa: 1.0\n")
    with pytest.raises(SystemExit):
        _fit(tmp_path, "--config", str(unknown))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'betaa'" in err[0] and "; did you mean model.beta? keys" in err[0]


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (
            "class_path: sn_lightning.attacks.PDG\n    init_args: {eps: 0.1}",
            "--adversarial.attack: invalid value 'sn_lightning.attacks.PDG'; expected an attack: "
            "FGM, PGD, WRM (or a full class path) or null",
        ),
        (
            "class_path: sn_lightning.attacks.PGD\n    init_args: {norm: l3, eps: 0.1}",
            "--adversarial.attack.init_args.norm: invalid value 'l3'; expected one of linf, l2",
        ),
        (  # an init_arg that is itself optional: its own "Expected a NoneType" inside
            "class_path: PGD\n    init_args: {norm: linf, eps: abc}",
            "--adversarial.attack.init_args.eps: invalid value 'abc'; expected a number or null",
        ),
        (
            "class_path: sn_lightning.attacks.FGM\n    init_args: {norm: l2, epss: 0.1}",
            "--adversarial.attack: FGM has no option 'epss'; valid: norm, eps, eps_rel,",
        ),
    ],
)
def test_bad_attack_in_a_yaml_config_is_one_line(tmp_path, capsys, attack, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"adversarial:\n  attack:\n    {attack}\n")
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, "--config", str(config))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_corrupt_data_file_is_one_line_in_a_real_process(tmp_path):
    from tests.data.fixtures import make_idx_dataset

    make_idx_dataset(tmp_path / "d")
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    proc = _fit_process(
        tmp_path,
        "--data.dataset=mnist",
        f"--data.data_dir={tmp_path / 'd'}",
        "--data.batch_size=8",
        "--model.backbone=mlp1",
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "corrupt data file" in proc.stderr and "t10k-images" in proc.stderr


def test_a_truncated_image_read_by_a_worker_is_one_line(tmp_path):
    """A PNG whose header is fine but whose pixels are cut off passes the setup check and fails
    where a DataLoader worker decodes it: one line naming it, exit 2, no PIL traceback."""
    from tests.data.fixtures import make_image_folder

    make_image_folder(tmp_path / "d")
    bad = tmp_path / "d" / "train" / "emu" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])
    proc = _fit_process(
        tmp_path,
        "--data.dataset=imagefolder",
        f"--data.data_dir={tmp_path / 'd'}",
        "--data.image_size=8",
        "--data.batch_size=4",
        "--data.val_size=0",
        "--data.num_workers=1",
        "--model.backbone=mlp1",
        "--trainer.max_epochs=1",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert (
        line
        == f"python -m sn_lightning.fit: error: cannot read image {bad}: OSError (remove or replace the file)"
    )


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
@pytest.mark.parametrize(
    "fragment",
    [
        None,
        *sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").glob("*/*.yaml")),
    ],
)
def test_every_config_parses(config, fragment, capsys):
    extra = ["--config", str(ROOT / "configs" / fragment)] if fragment else []
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(ROOT / "configs" / config), *extra, "--print_config"])
    assert exit_info.value.code == 0
    assert "backbone:" in capsys.readouterr().out


SCHEMES = [
    "attack/fgm_l2.yaml",
    "attack/pgd_l2.yaml",
    "attack/pgd_linf.yaml",
    "attack/wrm.yaml",
    "regime/layerwise.yaml",
    "regime/datagrad.yaml",
]


@pytest.mark.parametrize("fragment", SCHEMES)
def test_each_scheme_fragment_trains_on_digits(tmp_path, fragment):
    results = _fit(
        tmp_path,
        "--config",
        str(ROOT / "configs" / fragment),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--robust_eval.attacks=[]",
        "--model.backbone=torchvision:resnet18"
        if "layerwise" in fragment
        else "--model.backbone=digits_cnn",
    )
    settings = results["settings"]
    if fragment.startswith("attack/"):
        (name,) = [k for k in results["adversarial"] if k.startswith("train_attack/")]
        assert settings["adversarial"]["attack"]["class_path"].split(".")[-1].lower() in name
    elif "layerwise" in fragment:
        assert settings["layerwise"]["eps"] == 0.01
    else:
        assert settings["datagrad"]["lam"] == 0.01
    assert 0.0 <= results["test"]["acc"] <= 1.0


def test_fragment_values_reach_the_attack_from_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _fit(
            tmp_path,
            "--config",
            str(ROOT / "configs/attack/pgd_linf.yaml"),
            "--adversarial.attack.eps=0.03",
            "--adversarial.attack.steps=7",
            "--print_config",
        )
    out = capsys.readouterr().out
    assert "eps: 0.03" in out and "steps: 7" in out


def test_seed_everything_defaults_to_0_without_a_config(capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        main(["--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed_everything"] == 0


def _certified_fit(root, *extra):
    """configs/digits_crm.yaml for one epoch on 64 training digits."""
    config = str(ROOT / "configs" / "digits_crm.yaml")
    return main(
        ["--config", config, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1",
         "--data.train_subset=64", *extra]
    )  # fmt: skip


def test_certified_run_prints_both_bounds_labelled(tmp_path, capsys):
    results = _certified_fit(tmp_path)
    out = capsys.readouterr().out
    product, liplt = results["lipschitz_bound"], results["certified"]["lipschitz_liplt"]
    assert f"Lipschitz bound (l2, sound, product of layer bounds): {product:.4g}" in out
    assert f"LipLT bound (l2, sound, used for the certificates): {liplt:.4g}" in out
    assert 0 < liplt < math.inf and 0 < product < math.inf


def test_a_float64_certified_run_certifies_float64_batches(tmp_path):
    """64-true: the final certificates fed float32 batches to the float64 model (a crash after
    training, no results.json)."""
    results = _certified_fit(tmp_path, "--trainer.precision=64-true")
    assert results["settings"]["trainer"]["precision"] == "64-true"
    accs = results["certified"]["eps"]
    assert list(accs) == ["0.1", "0.25"] and all(
        set(a) == {"train", "val", "test"} for a in accs.values()
    )
    assert all(0.0 <= v <= 1.0 for a in accs.values() for v in a.values())
    assert all(accs["0.25"][s] <= accs["0.1"][s] for s in accs["0.1"])  # larger radius, fewer
    assert json.loads(Path(results["path"]).read_text())["certified"]["eps"] == accs


def _implicit_context() -> None:
    from sn_lightning.errors import ConfigError

    try:
        raise ConfigError("files missing; pass --data.download=true")
    except ConfigError:
        raise RuntimeError("download failed: no network")  # noqa: B904


def test_only_wrapped_config_errors_become_one_line():
    from sn_lightning.errors import ConfigError
    from sn_lightning.fit import config_error_in

    # an error raised while handling a ConfigError is its own error: it keeps its traceback
    with pytest.raises(RuntimeError) as info:
        _implicit_context()
    assert isinstance(info.value.__context__, ConfigError)
    assert config_error_in(info.value) is None
    wrapped = ValueError("Does not validate: class_path='sn_lightning.attacks.PGD'")
    wrapped.__cause__ = ConfigError("steps must be >= 1, got 0")  # jsonargparse's `from`
    assert str(config_error_in(wrapped)) == "PGD: steps must be >= 1, got 0"
    # a DataLoader worker re-raises with its traceback in the message: the last line's message
    # is kept, for ConfigError's subclasses too
    from torch._utils import ExceptionWrapper

    from sn_lightning.errors import MissingDataError

    for error in (ConfigError, MissingDataError):
        try:
            raise error("cannot read image /d/a.png: OSError (remove or replace the file)")
        except error:
            worker = ExceptionWrapper(where="in DataLoader worker process 0")
        with pytest.raises(error) as info:
            worker.reraise()
        assert "Original Traceback" in str(info.value)
        assert str(config_error_in(info.value)) == (
            "cannot read image /d/a.png: OSError (remove or replace the file)"
        )


def test_quiet_lightning_drops_only_the_known_noise(caplog):
    import logging
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from sn_lightning.fit import quiet_lightning

    tip = "\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing litlogger"
    noise = [
        "Starting from v1.9.0, `tensorboardX` has been removed as a dependency",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
        "Total length of `list` across ranks is zero. Please make sure this was your intention.",
    ]
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_lightning():
            rank_zero_info(tip)
            rank_zero_info("GPU available: False, used: False")
            for message in noise:
                warnings.warn(message, FutureWarning, stacklevel=1)
            warnings.warn("a warning about this run", UserWarning, stacklevel=1)
        rank_zero_info(tip)  # outside the context: kept again
        warnings.warn(noise[0], UserWarning, stacklevel=1)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["GPU available: False, used: False", tip]
    assert [str(w.message) for w in seen] == ["a warning about this run", noise[0]]


def test_a_run_prints_no_lightning_advertisements(tmp_path):
    proc = _fit_process(
        tmp_path,
        "--trainer.max_epochs=1",
        "--data.train_subset=64",
        "--model.beta=null",  # two config warnings: options of features that are off
        "--model.sn_power_iterations=3",
        "--adversarial.attack=null",
        "--adversarial.mix=0.5",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for noise in ("Tip:", "litlogger", "litmodels", "tensorboardX", "LeafSpec"):
        assert noise not in output
    assert "GPU available: False" in output and "results: " in output
    assert output.count("Seed set to 0") == 1  # held while the CLI is checked, then printed once
    # config warnings are raised inside jsonargparse and Lightning: named by the program instead
    assert [line for line in proc.stderr.splitlines() if "no effect" in line] == [
        "python -m sn_lightning.fit: warning: model.beta is null (no spectral normalization), "
        "so sn_power_iterations has no effect",
        "python -m sn_lightning.fit: warning: adversarial.attack is null (clean training), so "
        "mix, start_epoch and eps_warmup_epochs have no effect",
    ]


BAD_VALUE_CASES = [
    ("sn_lightning.fit", ["--trainer.devices=-3"], "trainer: `devices` selected with"),
    (
        "sn_lightning.fit",
        ["--trainer.logger=Wandb"],
        "--trainer.logger: invalid value 'Wandb'; expected a logger class (WandbLogger, CSVLogger",
    ),
    ("sn_lightning.fit", ["--ckpt_path=/nonexistent.ckpt"], "is not a file"),
    ("sn_lightning.evaluate", ["--ckpt_path=/nonexistent.ckpt"], "does not exist"),
    (
        "sn_lightning.fit",
        ["--data.batch_size=2000"],
        "batch_size 2000 exceeds the 1293 training examples (drop_last); use at most 1293",
    ),
    (
        "sn_lightning.fit",
        ["--ckpt_path={tmp}/garbage.ckpt"],
        "garbage.ckpt' is not a checkpoint that torch.load reads as Lightning loads it "
        "(weights-only unpickler: Unsupported operand",
    ),
    (
        "sn_lightning.fit",
        ["--ckpt_path={tmp}/split.ckpt", "--data.seed=5", "--data.val_size=0.3"],
        "the checkpoint was trained with another split: data.seed 0 (this run: 5), data.val_size "
        "0.1 (this run: 0.3); a resumed run would mix training and held-out images (resume with "
        "the training run's config.yaml)",
    ),
    (
        "sn_lightning.fit",
        ["--ckpt_path={tmp}/metrics.csv"],
        "metrics.csv' is not a checkpoint that torch.load reads as Lightning loads it (not a file "
        "torch.save writes)",
    ),
    (
        "sn_lightning.fit",
        ["--ckpt_path={tmp}/mid.ckpt", "--data.batch_size=16"],
        "the checkpoint resumes mid-epoch at training batch 20 of batch_size 32 on 1 rank(s); "
        "this run has batch_size 16 on 1",
    ),
    (
        "sn_lightning.fit",
        ["--ckpt_path={tmp}/other.ckpt"],
        "other.ckpt does not fit the model built from this config (resume with the training "
        "run's config.yaml): ",
    ),
    ("sn_lightning.fit", ["--ckpt_path=best"], "ckpt_path 'best' names the best checkpoint"),
    (
        "sn_lightning.fit",
        ["--model.backbone=sn_lightning:mini_alexnet", "--model.backbone_kwargs={act: foo}"],
        "mini_alexnet act 'foo' is not one of relu, elu",
    ),
    (
        "sn_lightning.fit",
        ["--seed_everything=-1"],
        "seed_everything -1 is out of range; valid: an int in [0, 4294967295], true",
    ),
    # settings checked against the model (the callbacks' check_config; the l2 radius, a
    # relative one and a run that trains nothing: in-process below)
    (
        "sn_lightning.fit",
        ["--layerwise.eps=0.01", '--layerwise.layers=["nomatch"]'],
        "layer pattern 'nomatch' matches no module; names: normalize, net, net.0",
    ),
    (
        "sn_lightning.evaluate",
        ["--ckpt_path={tmp}/garbage.ckpt"],
        "garbage.ckpt is not a checkpoint torch.load can read",
    ),
]


@pytest.mark.parametrize(("module", "args", "message"), BAD_VALUE_CASES)
def test_a_bad_value_found_after_the_trainer_is_built_prints_its_line_alone(
    bad_value_runs, module, args, message
):
    """Lightning's "Seed set to 0" and "GPU available" lines are dropped when the run stops;
    the data checks (batch size, a checkpoint's file and its mid-epoch position) run first."""
    code, output = bad_value_runs[(module, tuple(args))]
    assert code == 2
    (line,) = output.strip().splitlines()
    assert line.startswith(f"python -m {module}: error: ") and message in line


# A run that trains: the harness must show the start-up lines the bad values above drop.
CONTROL_RUN = (
    "--trainer.max_epochs=1",
    "--data.train_subset=64",
    "--robust_eval.attacks=[]",
    "--trainer.default_root_dir={tmp}/control",
)


def test_the_forked_runs_show_what_a_run_prints(bad_value_runs):
    code, output = bad_value_runs[("sn_lightning.fit", CONTROL_RUN)]
    assert code == 0, output
    assert "Seed set to 0" in output and "GPU available: False" in output  # Lightning's logging
    assert "results: " in output  # and the CLI's own lines


@pytest.fixture(scope="module")
def bad_value_runs(tmp_path_factory) -> dict[tuple[str, tuple[str, ...]], tuple[int, str]]:
    """Every command line above, each in its own process forked from one that imported the CLIs
    (tests/forked_cli.py: the output of a real run, for one interpreter start)."""
    tmp = tmp_path_factory.mktemp("bad_values")
    (tmp / "garbage.ckpt").write_text("not a checkpoint")
    (tmp / "metrics.csv").write_text("epoch,step,train/loss\n0,9,2.3\n")  # a run's log, not a ckpt
    position = {"train_pass": 0, "train_batch": 20, "train_batch_size": 32, "train_ranks": 1}
    torch.save({"ImageDataModule": position}, tmp / "mid.ckpt")
    split = {"dataset": "digits", "seed": 0, "val_size": 0.1, "val_source": "train"}
    torch.save({"datamodule_hyper_parameters": split}, tmp / "split.ckpt")
    torch.save({"state_dict": {"net.fc.weight": torch.zeros(3, 3)}}, tmp / "other.ckpt")
    keys = [(module, tuple(args)) for module, args, _ in BAD_VALUE_CASES]
    keys.append(("sn_lightning.fit", CONTROL_RUN))
    cases = [
        [module, ["--config", QUICKSTART, *(a.replace("{tmp}", str(tmp)) for a in args)]]
        for module, args in keys
    ]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "forked_cli.py")],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    results = json.loads(proc.stdout)
    assert len(results) == len(keys), results[0]  # an "import" entry: importing printed
    return {key: (r["code"], r["output"]) for key, r in zip(keys, results, strict=True)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.max_epochs=0"], "trainer.max_epochs 0 trains nothing"),
        (["--trainer.limit_train_batches=0"], "trainer.limit_train_batches 0 trains nothing"),
        (["--trainer.max_steps=0"], "trainer.max_steps 0 trains nothing"),
        (["--trainer.accumulate_grad_batches=0"], "accumulate_grad_batches 0: give a count >= 1"),
        (["--trainer.accumulate_grad_batches=-1"], "accumulate_grad_batches -1: give a count"),
        (["--trainer.check_val_every_n_epoch=0"], "check_val_every_n_epoch 0: give a count"),
        (["--trainer.val_check_interval=0"], "val_check_interval 0: give a fraction in (0, 1]"),
        (["--trainer.max_epochs=-1"], "model.lr_schedule cosine decays over the whole run"),
        (
            ["--trainer.max_epochs=null", "--trainer.max_time=00:00:01:00"],
            "this run has no end",
        ),
        (
            ["--adversarial.attack.eps=null", "--adversarial.attack.eps_rel=50"],
            "linf eps eps_rel 50 x mean input norm 3.864 = 193.198 >= 1",
        ),
        (
            [
                "--robust_eval.attacks+=FGM",
                "--robust_eval.attacks.norm=l2",
                "--robust_eval.attacks.eps=20",
            ],
            "FGM: l2 eps 20 >= 8, the diameter",
        ),
    ],
)
def test_a_run_that_cannot_train_as_asked_stops_before_it_starts(tmp_path, capsys, args, message):
    """Checked in check_run, before the trainer writes anything (no run directory)."""
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error:") == 1 and message in err
    assert not (tmp_path / "lightning_logs").exists()


def test_robust_eval_without_a_validation_split_warns(tmp_path, caplog):
    results = _fit(
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--data.val_size=0",
        "--robust_eval.final_max_examples=40",
    )
    assert caplog.text.count("robust_eval reports no per-epoch numbers") == 1  # once, not per check
    assert results["adversarial"]["pgd20_linf_0.1"]["test"]["n"] == 40  # the final one ran


@pytest.mark.parametrize("module", ["sn_lightning.fit", "sn_lightning.evaluate"])
def test_help_describes_the_command(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    words = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert "Lightning Trainer command line tool" not in words
    assert importlib.import_module(module).DESCRIPTION in words
    meaning = "checkpoint to resume from" if module.endswith("fit") else "checkpoint to evaluate"
    assert f"--ckpt_path CKPT_PATH {meaning}" in words
    # the linked keys name where they come from (they showed as "<lambda>(data)")
    assert "<lambda>" not in words
    assert "num_classes_of(data) --> model.num_classes [applied on instantiate]" in words


def test_batch_limits_keep_integers_as_counts(tmp_path, capsys):
    """``limit_train_batches=1`` is one batch; Lightning's ``float | int`` would make it 100 %."""
    with pytest.raises(SystemExit) as exit_info:
        _fit(
            tmp_path,
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=0.5",
            "--trainer.limit_test_batches=3",
            "--print_config",
        )
    assert exit_info.value.code == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["limit_train_batches"] == 1 and isinstance(trainer["limit_train_batches"], int)
    assert trainer["limit_val_batches"] == 0.5
    assert trainer["limit_test_batches"] == 3 and isinstance(trainer["limit_test_batches"], int)


def test_warnings_print_on_one_line_inside_the_cli():
    """Python echoes a warning's source line; for a config warning that is jsonargparse's code."""
    import warnings

    from sn_lightning import ConfigWarning
    from sn_lightning.fit import quiet_lightning

    before = warnings.formatwarning
    with quiet_lightning("python -m sn_lightning.evaluate"):
        text = warnings.formatwarning("mix has no effect", UserWarning, "x.py", 3, "return cls()")
        config = warnings.formatwarning("mix has no effect", ConfigWarning, "x.py", 3, "cls()")
    assert text == "x.py:3: UserWarning: mix has no effect\n"
    # a config warning's place is jsonargparse's or Lightning's: named by the program instead
    assert config == "python -m sn_lightning.evaluate: warning: mix has no effect\n"
    assert warnings.formatwarning is before


def test_a_network_without_a_sound_bound_says_so(tmp_path, capsys):
    """The summary printed no Lipschitz line at all where no sound bound exists (the reason was
    only in results.json); now it says none, and why."""
    results = _fit(
        tmp_path,
        "--trainer.max_epochs=1",
        "--data.train_subset=64",
        "--model.backbone=sn_lightning:mini_alexnet",  # LocalResponseNorm: no rule
        "--robust_eval.attacks=[]",
        "--adversarial.attack=null",
    )
    reason = results["spectral"]["reason"]
    assert results["lipschitz_bound"] is None and "LocalResponseNorm" in reason
    out = capsys.readouterr().out
    assert f"Lipschitz bound: none, no sound bound for this network ({reason})\n" in out
