"""Side effects of calling an attack: modes, buffers, .grad, caching, grad mode, labels, dtypes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from sn_lightning.attacks import FGM, PGD, WRM, Attack, mean_input_norm

from .conftest import tiny_cnn

ATTACKS = [
    pytest.param(lambda: FGM("linf", eps=0.1), id="fgm"),
    pytest.param(lambda: PGD("linf", eps=0.1, steps=3), id="pgd-linf"),
    pytest.param(lambda: PGD("l2", eps=0.5, steps=3, random_start=True, restarts=2), id="pgd-l2"),
    pytest.param(lambda: WRM(gamma=1.0, steps=2), id="wrm"),
]


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("make", ATTACKS)
@pytest.mark.parametrize("eval_mode", [True, False])
def test_restores_every_submodule_mode(model, batch, make, eval_mode):
    model.train()
    model[2].eval()  # a frozen BatchNorm inside a training model
    before = _modes(model)
    attack = make()
    attack.eval_mode = eval_mode
    attack(model, *batch)
    assert _modes(model) == before


def test_attacks_in_eval_mode_by_default(model, batch):
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train()
    PGD("linf", eps=0.1, steps=2)(model, *batch)
    assert seen == [False, False]
    seen.clear()
    PGD("linf", eps=0.1, steps=2, eval_mode=False)(model, *batch)
    assert seen == [True, True]


def test_restores_modes_when_the_model_raises(model, batch):
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    model.register_forward_pre_hook(boom)
    model.train()
    before = _modes(model)
    with pytest.raises(RuntimeError, match="boom"):
        PGD("linf", eps=0.1, steps=3)(model, *batch)
    assert _modes(model) == before


@pytest.mark.parametrize("make", ATTACKS)
def test_parameters_never_get_grad(model, batch, make):
    model.train()
    make()(model, *batch)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("make", ATTACKS)
@pytest.mark.parametrize("eval_mode", [True, False])
def test_batchnorm_statistics_do_not_move(model, batch, make, eval_mode):
    model.train()
    bn = model[2]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    attack = make()
    attack.eval_mode = eval_mode
    attack(model, *batch)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("eval_mode", [True, False])
def test_spectral_norm_vectors_do_not_move(batch, eval_mode):
    torch.manual_seed(0)
    model = tiny_cnn()
    spectral_norm(model[1])
    spectral_norm(model[7])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}
    assert before
    PGD("linf", eps=0.1, steps=3, eval_mode=eval_mode)(model, *batch)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


class _CountingScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 * w


def test_parametrizations_are_computed_once_per_attack(batch):
    model = tiny_cnn()
    scale = _CountingScale()
    parametrize.register_parametrization(model[1], "weight", scale)
    before = scale.calls  # registration itself calls forward once
    PGD("linf", eps=0.1, steps=5, labels="predicted")(model, *batch)
    assert scale.calls - before == 1  # 6 forwards, one weight computation (parametrize.cached)
    model(batch[0])
    assert scale.calls - before == 2  # outside the attack the weight is recomputed per forward


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(model, batch, context):
    x, y = batch
    with context():
        x_in, y_in = x.clone(), y.clone()  # inference tensors under inference_mode
        x_adv = PGD("linf", eps=0.1, steps=3)(model, x_in, y_in)
    assert (x_adv - x).abs().max() > 0.05
    assert not x_adv.requires_grad


def test_output_is_detached_with_input_dtype(model, batch):
    model = model.double()
    x, y = batch
    x_adv = FGM("l2", eps=0.5)(model, x.double(), y)
    assert x_adv.dtype == torch.float64 and not x_adv.requires_grad and x_adv.grad_fn is None
    x_req = x.double().requires_grad_(True)
    assert PGD("linf", eps=0.1, steps=1)(model, x_req, y).grad_fn is None
    assert x_req.grad is None


def test_input_is_not_modified(model, batch):
    x, y = batch
    x_copy = x.clone()
    for attack in (FGM("linf", eps=0.1), PGD("l2", eps=0.5, steps=3), WRM(gamma=1.0, steps=2)):
        attack(model, x, y)
    assert torch.equal(x, x_copy)


def test_predicted_labels_use_the_clean_argmax(model, batch):
    x, y = batch
    with torch.no_grad():
        y_hat = model(x).argmax(1)
    wrong = (y + 1) % 10
    for kwargs in ({"norm": "linf", "eps": 0.1}, {"norm": "l2", "eps": 0.5}):
        predicted = PGD(**kwargs, steps=3, labels="predicted")
        true = PGD(**kwargs, steps=3, labels="true")
        expected = true(model, x, y_hat)
        assert torch.equal(predicted(model, x, wrong), expected)
        assert torch.equal(predicted(model, x), expected)  # y is not needed
        assert not torch.equal(true(model, x, wrong), expected)


def test_predicted_labels_are_computed_in_eval_mode(model, batch):
    x, _ = batch
    model.train()
    y_hat = model.eval()(x).argmax(1)
    model.train()
    expected = FGM("linf", eps=0.1)(model, x, y_hat)
    assert torch.equal(FGM("linf", eps=0.1, labels="predicted")(model, x), expected)


def test_bad_call_arguments(model, batch):
    x, y = batch
    attack = FGM("linf", eps=0.1)
    with pytest.raises(ValueError, match="needs y"):
        attack(model, x)
    with pytest.raises(ValueError, match="shape"):
        attack(model, x, y[:3])
    with pytest.raises(TypeError, match="floating"):
        attack(model, (x * 16).long(), y)
    with pytest.raises(TypeError, match=r"y must hold integer class labels, got torch\.float32"):
        attack(model, x, y.float())
    # int32 / uint8 labels attack as int64 ones (cross-entropy raised on them before)
    expected = attack(model, x, y)
    for dtype in (torch.int32, torch.uint8):
        assert torch.equal(attack(model, x, y.to(dtype)), expected)


def test_attack_is_abstract():
    with pytest.raises(TypeError):
        Attack()  # type: ignore[abstract]


def test_mean_input_norm(digits):
    x = digits[0]
    expected = x.flatten(1).norm(dim=1).mean().item()
    loader = [(x[i : i + 100], None) for i in range(0, len(x), 100)]
    assert mean_input_norm(loader) == pytest.approx(expected, rel=1e-6)
    assert mean_input_norm([x]) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no examples"):
        mean_input_norm([])


@pytest.mark.parametrize(
    ("make", "forwards"),
    [
        (lambda: FGM("linf", eps=0.1, labels="predicted"), 1),
        (lambda: PGD("linf", eps=0.1, steps=4, labels="predicted"), 4),
        (lambda: PGD("l2", eps=0.5, steps=4, random_start=True, labels="predicted"), 5),
        (lambda: WRM(gamma=1.0, steps=3, labels="predicted"), 4),
        (lambda: PGD("linf", eps=0.1, steps=4), 4),
    ],
)
def test_predicted_labels_cost_no_extra_forward(model, batch, make, forwards):
    """Note [predicted labels for free]: the label forward doubles as the first gradient's."""
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(1))
    make()(model, *batch)
    assert len(seen) == forwards


@pytest.mark.parametrize("make", [lambda **k: FGM("l2", eps=0.5, **k), lambda **k: WRM(1.0, **k)])
def test_predicted_labels_match_true_labels_at_argmax(model, batch, make):
    x, y = batch
    with torch.no_grad():
        y_hat = model(x).argmax(1)
    torch.testing.assert_close(
        make(labels="predicted")(model, x, y), make(labels="true")(model, x, y_hat)
    )


def test_runs_under_cpu_autocast_bf16(model, batch):
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = PGD("linf", eps=0.1, steps=3, labels="predicted")(model, x, y)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert (x_adv != x).float().mean() > 0.5


def test_bf16_model_and_input(model, batch):
    x, y = batch
    model = model.to(torch.bfloat16)
    x_adv = PGD("l2", eps=0.5, steps=3)(model, x.to(torch.bfloat16), y)
    assert x_adv.dtype == torch.bfloat16
    norms = (x_adv.float() - x.to(torch.bfloat16).float()).flatten(1).norm(dim=1)
    assert (norms <= 0.5 * 1.02).all() and norms.max() > 0.3


@pytest.mark.parametrize(("norm", "eps"), [("linf", 2 / 255), ("l2", 0.1)])
def test_bf16_steps_below_the_pixel_spacing_add_up(model, batch, norm, eps):
    """bf16 pixels in [0.5, 1) are 2^-8 apart: PGD-20's steps of ~eps/10 must still move them."""
    x, y = batch
    model = model.to(torch.bfloat16)
    xb = (0.5 + 0.49 * x).to(torch.bfloat16)  # as Lightning hands a batch to a bf16-true model
    x_adv = PGD(norm, eps=eps, steps=20)(model, xb, y)
    assert x_adv.dtype == torch.bfloat16
    delta = (x_adv.float() - xb.float()).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps).all()  # in the ball exactly: rounded toward x, not to the nearest
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    moved = (x_adv != xb).float().mean()
    assert moved > (0.5 if norm == "linf" else 0.05)  # before: 0.000 (each step rounded away)
    with torch.no_grad():
        clean = F.cross_entropy(model(xb).float(), y)
        attacked = F.cross_entropy(model(x_adv).float(), y)
    assert attacked > clean


@pytest.mark.parametrize("eval_mode", [True, False])
def test_project_spectral_norm_vectors_do_not_move(batch, eval_mode):
    spectral = pytest.importorskip("sn_lightning.spectral")
    torch.manual_seed(0)
    model = tiny_cnn()
    spectral.apply_spectral_norm(model, beta=1.0, input_shape=(1, 8, 8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(".parametrizations." in k for k in before)
    for attack in (PGD("linf", eps=0.1, steps=3, eval_mode=eval_mode), WRM(1.0, steps=2)):
        attack.eval_mode = eval_mode
        attack(model, *batch)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())
