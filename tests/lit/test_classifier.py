import math

import lightning as L
import pytest
import torch
from torch import nn

from sn_lightning.data import ImageDataModule
from sn_lightning.errors import ConfigError, ConfigWarning
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


def test_resuming_with_more_epochs_replans_the_cosine_schedule(tmp_path):
    # A 2-epoch run resumed to 4 epochs: the restored T_max (6 steps) would make the learning
    # rate climb again after step 6; it must follow the cosine over 12 steps to 0 instead.
    class Lr(L.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, *args):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    dm = ImageDataModule("digits", batch_size=64)
    first = _trainer(tmp_path / "a", max_epochs=2)
    first.fit(SNClassifier(lr=0.1), datamodule=dm)
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)
    record = Lr()
    second = _trainer(tmp_path / "b", max_epochs=4, callbacks=[record])
    second.fit(SNClassifier(lr=0.1), datamodule=dm, ckpt_path=ckpt)
    expected = [0.1 * (1 + math.cos(math.pi * t / 12)) / 2 for t in range(6, 12)]
    assert record.lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr must be positive, got 0.0"),
        ({"lr": -1.0}, "lr must be positive, got -1.0"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; valid choices: sgd, adam, adamw"),
        ({"lr_schedule": "poly"}, "unknown lr_schedule 'poly'; valid choices: cosine, step, none"),
        ({"beta": 0.0}, "beta must be positive or null"),
        (
            {"backbone": "timm:nope_net"},
            r"unknown backbone 'nope_net' \(not a built-in or timm model\)",
        ),
        ({"weight_decay": float("nan")}, "weight_decay must be >= 0 and finite, got nan"),
        ({"crm_r0": float("nan")}, r"crm_r0 must be > 0 and finite, got nan"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\), got 1.5"),
        ({"lr_gamma": 0.0}, r"lr_gamma must be in \(0, 1\], got 0.0"),
        ({"sn_power_iterations": 0}, "sn_power_iterations must be an integer >= 1, got 0"),
        ({"sn_init_iterations": -5}, "sn_init_iterations must be an integer >= 0, got -5"),
        ({"sn_refresh_iterations": 1.5}, "sn_refresh_iterations must be an integer >= 0, got 1.5"),
        (
            {"sn_bound_every_n_epochs": -1},
            "sn_bound_every_n_epochs must be an integer >= 0, got -1",
        ),
        (
            {"backbone": "sn_lightning:mlp1", "backbone_kwargs": {"width": -5}},
            r"backbone 'sn_lightning:mlp1' \(backbone_kwargs \{'width': -5\}\) cannot be built",
        ),
        (  # a 5x5 kernel (elu_net) on 2x2 inputs
            {"backbone": "sn_lightning:elu_net", "input_shape": (1, 2, 2)},
            r"backbone 'sn_lightning:elu_net' .* for inputs of shape \(1, 2, 2\): .*Kernel size",
        ),
        (
            {"backbone": "torchvision:resnet18", "input_shape": (3, 8, 8), "backbone_kwargs": {}},
            None,
        ),
    ],
)
def test_bad_input(kwargs, match):
    if match is None:  # a valid combination: builds without error
        assert SNClassifier(**kwargs).model.eval()(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
        return
    with pytest.raises(ConfigError, match=match):
        SNClassifier(**kwargs)


def test_beta_bounds_every_layer_and_logs_sigma(tmp_path):
    from sn_lightning.spectral import normalized_layers, operator_norm

    model = SNClassifier(beta=1.0, lr=0.05, sn_init_iterations=100)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=10)
    trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=32))
    layers = normalized_layers(model.model)
    assert len(layers) == 4  # 2 convs + 2 linears of digits_cnn
    metrics = trainer.callback_metrics
    raw = {name: float(metrics[f"sn/{name}/sigma_raw"]) for name in layers}
    for name in layers:  # the layer in use is within beta
        assert float(metrics[f"sn/{name}/sigma"]) == pytest.approx(min(raw[name], 1.0), rel=1e-6)
    assert max(raw.values()) > 1.0, raw  # lr 0.05 pushes raw weights past beta: the bound binds
    assert float(metrics["sn/lipschitz_bound"]) > 0
    shapes = {"net.0": (1, 8, 8), "net.2": (32, 8, 8)}
    for name, (layer, _) in layers.items():
        true = operator_norm(layer, shapes.get(name), n_iter=500)  # the normalized weight
        assert true <= 1.0 * (1 + 1e-2), (name, true)


@pytest.mark.parametrize(
    ("every", "trainer_kw", "logged_at"),
    [
        (1, {"max_epochs": 3}, [1, 2, 3]),
        (2, {"max_epochs": 5}, [2, 4, 5]),  # and after the last epoch
        (2, {"max_epochs": 5, "max_steps": 9}, [2, 3]),  # the run ends in epoch 3 (3 steps each)
        (0, {"max_epochs": 3}, []),
    ],
)
def test_network_bound_cadence(tmp_path, every, trainer_kw, logged_at):
    """``sn_bound_every_n_epochs`` decides which epoch ends compute and log ``sn/lipschitz_bound``;
    the per-layer sigmas are logged at every epoch end regardless."""
    model = SNClassifier(beta=1.0, sn_bound_every_n_epochs=every)
    logged: dict[str, list[int]] = {}
    log = model.log

    def recorded(name, value, *args, **kwargs):
        if name.startswith("sn/"):
            logged.setdefault(name, []).append(model.current_epoch + 1)
        return log(name, value, *args, **kwargs)

    model.log = recorded
    trainer = _trainer(tmp_path, **trainer_kw)
    trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=32))
    epochs = list(range(1, trainer.current_epoch + 1))
    sigmas = [k for k in logged if k.endswith("/sigma")]
    assert len(sigmas) == 4 and all(logged[k] == epochs for k in sigmas)  # digits_cnn's layers
    assert logged.get("sn/lipschitz_bound", []) == logged_at


def test_refresh_keeps_the_trained_model_within_beta(tmp_path):
    """Adam at lr 0.01 moves the weights faster than one power iteration a step follows: without
    the refresh the trained model's layers end above beta; with it, the last checkpoint and the
    model after fit hold the same converged u and every layer is within beta (dense oracle)."""
    from sn_lightning.spectral import normalized_layers, operator_norm

    shapes = {"net.0": (1, 8, 8), "net.2": (32, 8, 8)}
    worst = {}
    for refresh in (0, 300):
        torch.manual_seed(0)
        model = SNClassifier(
            beta=1.0, optimizer="adam", lr=0.01, lr_schedule="none", sn_refresh_iterations=refresh
        )
        trainer = _trainer(
            tmp_path / str(refresh), limit_train_batches=20, enable_checkpointing=True
        )
        trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=32))
        model.eval()
        layers = normalized_layers(model.model)
        worst[refresh] = max(
            operator_norm(layer, shapes.get(name), n_iter=1000)
            for name, (layer, _) in layers.items()
        )
        saved = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
        for key, value in model.state_dict().items():
            if key.endswith(".u"):
                assert torch.equal(saved["state_dict"][key], value), key
    assert worst[0] > 1.03, worst  # the lag
    assert worst[300] <= 1.0 + 2e-3, worst


def test_refresh_runs_only_while_fitting_and_before_mid_epoch_checkpoints(tmp_path):
    """The sanity check and ``trainer.validate`` leave u alone; a step-interval checkpoint holds a
    refreshed u; a checkpoint from before the refresh existed loads with the paper's schedule."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from sn_lightning.spectral import normalized_layers, operator_norm

    def us(module):
        return {k: v.clone() for k, v in module.state_dict().items() if k.endswith(".u")}

    class AtTrainStart(Callback):
        def on_fit_start(self, trainer, module):
            self.fit_start = us(module)

        def on_train_start(self, trainer, module):
            self.train_start = us(module)

    torch.manual_seed(0)
    model = SNClassifier(beta=1.0, optimizer="adam", lr=0.01, lr_schedule="none")
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=15, save_top_k=-1)
    snap = AtTrainStart()
    trainer = _trainer(tmp_path, limit_train_batches=20, callbacks=[steps, snap])
    trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=32))
    assert all(torch.equal(snap.fit_start[k], v) for k, v in snap.train_start.items())

    path = tmp_path / "steps" / "epoch=0-step=15.ckpt"
    mid = SNClassifier.load_from_checkpoint(path).eval()
    shapes = {"net.0": (1, 8, 8), "net.2": (32, 8, 8)}
    for name, (layer, _) in normalized_layers(mid.model).items():
        assert operator_norm(layer, shapes.get(name), n_iter=1000) <= 1.0 + 2e-2, name
    assert torch.load(path, weights_only=False)["sn_refreshed_at"] == 15

    before = us(model)
    trainer.validate(model, datamodule=ImageDataModule("digits", batch_size=32), verbose=False)
    assert all(torch.equal(before[k], v) for k, v in us(model).items())

    old = torch.load(path, weights_only=False)  # as written before sn_refresh_iterations
    del old["hyper_parameters"]["sn_refresh_iterations"], old["sn_refreshed_at"]
    torch.save(old, tmp_path / "old.ckpt")
    assert (
        SNClassifier.load_from_checkpoint(tmp_path / "old.ckpt").hparams.sn_refresh_iterations == 0
    )


def test_no_beta_means_no_parametrization():
    from torch.nn.utils import parametrize

    model = SNClassifier(beta=None)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_checkpoint_and_export_with_spectral_norm(tmp_path):
    from sn_lightning.models import create_backbone
    from sn_lightning.spectral import plain_state_dict

    model = SNClassifier(beta=1.5, lr=0.05)
    trainer = _trainer(tmp_path, enable_checkpointing=True, max_epochs=1, limit_train_batches=5)
    trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=32))
    path = tmp_path / "sn.ckpt"
    trainer.save_checkpoint(path)
    loaded = SNClassifier.load_from_checkpoint(path)
    x = torch.rand(6, 1, 8, 8)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))
    u_keys = [k for k in model.state_dict() if "parametrizations" in k and "original" not in k]
    assert u_keys
    for k in u_keys:
        assert torch.equal(model.state_dict()[k], loaded.state_dict()[k])
    plain = create_backbone(
        "sn_lightning:digits_cnn",
        num_classes=10,
        in_chans=1,
        input_size=(8, 8),
        mean=model.hparams.mean,
        std=model.hparams.std,
    )
    plain.load_state_dict(plain_state_dict(model.model), strict=True)
    plain.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flag", [True, False])
def test_sn_cuda_graph_and_batch_fold_keys_reach_every_normalized_layer(flag):
    from sn_lightning.spectral import BoundedSpectralNorm

    model = SNClassifier(beta=1.0, sn_cuda_graph=flag, sn_batch_fold=not flag)
    norms = [m for m in model.modules() if isinstance(m, BoundedSpectralNorm)]
    assert norms and all(p.cuda_graph is flag and p.batch_fold is not flag for p in norms)
    assert model.hparams.sn_cuda_graph is flag and model.hparams.sn_batch_fold is not flag


def test_backbone_that_cannot_take_the_data_fails_before_training():
    from torch import nn

    from sn_lightning.lit.classifier import _check_backbone

    with pytest.raises(ConfigError, match=r"cannot take inputs of shape \(1, 8, 8\).*224"):
        SNClassifier(backbone="timm:vit_tiny_patch16_224", input_shape=(1, 8, 8))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.BatchNorm1d(7))
    with pytest.raises(ConfigError, match=r"to \(2, 7\), expected logits of shape \(2, 10\)"):
        _check_backbone(net, "custom", (1, 8, 8), 10)
    assert net.training and net[2].num_batches_tracked == 0  # mode restored, no stats touched
    _check_backbone(net, "custom", (1, 8, 8), 7)


def test_sn_options_without_beta_warn_and_empty_include_is_refused():
    with pytest.warns(ConfigWarning, match=r"model.beta is null .*sn_method, sn_include have no"):
        SNClassifier(beta=None, sn_method="matrix", sn_include=["net.*"])
    with pytest.warns(ConfigWarning, match=r"model.beta is null .*, so sn_method has no effect"):
        SNClassifier(beta=None, sn_method="matrix")
    with pytest.raises(ConfigError, match=r"sn_include \[\] names no layer"):
        SNClassifier(beta=1.0, sn_include=[])
    model = SNClassifier(beta=1.0, sn_include=None)  # null: every Conv/Linear layer
    assert all(hasattr(m, "parametrizations") for m in model.modules() if isinstance(m, nn.Linear))


def test_crm_that_never_starts_warns(tmp_path):
    model = SNClassifier(backbone="mlp2", crm_lambda=1.0, crm_start_epoch=2)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=0)
    with pytest.warns(ConfigWarning, match=r"crm_start_epoch 2 >= trainer\.max_epochs 2: this run"):
        trainer.fit(model, datamodule=ImageDataModule("digits"))


def test_sync_batchnorm_swaps_in_the_plugin_that_keeps_bounds_and_timm_activations(tmp_path):
    from lightning.pytorch.plugins import TorchSyncBatchNorm
    from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct

    from sn_lightning.lit import SyncBatchNormKeepingBounds
    from sn_lightning.spectral import BoundedBatchNormScale, normalized_layers

    model = SNClassifier(
        backbone="timm:regnetx_002", input_shape=(1, 16, 16), beta=1.0, sn_batchnorm="bound"
    )
    trainer = _trainer(tmp_path, strategy="ddp", devices=1, sync_batchnorm=True)
    assert type(trainer.strategy._layer_sync) is TorchSyncBatchNorm  # Lightning's own
    model.trainer = trainer
    model.setup("fit")  # before the strategy applies the plugin (Trainer._run)
    plugin = trainer.strategy._layer_sync
    assert isinstance(plugin, SyncBatchNormKeepingBounds)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bounded = {
        n for n, (_, p) in normalized_layers(model).items() if isinstance(p, BoundedBatchNormScale)
    }
    assert len(bounded) == len(norms) > 0
    x = torch.randn(2, 1, 16, 16)
    model.eval()
    expected = model(x)
    assert plugin.apply(model) is model  # Lightning's own raises a TypeError here
    assert all(isinstance(m, SyncBatchNormAct) for m in norms)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # activations kept
    assert {
        n for n, (_, p) in normalized_layers(model).items() if isinstance(p, BoundedBatchNormScale)
    } == bounded
    plugin.revert(model)
    assert all(isinstance(m, BatchNormAct2d) and not isinstance(m, nn.SyncBatchNorm) for m in norms)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # A user's own plugin is left alone, and this one is accepted with sync_batchnorm=True.
    own = _trainer(tmp_path, plugins=[SyncBatchNormKeepingBounds()], sync_batchnorm=True)
    assert isinstance(own._accelerator_connector._layer_sync, SyncBatchNormKeepingBounds)
