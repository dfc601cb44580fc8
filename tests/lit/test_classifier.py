import lightning as L
import pytest
import torch

from sn_lightning.data import ImageDataModule
from sn_lightning.errors import ConfigError
from sn_lightning.lit import SNClassifier


def _trainer(tmp_path, **kw):
    kw = {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1, **kw}
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


@pytest.mark.parametrize(
    ("optimizer", "cls"),
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
@pytest.mark.parametrize("schedule", ["cosine", "step", "none"])
def test_optimizer_and_schedule(tmp_path, optimizer, cls, schedule):
    model = SNClassifier(optimizer=optimizer, lr=0.01, lr_schedule=schedule, weight_decay=1e-4)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=64))
    opt = trainer.optimizers[0]
    assert isinstance(opt, cls) and opt.param_groups[0]["weight_decay"] == 1e-4
    lr = opt.param_groups[0]["lr"]
    if schedule == "cosine":  # 6 of 6 steps done: lr annealed to 0
        assert lr == pytest.approx(0.0, abs=1e-9)
    else:
        assert lr == pytest.approx(0.01)


def test_step_schedule_decays(tmp_path):
    model = SNClassifier(lr=0.1, lr_schedule="step", lr_step_epochs=1, lr_gamma=0.5)
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=64))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_training_learns_and_logs_metrics(tmp_path):
    model = SNClassifier(lr=0.05)
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=None)
    trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=32))
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/acc", "val/loss"} <= set(metrics)
    assert float(metrics["val/acc"]) > 0.85


def test_checkpoint_roundtrip(tmp_path):
    model = SNClassifier(lr=0.05)
    trainer = _trainer(tmp_path, enable_checkpointing=True)
    dm = ImageDataModule("digits", batch_size=64)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = SNClassifier.load_from_checkpoint(path)
    x = torch.rand(5, 1, 8, 8)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert loaded.hparams.backbone == "sn_lightning:digits_cnn"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr must be positive, got 0.0"),
        ({"lr": -1.0}, "lr must be positive, got -1.0"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; valid choices: sgd, adam, adamw"),
        ({"lr_schedule": "poly"}, "unknown lr_schedule 'poly'; valid choices: cosine, step, none"),
        ({"beta": 0.0}, "beta must be positive or null"),
        ({"backbone": "timm:nope_net"}, "unknown timm backbone 'nope_net'"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SNClassifier(**kwargs)
