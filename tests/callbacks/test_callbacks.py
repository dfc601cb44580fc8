import random
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sn_lightning.attacks import FGM, PGD, WRM
from sn_lightning.callbacks import (
    AdversarialTraining,
    DataGrad,
    LayerwiseTraining,
    RobustEvaluation,
    attack_name,
)
from sn_lightning.data import ImageDataModule
from sn_lightning.data.sampling import derive_seed, reseed_global_rngs
from sn_lightning.errors import ConfigError, ConfigWarning
from sn_lightning.evaluation import evaluate
from sn_lightning.lit import SNClassifier
from sn_lightning.lit.classifier import ReseedEachBatch


class Snapshot(L.Callback):
    """Records the batch and every buffer at on_train_batch_start (its place in the list matters)."""

    def __init__(self):
        self.batches, self.buffers = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].clone())
        self.buffers.append({k: v.clone() for k, v in pl_module.named_buffers()})


class RecordingClassifier(SNClassifier):
    def training_step(self, batch, batch_idx):
        self.seen = [*getattr(self, "seen", []), batch[0].clone()]
        return super().training_step(batch, batch_idx)


def _fit(model, callbacks, tmp_path, steps=3, epochs=1, dm=None, **kw):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=epochs,
        limit_train_batches=steps,
        callbacks=callbacks,
        **kw,
    )
    trainer.fit(model, datamodule=dm or ImageDataModule("digits", batch_size=32))
    return trainer


def test_training_step_sees_the_perturbed_batch_within_eps(tmp_path):
    eps = 0.1
    before = Snapshot()
    model = RecordingClassifier(lr=0.05)
    _fit(
        model,
        [before, AdversarialTraining(PGD("linf", eps=eps, steps=3))],
        tmp_path,
        limit_val_batches=0,
    )
    for clean, seen in zip(before.batches, model.seen, strict=True):
        delta = seen - clean
        assert delta.abs().max() <= eps + 1e-6
        assert delta.abs().max() > eps / 2  # really perturbed
        assert seen.min() >= 0 and seen.max() <= 1


def test_training_batch_equals_an_independent_fgm_step(tmp_path):
    eps = 0.05
    before = Snapshot()
    model = RecordingClassifier(lr=0.0001, optimizer="sgd", momentum=0.0, lr_schedule="none")
    x0 = ImageDataModule("digits", batch_size=32)
    x0.setup("fit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(
        model,
        [before, AdversarialTraining(FGM("linf", eps=eps))],
        tmp_path,
        steps=1,
        dm=x0,
        limit_val_batches=0,
    )
    fresh = SNClassifier(lr=0.0001)
    fresh.load_state_dict(state)
    fresh.eval()
    x = before.batches[0].requires_grad_(True)
    first_pass = ImageDataModule("digits", batch_size=32)  # x0's first pass, which training used
    first_pass.setup("fit")
    y = next(iter(first_pass.train_dataloader()))[1]
    (g,) = torch.autograd.grad(F.cross_entropy(fresh(x), y, reduction="sum"), x)
    expected = (x + eps * g.sign()).clamp(0, 1)
    torch.testing.assert_close(model.seen[0], expected.detach(), rtol=0, atol=1e-6)


def test_no_attack_is_a_no_op(tmp_path):
    before = Snapshot()
    model = RecordingClassifier(lr=0.05)
    _fit(model, [before, AdversarialTraining(None)], tmp_path, limit_val_batches=0)
    for clean, seen in zip(before.batches, model.seen, strict=True):
        assert torch.equal(clean, seen)


def test_attack_moves_no_batchnorm_statistic_or_spectral_vector(tmp_path):
    before, after = Snapshot(), Snapshot()
    model = SNClassifier(backbone="torchvision:resnet18", beta=2.0, lr=0.01)
    attack = PGD("linf", eps=0.1, steps=3)
    _fit(
        model, [before, AdversarialTraining(attack), after], tmp_path, steps=2, limit_val_batches=0
    )
    for b, a in zip(before.buffers, after.buffers, strict=True):
        names = [k for k in b if "running_" in k or k.endswith("_u") or ".u" in k]
        assert any("running_mean" in k for k in names)
        assert any("parametrizations" in k for k in names)
        for k in b:
            assert torch.equal(b[k], a[k]), k


def test_relative_eps_resolved_from_the_data(tmp_path):
    attack = PGD("l2", eps_rel=0.05, steps=2)
    dm = ImageDataModule("digits", batch_size=32)
    _fit(
        SNClassifier(), [AdversarialTraining(attack)], tmp_path, steps=1, dm=dm, limit_val_batches=0
    )
    assert attack.eps == pytest.approx(0.05 * dm.mean_input_norm())
    assert attack.eps == pytest.approx(0.05 * 3.864, rel=1e-3)  # digits: mean ||x||_2 = 3.864


def test_mixed_objective_is_the_convex_combination():
    model = SNClassifier()
    callback = AdversarialTraining(FGM("linf", eps=0.1), mix=0.3)
    x_clean, x_adv, y = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    callback._clean, model.batch_perturbed = x_clean, True
    loss, logits = callback._mixed_objective(model, x_adv, y)
    expected = 0.7 * F.cross_entropy(model(x_adv), y) + 0.3 * F.cross_entropy(model(x_clean), y)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(logits, model(x_adv))


def test_eps_warmup_scales_the_perturbation(tmp_path):
    before = Snapshot()
    model = RecordingClassifier(lr=0.05)
    callback = AdversarialTraining(FGM("linf", eps=0.1), eps_warmup_epochs=1)
    _fit(model, [before, callback], tmp_path, steps=4, limit_val_batches=0)
    sizes = [float((s - c).abs().max()) for c, s in zip(before.batches, model.seen, strict=True)]
    assert sizes == pytest.approx([0.025, 0.05, 0.075, 0.1], abs=1e-5)


def test_start_epoch_trains_clean_before(tmp_path):
    before = Snapshot()
    model = RecordingClassifier(lr=0.05)
    _fit(
        model,
        [before, AdversarialTraining(FGM("linf", eps=0.1), start_epoch=1)],
        tmp_path,
        steps=2,
        epochs=2,
        limit_val_batches=0,
    )
    perturbed = [not torch.equal(c, s) for c, s in zip(before.batches, model.seen, strict=True)]
    assert perturbed == [False, False, True, True]


class PassCounter(L.Callback):
    def setup(self, trainer, pl_module, stage):
        self.forwards, self.backwards = 0, 0

        def fwd(module, args, out):
            if module.training:
                self.forwards += 1

        def bwd(module, grad_in, grad_out):
            self.backwards += 1

        pl_module.model.register_forward_hook(fwd)
        pl_module.model.register_full_backward_hook(bwd)


def test_layerwise_one_forward_one_backward_per_step(tmp_path):
    counter = PassCounter()
    layerwise = LayerwiseTraining(eps=0.05)
    model = SNClassifier(backbone="torchvision:resnet18", lr=0.01)
    _fit(model, [layerwise, counter], tmp_path, steps=4, limit_val_batches=0)
    assert (counter.forwards, counter.backwards) == (4, 4)
    assert layerwise.perturbation is None  # hooks removed at teardown
    assert not any(m._forward_hooks for n, m in model.model.named_modules() if n.endswith("layer1"))


def test_layerwise_perturbs_stage_outputs_in_training_only():
    torch.manual_seed(0)
    model = SNClassifier(backbone="torchvision:resnet18")
    layerwise = LayerwiseTraining(eps=0.5)
    layerwise.setup(None, model, "fit")
    assert sorted(layerwise.perturbation.layers) == [f"net.layer{i}" for i in range(1, 5)]
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    seen = []
    model.model.net.layer1.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    F.cross_entropy(model(x), y).backward()  # step 1: unperturbed, keeps the gradients
    assert seen[0].requires_grad is False
    model(x)  # step 2: layer1 sends h + 0.5 * sign(g) downstream (train-mode BN: batch statistics)
    with layerwise.perturbation.paused():
        model(x)  # the same forward, unperturbed
    delta = seen[1] - seen[2]
    size = delta.abs()
    assert torch.all((size < 1e-5) | ((size - 0.5).abs() < 1e-5))  # 0 or eps, elementwise
    assert ((size - 0.5).abs() < 1e-5).float().mean() > 0.5
    model.eval()
    with torch.no_grad():
        hooked = model(x)
        layerwise.teardown(None, model, "fit")
        assert torch.equal(model(x), hooked)  # eval forwards were never perturbed


def test_datagrad_loss_matches_per_example_gradients():
    torch.manual_seed(0)
    model = SNClassifier(backbone="mlp1", input_shape=(1, 8, 8))
    callback = DataGrad(lam=0.1, norm="l1")

    class _Trainer:
        precision_plugin = object()

    model.log = lambda *a, **k: None
    model._trainer = None
    type(model).trainer = property(lambda self: _Trainer())
    try:
        x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
        loss, logits = callback._objective(model, x, y)
        penalties = []
        for i in range(5):
            xi = x[i : i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
            penalties.append(g.abs().sum())
        expected = F.cross_entropy(model(x), y) + 0.1 * torch.stack(penalties).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert logits.shape == (5, 10)
    finally:
        del type(model).trainer


def test_datagrad_trains_and_conflicts_with_mixed_adversarial(tmp_path):
    _fit(SNClassifier(lr=0.05), [DataGrad(lam=0.01)], tmp_path, steps=2, limit_val_batches=0)
    with pytest.raises(ConfigError, match="both change the training loss"):
        _fit(
            SNClassifier(),
            [DataGrad(lam=0.01), AdversarialTraining(FGM(eps=0.1), mix=0.5)],
            tmp_path,
            steps=1,
        )


def test_robust_evaluation_logs_the_adversarial_validation_accuracy(tmp_path):
    attack = PGD("linf", eps=0.1, steps=5)
    model = SNClassifier(lr=0.05)
    dm = ImageDataModule("digits", batch_size=32)
    trainer = _fit(model, [RobustEvaluation([attack])], tmp_path, steps=20, epochs=2, dm=dm)
    logged = float(trainer.callback_metrics["val/robust_acc/pgd5_linf_0.1"])
    expected = evaluate(model, dm.val_dataloader(), attack=attack)["acc"]
    assert logged == pytest.approx(expected, abs=1e-6)
    assert logged < float(trainer.callback_metrics["val/acc"])


def test_attack_names():
    assert attack_name(PGD("linf", eps=0.1, steps=20)) == "pgd20_linf_0.1"
    assert attack_name(FGM("l2", eps_rel=0.05)) == "fgm_l2_rel0.05"
    assert attack_name(WRM(gamma=0.5)) == "wrm_0.5"
    # settings other than the defaults are named, so different attacks get different metrics
    assert attack_name(PGD("linf", eps=0.1, steps=20, random_start=True)) == "pgd20_linf_0.1_rs"
    assert attack_name(PGD(eps=0.1, steps=20, random_start=True, restarts=5)) == "pgd20_linf_0.1_r5"
    assert attack_name(PGD(eps=0.1, step_size=0.01, labels="predicted")) == (
        "pgd10_linf_0.1_step0.01_pred"
    )
    assert attack_name(FGM(eps=0.1, clip=False, eval_mode=False)) == "fgm_linf_0.1_noclip_trainmode"
    assert attack_name(WRM(gamma_rel=0.04)) == "wrm_rel0.04"
    assert attack_name(WRM(gamma_rel=0.04, steps=20)) == "wrm_rel0.04_s20"
    assert attack_name(WRM(gamma_rel=0.04).resolve_eps(10.0)) == "wrm_0.4"
    # accepted: they differ (before: both "wrm", both "pgd20_linf_0.1", refused as equal)
    two = RobustEvaluation([WRM(gamma_rel=0.04), WRM(gamma_rel=0.1)])
    assert list(two.named_attacks()) == ["wrm_rel0.04", "wrm_rel0.1"]
    two = RobustEvaluation([PGD(eps=0.1, steps=20), PGD(eps=0.1, steps=20, random_start=True)])
    assert list(two.named_attacks()) == ["pgd20_linf_0.1", "pgd20_linf_0.1_rs"]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: AdversarialTraining(FGM(eps=0.1), mix=1.0), "mix must be in"),
        (lambda: LayerwiseTraining(eps=-1.0), "layerwise eps must be >= 0"),
        (lambda: DataGrad(lam=0.5, form="fd", phi=0.1), "0 < lam <= phi"),
        (lambda: DataGrad(lam=0.1, form="approx"), "valid choices: exact, fd"),
        (lambda: RobustEvaluation([PGD(eps=0.1), PGD(eps=0.1)]), "must differ"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


class AutocastProbe(L.Callback):
    """Records the autocast state seen by the model's forward during the attack."""

    def __init__(self):
        self.states = []

    def setup(self, trainer, pl_module, stage):
        pl_module.model.register_forward_hook(
            lambda m, a, out: self.states.append((torch.is_autocast_enabled("cpu"), out.dtype))
        )


def test_attack_runs_under_the_trainer_precision_context(tmp_path):
    eps = 0.1
    before, probe = Snapshot(), AutocastProbe()
    model = RecordingClassifier(lr=0.05, beta=2.0)
    callbacks = [before, probe, AdversarialTraining(PGD("linf", eps=eps, steps=2))]
    _fit(model, callbacks, tmp_path, steps=2, limit_val_batches=0, precision="bf16-mixed")
    # every forward (attack steps and the training step) ran in bf16 autocast
    assert probe.states and all(on and dtype == torch.bfloat16 for on, dtype in probe.states)
    for clean, seen in zip(before.batches, model.seen, strict=True):
        assert seen.dtype == torch.float32
        assert (seen - clean).abs().max() <= eps + 1e-6
        assert (seen - clean).abs().max() > eps / 2
    for layer in [m for m in model.modules() if hasattr(m, "u")]:
        assert layer.u.dtype == torch.float32  # power iteration stays in float32 under AMP


def test_evaluate_max_examples_is_exact_and_counts_the_first_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(70, 1, 8, 8), torch.randint(0, 10, (70,))
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 70, 32)]
    capped = evaluate(model, batches, max_examples=40)
    first = evaluate(model, [(x[:40], y[:40])])
    assert capped["n"] == 40
    assert capped == pytest.approx(first)
    assert evaluate(model, batches, max_examples=1000)["n"] == 70


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_evaluate_feeds_batches_in_the_models_dtype(dtype):
    """``precision: 64-true`` / ``bf16-true`` convert the model; the final evaluation's float32
    batches crashed in the first layer (input and bias types differ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    expected = evaluate(model, [(x, y)])
    result = evaluate(model.to(dtype), [(x, y)])
    tolerance = 1e-6 if dtype == torch.float64 else 0.05
    assert result["n"] == 20
    assert result["loss"] == pytest.approx(expected["loss"], rel=tolerance)


def test_options_without_an_attack_warn():
    with pytest.warns(ConfigWarning, match="adversarial.attack is null .* have no effect"):
        AdversarialTraining(None, mix=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdversarialTraining(None)  # the defaults: silent


def test_a_training_attack_of_radius_zero_warns():
    """eps 0 (or eps_rel 0) perturbs nothing: a clean run reported under an attack's name."""
    with pytest.warns(ConfigWarning, match="PGD has radius 0: it returns every input unchanged"):
        AdversarialTraining(PGD(eps=0.0, steps=2))
    with pytest.warns(ConfigWarning, match="FGM has radius 0"):
        AdversarialTraining(FGM(norm="l2", eps=None, eps_rel=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdversarialTraining(PGD(eps=0.1, steps=2))


def test_strength_zero_options_warn():
    """datagrad and layerwise options have no effect while their strength is 0 (off)."""
    with pytest.warns(ConfigWarning, match=r"datagrad\.lam is 0 \(off\), so norm, form and phi"):
        DataGrad(lam=0.0, norm="l2")
    with pytest.warns(ConfigWarning, match=r"layerwise\.eps is 0 \(off\), so layers and mode"):
        LayerwiseTraining(eps=0.0, layers=["net.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataGrad(), LayerwiseTraining()  # the defaults: silent
        DataGrad(lam=0.1, norm="l2"), LayerwiseTraining(eps=0.1, mode="l2")


def test_check_config_checks_against_the_model_and_the_data():
    """What fit's check_run asks each callback before the trainer starts (tests/test_fit.py)."""
    model, dm = SNClassifier(input_shape=[1, 8, 8]), ImageDataModule("digits", batch_size=32)
    LayerwiseTraining(eps=0.1, layers=["net.*"]).check_config(model, dm)
    with pytest.raises(ConfigError, match="layer pattern 'nomatch' matches no module"):
        LayerwiseTraining(eps=0.1, layers=["nomatch"]).check_config(model, dm)
    LayerwiseTraining(eps=0.0).check_config(model, dm)  # off: nothing to match
    with pytest.raises(ConfigError, match=r"PGD: l2 eps 9 >= 8, the diameter"):
        AdversarialTraining(PGD("l2", eps=9.0, steps=1)).check_config(model, dm)
    # a relative radius is resolved from the data here, once, then checked
    attack = FGM("l2", eps_rel=0.5)
    RobustEvaluation([attack]).check_config(model, dm)
    assert attack.is_resolved and attack.eps == pytest.approx(0.5 * dm.mean_input_norm())
    with pytest.raises(ConfigError, match=r"linf eps eps_rel 50 x mean input norm"):
        AdversarialTraining(PGD("linf", eps_rel=50.0, steps=1)).check_config(model, dm)


def test_eps_warmup_past_the_run_warns(tmp_path):
    model = RecordingClassifier(lr=0.05)
    callback = AdversarialTraining(FGM("linf", eps=0.1), start_epoch=1, eps_warmup_epochs=4)
    with pytest.warns(ConfigWarning, match=r"eps_warmup_epochs 4 > trainer\.max_epochs 2: .* 25%"):
        _fit(model, [callback], tmp_path, steps=1, epochs=2, limit_val_batches=0)


def test_start_epoch_past_the_run_warns(tmp_path):
    model = RecordingClassifier(lr=0.05)
    callback = AdversarialTraining(FGM("linf", eps=0.1), start_epoch=2)
    with pytest.warns(ConfigWarning, match=r"start_epoch 2 >= trainer\.max_epochs 2: this run"):
        _fit(model, [callback], tmp_path, steps=1, epochs=2, limit_val_batches=0)


def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(tmp_path):
    """Lightning's overfit_batches turns shuffling off; the data module's own sampler follows."""

    class Labels(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.current_epoch, batch[1].tolist()))

    labels, dm = Labels(), ImageDataModule("digits", batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on overfitting
        _fit(SNClassifier(), [labels], tmp_path, steps=1.0, epochs=2, dm=dm, overfit_batches=2)
    first = [y for epoch, y in labels.seen if epoch == 0]
    second = [y for epoch, y in labels.seen if epoch == 1]
    assert len(first) == 2 and first == second
    assert first[0] + first[1] == dm.train_set.y[:32].tolist()  # the split's first 32, in order


class Draws(L.Callback):
    """Draws from the three global RNGs at on_train_batch_start (listed before any other)."""

    def __init__(self):
        self.draws = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rngs = (float(torch.rand(())), float(np.random.rand()), random.random())
        self.draws.append((trainer.current_epoch, batch_idx, rngs))


def test_global_rngs_are_reseeded_before_every_other_callback_each_batch(tmp_path, monkeypatch):
    """ReseedEachBatch goes first even before a user's own first callback (Note [exact resume])."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # as seed_everything(5) sets it
    draws = Draws()
    trainer = _fit(SNClassifier(), [draws], tmp_path, steps=3, epochs=2, limit_val_batches=0)
    assert isinstance(trainer.callbacks[0], ReseedEachBatch)
    assert [d[:2] for d in draws.draws] == [(e, b) for e in range(2) for b in range(3)]
    for epoch, batch_idx, rngs in draws.draws:
        reseed_global_rngs(derive_seed(5, epoch, batch_idx, 0))
        assert (float(torch.rand(())), float(np.random.rand()), random.random()) == rngs
    monkeypatch.delenv("PL_GLOBAL_SEED")  # seed_everything: false leaves the streams alone
    unseeded = Draws()
    torch.manual_seed(0)
    _fit(SNClassifier(), [unseeded], tmp_path, steps=2, limit_val_batches=0)
    assert unseeded.draws[0][2][0] != unseeded.draws[1][2][0]
    torch.manual_seed(0)
    repeat = Draws()
    _fit(SNClassifier(), [repeat], tmp_path, steps=2, limit_val_batches=0)
    assert [d[2][0] for d in repeat.draws] == [d[2][0] for d in unseeded.draws]


def test_attacks_under_fp16_amp_run_in_float32():
    """PAPERS 5.1: fp16 input gradients underflow, and sign(0) leaves confident examples as they are."""
    import types

    from lightning.pytorch.plugins.precision import MixedPrecision

    from sn_lightning.attacks import FGM
    from sn_lightning.callbacks.adversarial import attack_precision

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[3].weight *= 200  # confident: cross-entropy below fp16's smallest step
    x = torch.rand(64, 1, 8, 8)
    y = model(x).argmax(1)
    fp16 = MixedPrecision("16-mixed", "cpu")

    def unperturbed(context) -> int:
        with context:
            x_adv = FGM("linf", eps=0.1)(model, x, y)
        return int(((x_adv - x).flatten(1).abs().sum(1) == 0).sum())

    assert unperturbed(fp16.forward_context()) > 0  # the trainer's own fp16 context
    assert unperturbed(attack_precision(types.SimpleNamespace(precision_plugin=fp16))) == 0
    bf16 = types.SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    with attack_precision(bf16):  # bf16 has float32's range: the trainer's context stays
        assert (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )


def test_robust_accuracy_never_counts_a_clean_error():
    """A predicted-label attack pushes a misclassified point away from its wrong class, often onto
    the true one: the attack's own accuracy counts it, robust accuracy (worse of x, x_adv) does not."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)[:600] / 16
    y = torch.tensor(digits.target)[:600]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(30):  # undertrained: many clean errors
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    attack = PGD("l2", eps=0.3, steps=10, labels="predicted")
    result = evaluate(model, [(x, y)], attack=attack)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        x_adv = attack(model, x, y)
        adv_ok = model(x_adv).argmax(1) == y
    assert (~clean_ok & adv_ok).sum() > 20  # the attack "fixes" clean errors
    assert result["attack_acc"] == pytest.approx(float(adv_ok.float().mean()))
    assert result["acc"] == pytest.approx(float((clean_ok & adv_ok).float().mean()))
    assert result["acc"] < result["attack_acc"]


def test_evaluate_restores_each_submodule_mode():
    """A BatchNorm frozen in eval inside a training model stays frozen after evaluate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    model.train()
    model[1].eval()
    batches = [(torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,)))]
    out = evaluate(model, batches, attack=PGD(eps=0.1, steps=2))
    assert out["n"] == 5 and 0.0 <= out["acc"] <= out["attack_acc"] <= 1.0  # acc: the worse of two
    assert [m.training for m in model] == [True, False, True, True]
