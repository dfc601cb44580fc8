import lightning as L
import pytest
import torch

from sn_lightning.attacks import PGD
from sn_lightning.data import ImageDataModule
from sn_lightning.errors import ConfigError
from sn_lightning.lipschitz import certified_radius
from sn_lightning.lit import SNClassifier


@pytest.fixture(scope="module")
def crm_model(tmp_path_factory):
    torch.manual_seed(0)
    model = SNClassifier(
        backbone="mlp2",
        backbone_kwargs={"width": 64},
        input_shape=(1, 8, 8),
        mean=[0.3053],
        std=[0.376],
        optimizer="adam",
        lr=0.003,
        crm_lambda=2.0,
        crm_r0=0.5,
        crm_start_epoch=1,
        certify_eps=[0.1, 0.3],
    )
    dm = ImageDataModule("digits", batch_size=64)
    trainer = L.Trainer(
        default_root_dir=tmp_path_factory.mktemp("crm"),
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    return model, dm, trainer


def test_crm_trains_and_logs_certified_accuracy(crm_model):
    _, _, trainer = crm_model
    metrics = trainer.callback_metrics
    assert float(metrics["val/acc"]) > 0.8
    low, high = float(metrics["val/certified_acc/0.1"]), float(metrics["val/certified_acc/0.3"])
    assert 0 < high <= low <= float(metrics["val/acc"])  # larger radius, fewer certified points
    assert float(metrics["train/crm_penalty"]) != 0.0


def test_certified_points_resist_pgd_at_their_radius(crm_model):
    model, dm, _ = crm_model
    model.eval()
    L_pair = model.certified_lipschitz()
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        radius = certified_radius(model(x), y, L_pair)
    eps = 0.3
    certified = radius > eps
    assert certified.sum() > 10
    attack = PGD(
        "l2", eps=eps, steps=50, step_size=eps / 10, random_start=True, restarts=3, clip=False
    )
    x_adv = attack(model, x[certified], y[certified])
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), y[certified])
    # the check is not vacuous: some correctly classified points are not certified at eps
    assert (radius > 0).float().mean() > certified.float().mean()


def test_crm_needs_a_liplt_backbone():
    with pytest.raises(ConfigError, match="LipLT-compatible backbone"):
        SNClassifier(backbone="torchvision:resnet18", crm_lambda=1.0)
    for eps in ([0.0], [0.1, float("nan")], [float("inf")]):
        with pytest.raises(ConfigError, match="certify_eps must all be finite and > 0"):
            SNClassifier(certify_eps=eps)
    # [] turned certification off silently; radii that print alike shared one results key
    with pytest.raises(
        ConfigError, match=r"certify_eps \[\] names no radius; .* or null \(no cert"
    ):
        SNClassifier(certify_eps=[])
    with pytest.raises(ConfigError, match=r"gives radius 0.25 more than once"):
        SNClassifier(certify_eps=[0.25, 0.5, 0.25])


def test_logged_certified_accuracy_does_not_change_under_bf16_autocast(crm_model, tmp_path):
    """The margins are taken in float32: bf16 logits (off by up to ~0.1) certified extra points."""
    model, dm, _ = crm_model
    logged, radii = {}, model.hparams.certify_eps
    model.hparams.certify_eps = [round(0.01 * i, 2) for i in range(1, 61)]  # any change shows
    for precision in ("32-true", "bf16-mixed"):
        trainer = L.Trainer(
            default_root_dir=tmp_path,
            accelerator="cpu",
            precision=precision,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
        logged[precision] = {k: v for k, v in metrics.items() if "certified" in k}
    model.hparams.certify_eps = radii
    assert len(logged["32-true"]) == 60 and logged["bf16-mixed"] == logged["32-true"]


def test_certified_accuracy_under_float64_weights(crm_model, tmp_path):
    """64-true feeds float64 batches to float64 weights (a float32 cast of the batch crashed)."""
    import copy

    model, dm, _ = crm_model
    model64 = copy.deepcopy(model)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(model64, datamodule=dm, verbose=False)
    assert 0 < metrics["val/certified_acc/0.1"] <= metrics["val/acc"]


def test_crm_with_spectral_norm_advances_u_once_per_step(tmp_path):
    """The LipLT bound reads the forward's cached weights; a fresh read advanced u a second time."""
    states = {}
    for crm_lambda in (0.0, 1.0):
        torch.manual_seed(0)
        model = SNClassifier(
            backbone="mlp2",
            backbone_kwargs={"width": 32},
            beta=1.0,
            crm_lambda=crm_lambda,
            sn_batch_fold=False,
            sn_refresh_iterations=0,
            sn_bound_every_n_epochs=0,
        )
        trainer = L.Trainer(
            default_root_dir=tmp_path,
            accelerator="cpu",
            max_steps=1,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, datamodule=ImageDataModule("digits", batch_size=64, val_size=0))
        states[crm_lambda] = {k: v for k, v in model.state_dict().items() if k.endswith(".u")}
    assert len(states[0.0]) == 3
    for key, u in states[0.0].items():  # u after one step depends on W and u only, not the loss
        assert torch.equal(states[1.0][key], u), key
