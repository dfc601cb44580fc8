"""fit.py under W&B: per-run directories, offline fallback, results in the run summary."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from jsonargparse import Namespace
from lightning.pytorch.loggers import WandbLogger

from sn_lightning import fit
from tests.wandb_helpers import isolate_wandb, offline_run, wandb_final_config, wandb_summary

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
WANDB_LOGGER = "--trainer.logger=lightning.pytorch.loggers.WandbLogger"
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--robust_eval.every_n_epochs=1",
    "--robust_eval.final_max_examples=16",
]


@pytest.fixture(autouse=True)
def _fresh_wandb(monkeypatch, tmp_path):
    """A fresh wandb session per test (it reads the environment once), state in tmp_path."""
    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_PROJECT", "sn-test")
    wandb.teardown()
    yield
    wandb.teardown()


def _fit(root, *extra):
    return fit.main(
        ["--config", QUICKSTART, WANDB_LOGGER, f"--trainer.default_root_dir={root}", *TINY, *extra]
    )


def _warnings(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sn_lightning.fit" and r.levelno == logging.WARNING
    ]


def _check_run(root, results, run_id):
    """results.json, config.yaml in <root>/<project>/<id>/; results in the offline run's summary."""
    path = Path(results["path"])
    assert path == root / "sn-test" / run_id / "results.json"
    saved = yaml.safe_load((path.parent / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["id"] == run_id
    wandb.teardown()  # the wandb service flushes the run's file when it shuts down
    summary = wandb_summary(offline_run(root, run_id))
    on_disk = json.loads(path.read_text())
    assert summary["results/test/acc"] == pytest.approx(on_disk["test"]["acc"])
    assert summary["results/gap"] == pytest.approx(on_disk["gap"])
    adv = on_disk["adversarial"]["pgd20_linf_0.1"]["test"]["acc"]
    assert summary["results/adversarial/pgd20_linf_0.1/test/acc"] == pytest.approx(adv)
    metric = "val/robust_acc/pgd20_linf_0.1"
    assert summary[metric] == pytest.approx(on_disk["metrics"][metric])
    # the run's config: the CLI's keys (as a sweep names them), not only the module's hparams
    config = wandb_final_config(offline_run(root, run_id))
    settings = on_disk["settings"]
    assert config["model.beta"] == settings["model"]["beta"] == config["beta"]
    assert config["seed_everything"] == settings["seed_everything"]
    assert config["trainer.max_epochs"] == settings["trainer"]["max_epochs"]
    attack = settings["adversarial"]["attack"]["init_args"]
    assert config["adversarial.attack.init_args.eps"] == attack["eps"]
    return on_disk


def test_unreachable_wandb_goes_offline_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_MODE")  # online, but no API key anywhere
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    caplog.set_level(logging.WARNING, logger="sn_lightning.fit")
    results = _fit(tmp_path)
    (warning,) = _warnings(caplog)
    assert "\n" not in warning and "W&B unreachable: no W&B API key" in warning
    assert f"offline in {tmp_path}/wandb" in warning
    run_id = Path(results["path"]).parent.name
    assert len(run_id) == 8
    _check_run(tmp_path, results, run_id)
    # main() leaves the environment as it found it
    assert "WANDB_MODE" not in os.environ and "WANDB_RUN_ID" not in os.environ


def test_unreachable_wandb_keeps_log_model(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setattr(fit, "wandb_unreachable_reason", lambda: "no W&B API key")
    for log_model in (True, False):
        monkeypatch.setenv("WANDB_MODE", "online")  # restored after the test
        init_args = Namespace(
            id=None, version=None, save_dir=".", dir=None, offline=False, mode=None,
            log_model=log_model,
        )  # fmt: skip
        fit._prepare_wandb_logger(init_args, str(tmp_path))
        assert init_args.mode == "offline" and os.environ["WANDB_MODE"] == "offline"
        # Lightning refuses log_model with its offline flag; wandb's offline mode keeps artifacts
        assert init_args.log_model is log_model and init_args.offline is not log_model
        assert WandbLogger(**vars(init_args))._log_model is log_model  # Lightning accepts it
        monkeypatch.delenv("WANDB_RUN_ID")


def test_wandb_init_failure_goes_offline(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(fit, "wandb_unreachable_reason", lambda: None)  # looks reachable
    real_init, calls = wandb.init, []

    def failing_init(*args, **kwargs):
        calls.append(os.environ.get("WANDB_MODE"))
        if os.environ.get("WANDB_MODE") != "offline":
            raise wandb.errors.CommError("Timed out while retrying: dial tcp: no such host")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", failing_init)
    caplog.set_level(logging.WARNING, logger="sn_lightning.fit")
    results = _fit(tmp_path)
    assert calls == [None, "offline"]
    (warning,) = _warnings(caplog)
    assert "W&B run could not start (CommError: Timed out while retrying" in warning
    _check_run(tmp_path, results, Path(results["path"]).parent.name)


def test_runs_in_one_directory_each_get_their_own(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_RUN_ID", "agent001")  # as `wandb agent` sets it
    first = _fit(tmp_path)
    _check_run(tmp_path, first, "agent001")
    # the same run id again (a resumed run): config.yaml is saved a second time into one folder
    again = _fit(tmp_path, "--model.lr=0.02")
    assert again["path"] == first["path"]
    config = yaml.safe_load((Path(again["path"]).parent / "config.yaml").read_text())
    assert config["model"]["lr"] == 0.02
    monkeypatch.delenv("WANDB_RUN_ID")
    other = _fit(tmp_path)
    assert Path(other["path"]).parent != Path(first["path"]).parent
    assert Path(other["path"]).parent.parent == tmp_path / "sn-test"
    assert len(list(tmp_path.glob("sn-test/*/results.json"))) == 2


def test_resuming_a_checkpoint_continues_its_wandb_run(monkeypatch, tmp_path):
    """--ckpt_path without WANDB_RUN_ID: the run id the checkpoint was saved under, same folder."""
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = _fit(tmp_path)
    run_dir = Path(first["path"]).parent
    (ckpt,) = run_dir.glob("checkpoints/*.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["wandb_run_id"] == run_dir.name
    resumed = _fit(tmp_path, f"--ckpt_path={ckpt}", "--trainer.max_epochs=2")
    assert resumed["path"] == first["path"]
    assert json.loads(Path(resumed["path"]).read_text())["settings"]["trainer"]["max_epochs"] == 2
    assert len(list(tmp_path.glob("sn-test/*"))) == 1
    wandb.teardown()
    offline = sorted(tmp_path.rglob(f"offline-run-*-{run_dir.name}"))
    assert len(offline) == 2  # the first run and its continuation, one W&B run id


def test_the_resumed_run_id_yields_to_an_explicit_one(monkeypatch, tmp_path):
    saved = tmp_path / "run" / "last.ckpt"
    saved.parent.mkdir()
    torch.save({"state_dict": {}, "wandb_run_id": "saved001"}, saved)
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")  # saved without a W&B logger
    assert fit._resumed_wandb_run(str(saved), None) == "saved001"
    assert fit._resumed_wandb_run(str(tmp_path / "plain.ckpt"), None) is None
    assert fit._resumed_wandb_run("last", str(tmp_path)) == "saved001"  # found under the root
    assert fit._resumed_wandb_run(None, None) is None
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)

    def prepared(env=None, **given):
        if env:
            monkeypatch.setenv("WANDB_RUN_ID", env)
        init_args = Namespace(id=None, version=None, save_dir=".", dir=None, mode="offline")
        init_args.update(Namespace(**given))
        fit._prepare_wandb_logger(init_args, str(tmp_path), resumed="saved001")
        monkeypatch.delenv("WANDB_RUN_ID")
        return init_args.id

    assert prepared() == "saved001"
    assert prepared(env="agent001") == "agent001"
    assert prepared(id="mine0001") == "mine0001"
    assert prepared(version="ver00001") == "ver00001"


def test_run_id_is_shared_with_ddp_ranks():
    """The parent exports the id; a DDP rank re-running argv inherits it (Note [one W&B run ...])."""
    os.environ.pop("WANDB_RUN_ID", None)
    try:
        parent = Namespace(id=None, version=None, save_dir=".", dir=None, offline=False, mode=None)
        fit._prepare_wandb_logger(parent, "runs/x")
        child = Namespace(id=None, version=None, save_dir=".", dir=None, offline=False, mode=None)
        fit._prepare_wandb_logger(child, "runs/x")
        assert parent.id == child.id == os.environ["WANDB_RUN_ID"]
        assert parent.save_dir == child.save_dir == "runs/x"
    finally:
        os.environ.pop("WANDB_RUN_ID", None)


def test_unreachable_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert fit.wandb_unreachable_reason() == (
        "no W&B API key for 127.0.0.1 (set WANDB_API_KEY or run `wandb login`)"
    )
    with socket.socket() as server:  # a reachable "server" with a netrc entry for it
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password " + "k" * 40 + "\n")
        (tmp_path / "netrc").chmod(0o600)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert fit.wandb_unreachable_reason() is None
    reason = fit.wandb_unreachable_reason(timeout=1.0)  # the port is closed now
    assert reason.startswith(f"cannot reach http://127.0.0.1:{port} (ConnectionRefusedError")


@pytest.mark.ddp
def test_ddp_ranks_share_one_wandb_run(tmp_path):
    """2 CPU processes (gloo): one offline W&B run, one run directory, results in its summary."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    argv = [sys.executable, "-m", "sn_lightning.fit", "--config", QUICKSTART, WANDB_LOGGER]
    argv += [f"--trainer.default_root_dir={tmp_path}", *TINY, "--trainer.devices=2"]
    argv += ["--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "sn-test").iterdir() if p.is_dir()]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "results.json",
    ]
    (wandb_file,) = tmp_path.rglob("*.wandb")
    assert wandb_file.name == f"run-{run_dir.name}.wandb"
    results = json.loads((run_dir / "results.json").read_text())
    assert wandb_summary(wandb_file)["results/test/acc"] == pytest.approx(results["test"]["acc"])
