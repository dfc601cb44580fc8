import math

import pytest
import torch
import torch.nn.functional as F

from sn_lightning.attacks import WRM
from sn_lightning.errors import ConfigError


def _reference_wrm(model, x, y, gamma, k):
    """PAPERS.md 1.5, written out: c = 1/(2 gamma); x' = x + c*g(x); then k ascent steps."""
    c = 1.0 / (2.0 * gamma)

    def grad(z):
        z = z.detach().requires_grad_(True)
        loss = F.cross_entropy(model(z), y, reduction="none").sum()  # the reference: mean=False
        return torch.autograd.grad(loss, z)[0]

    x_adv = x + c * grad(x)
    for t in range(k):
        g = c * grad(x_adv) - (x_adv - x)  # grad of c*CE - ||x' - x||^2 / 2
        x_adv = x_adv + 1.0 / math.sqrt(t + 2) * g
    return x_adv


@pytest.mark.parametrize(("gamma", "steps"), [(0.5, 15), (2.0, 3), (1.0, 0)])
def test_matches_reference_loop(model, batch, gamma, steps):
    x, y = batch
    model.eval()
    expected = _reference_wrm(model, x, y, gamma, steps)
    x_adv = WRM(gamma=gamma, steps=steps, clip=False)(model, x, y)
    # 1e-5: the attack runs on the Conv-BN-folded view (same function, float32 rounding)
    torch.testing.assert_close(x_adv, expected, rtol=1e-5, atol=1e-5)
    assert (x_adv - x).abs().max() > 1e-3


def test_predicted_labels_and_clip(model, batch):
    x, y = batch
    with torch.no_grad():
        y_hat = model(x).argmax(1)
    expected = _reference_wrm(model, x, y_hat, 0.5, 15)
    torch.testing.assert_close(
        WRM(gamma=0.5, clip=False, labels="predicted")(model, x, (y + 1) % 10),
        expected,
        rtol=1e-6,
        atol=1e-6,
    )
    clipped = WRM(gamma=0.1)(model, x, y)
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


def test_larger_gamma_gives_smaller_perturbations(model, batch):
    x, y = batch
    sizes = [
        (WRM(gamma=g, clip=False)(model, x, y) - x).flatten(1).norm(dim=1).mean().item()
        for g in (0.1, 1.0, 10.0)
    ]
    assert sizes[0] > sizes[1] > sizes[2] > 0


def test_gamma_rel_resolution(model, batch):
    attack = WRM(gamma_rel=0.002)
    with pytest.raises(RuntimeError, match="resolve_eps"):
        attack(model, *batch)
    attack.resolve_eps(50.0)
    assert attack.gamma == pytest.approx(0.1)
    torch.testing.assert_close(attack(model, *batch), WRM(gamma=0.1)(model, *batch))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of gamma"),
        ({"gamma": 1.0, "gamma_rel": 0.1}, "exactly one of gamma"),
        ({"gamma": 0.0}, r"gamma must be .*> 0, got 0.0"),
        ({"gamma_rel": -1.0}, "gamma_rel"),
        ({"gamma": 1.0, "steps": -1}, "steps must be >= 0, got -1"),
        ({"gamma": 1.0, "steps": 2.5}, "steps must be an int"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        WRM(**kwargs)


def test_repr():
    assert repr(WRM(gamma=0.1)) == "WRM(gamma=0.1, steps=15, clip=True, labels='true')"
    assert repr(WRM(gamma_rel=0.002, labels="predicted")) == (
        "WRM(gamma=None, gamma_rel=0.002, steps=15, clip=True, labels='predicted')"
    )
