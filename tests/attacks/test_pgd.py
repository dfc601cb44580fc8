import math

import pytest
import torch

from sn_lightning.attacks import PGD
from sn_lightning.errors import ConfigError

from .conftest import accuracy

SETTINGS = {"linf": {"eps": 0.1, "step_size": 0.025}, "l2": {"eps": 0.5, "step_size": 0.125}}


def _dist(a, b, norm):
    return torch.linalg.vector_norm(
        (a - b).flatten(1), ord=math.inf if norm == "linf" else 2, dim=1
    )


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [False, True])
def test_every_iterate_stays_in_ball_and_box(model, batch, norm, random_start):
    x, y = batch
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    eps = SETTINGS[norm]["eps"]
    x_adv = PGD(norm, eps=eps, steps=8, step_size=eps, random_start=random_start)(model, x, y)
    assert len(seen) == 8
    for z in [*seen, x_adv]:
        assert (_dist(z, x, norm) <= eps * (1 + 1e-5)).all()
        assert z.min() >= 0.0 and z.max() <= 1.0
    assert _dist(x_adv, x, norm).max() > 0.9 * eps


def test_unclipped_iterates_may_leave_the_box(model, batch):
    x, y = batch
    x_adv = PGD("linf", eps=0.2, steps=3, clip=False)(model, x, y)
    assert x_adv.min() < 0.0 or x_adv.max() > 1.0
    assert (_dist(x_adv, x, "linf") <= 0.2 + 1e-6).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_more_steps_never_weaken(model, digits, norm):
    _, _, x, y = digits
    accs = [
        accuracy(model, PGD(norm, steps=steps, **SETTINGS[norm])(model, x, y), y)
        for steps in (1, 2, 4, 8, 16)
    ]
    assert accs == sorted(accs, reverse=True), accs
    assert accs[-1] < accs[0] - 0.05, accs


def test_default_step_size_is_reference_choice():
    attack = PGD("l2", eps=0.3, steps=15)
    assert attack.step_size is None
    assert attack.effective_step_size() == pytest.approx(2 * 0.3 / 15)
    attack = PGD("l2", eps_rel=0.05, steps=10).resolve_eps(20.0)
    assert attack.effective_step_size() == pytest.approx(0.2)


def test_default_step_size_reproduces_reference_loop(model, batch):
    """The reference's PGM (no random start, no clipping), written out, for linf."""
    x, y = batch
    eps, k = 0.1, 5
    model.eval()
    z = x.clone()
    for _ in range(k):
        z.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(z), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
        z = torch.clamp(z.detach() + 2 * eps / k * g.sign(), x - eps, x + eps)
    torch.testing.assert_close(PGD("linf", eps=eps, steps=k, clip=False)(model, x, y), z)


def test_restarts_keep_the_worst_case(model, digits):
    _, _, x, y = digits
    kwargs = {"norm": "linf", "eps": 0.08, "steps": 5, "random_start": True}
    torch.manual_seed(1)
    single = PGD(**kwargs)(model, x, y)
    torch.manual_seed(1)  # the first restart draws the same random start as `single`
    multi = PGD(**kwargs, restarts=4)(model, x, y)
    with torch.no_grad():
        fooled_single = model(single).argmax(1) != y
        fooled_multi = model(multi).argmax(1) != y
    assert (fooled_multi | ~fooled_single).all()  # never loses a success
    assert fooled_multi.sum() >= fooled_single.sum()
    assert (_dist(multi, x, "linf") <= 0.08 + 1e-6).all()


def test_eps_rel_and_unresolved_call(model, batch):
    attack = PGD("l2", eps_rel=0.05)
    with pytest.raises(RuntimeError, match="resolve_eps"):
        attack(model, *batch)
    with pytest.raises(RuntimeError, match="not resolved"):
        attack.effective_step_size()
    attack.resolve_eps(10.0)
    x, y = batch
    torch.testing.assert_close(attack(model, x, y), PGD("l2", eps=0.5)(model, x, y))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.1, "steps": 0}, "steps must be >= 1, got 0"),
        ({"eps": 0.1, "steps": True}, "steps must be an int"),
        ({"eps": 0.1, "step_size": -1.0}, "step_size must be .*> 0, got -1.0"),
        ({"eps": 0.1, "restarts": 0}, "restarts must be >= 1, got 0"),
        ({"eps": 0.1, "restarts": 3}, "random_start=True"),
        ({"norm": "L2", "eps": 0.1}, r"'L2'.*valid norms"),
        ({"eps": 0.1, "eps_rel": 0.1}, "exactly one of eps"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PGD(**kwargs)


def test_repr():
    assert repr(PGD("linf", eps=8 / 255, steps=10, step_size=2 / 255)) == (
        "PGD(norm='linf', eps=0.0313725, steps=10, step_size=0.00784314, random_start=False, "
        "restarts=1, clip=True, labels='true')"
    )


# -- peer comparison ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "eps", "alpha", "steps"),
    [("linf", 0.1, 0.02, 10), ("linf", 0.05, 0.01, 20), ("l2", 0.5, 0.1, 10), ("l2", 1.0, 0.2, 10)],
)
def test_at_least_as_strong_as_torchattacks(model, digits, norm, eps, alpha, steps):
    torchattacks = pytest.importorskip("torchattacks")
    _, _, x, y = digits
    peer_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    peer = peer_cls(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    ours = PGD(norm, eps=eps, steps=steps, step_size=alpha)
    acc_peer = accuracy(model, peer(x, y), y)
    acc_ours = accuracy(model, ours(model, x, y), y)
    assert acc_ours <= acc_peer + 0.01, (acc_ours, acc_peer)
    assert accuracy(model, x, y) - acc_ours > 0.02  # the setting is not trivial


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_close_to_autoattack_apgd_ce(model, digits, norm, eps):
    """PGD-100 with 5 random restarts vs APGD-CE (5 restarts x 100 iterations), pyautoattack."""
    pyautoattack = pytest.importorskip("pyautoattack")
    _, _, x, y = digits
    apgd = pyautoattack.AutoAttack(
        model,
        norm={"linf": "Linf", "l2": "L2"}[norm],
        eps=eps,
        version="custom",
        attacks=["apgd-ce"],
        device="cpu",
        seed=0,
    )
    x_apgd, _ = apgd.run_standard_evaluation(x, y, batch_size=len(y))
    torch.manual_seed(0)
    ours = PGD(norm, eps=eps, steps=100, step_size=eps / 8, random_start=True, restarts=5)
    acc_ours, acc_apgd = accuracy(model, ours(model, x, y), y), accuracy(model, x_apgd, y)
    assert acc_ours <= acc_apgd + 0.01, (acc_ours, acc_apgd)


def test_linf_radius_covering_the_pixel_range_is_refused():
    with pytest.raises(
        ConfigError, match=r"linf eps 8 >= 1 covers .* \(did you mean 8/255 = 0\.03137\?\)"
    ):
        PGD("linf", eps=8)
    relative = PGD("linf", eps_rel=0.05)
    with pytest.raises(
        ConfigError,
        match=r"linf eps eps_rel 0\.05 x mean input norm 30 = 1\.5 >= 1 .*\(use eps_rel below 1 / 30 = 0\.03333, an absolute eps, or norm l2\)",
    ):
        relative.resolve_eps(30.0)
    assert PGD("l2", eps=8).eps == 8.0  # l2 radii above 1 are meaningful
    assert PGD("linf", eps=0.999).eps == 0.999
    with pytest.raises(ConfigError, match="step_size must be a finite number > 0, got 0"):
        PGD("linf", eps=0.1, step_size=0)
