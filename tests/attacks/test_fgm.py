import pytest
import torch
import torch.nn.functional as F

from sn_lightning.attacks import FGM
from sn_lightning.errors import ConfigError


def _reference_grad(model, x, y):
    """grad_x CE computed independently of the package (mean loss; only its direction matters)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad = None
    return x.grad.detach()


def test_linf_equals_clipped_sign_step(model, batch):
    x, y = batch
    g = _reference_grad(model, x, y)
    expected = torch.clamp(x + 0.1 * g.sign(), 0.0, 1.0)
    assert torch.equal(FGM("linf", eps=0.1)(model, x, y), expected)
    assert torch.equal(FGM("linf", eps=0.1, clip=False)(model, x, y), x + 0.1 * g.sign())


def test_l2_equals_normalized_gradient_step(model, batch):
    x, y = batch
    g = _reference_grad(model, x, y)
    step = 0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_adv = FGM("l2", eps=0.5, clip=False)(model, x, y)
    # atol 1e-5: the attack runs on the Conv-BN-folded view (same function, float32 rounding)
    torch.testing.assert_close(x_adv, x + step, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_adv.sub(x).flatten(1).norm(dim=1), torch.full((64,), 0.5))
    torch.testing.assert_close(
        FGM("l2", eps=0.5)(model, x, y), (x + step).clamp(0, 1), rtol=0, atol=1e-5
    )


def test_fgm_increases_the_loss(model, digits):
    _, _, x, y = digits
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        adv = F.cross_entropy(model(FGM("linf", eps=0.1)(model, x, y)), y)
    assert adv > clean + 0.5


def test_zero_eps_is_identity(model, batch):
    x, y = batch
    assert torch.equal(FGM("l2", eps=0.0)(model, x, y), x)


def test_eps_rel_resolution(model, batch):
    attack = FGM("l2", eps_rel=0.05)
    assert attack.eps is None and not attack.is_resolved
    with pytest.raises(RuntimeError, match="resolve_eps"):
        attack(model, *batch)
    assert attack.resolve_eps(10.0) is attack
    assert attack.eps == pytest.approx(0.5) and attack.is_resolved
    x, y = batch
    torch.testing.assert_close(attack(model, x, y), FGM("l2", eps=0.5)(model, x, y))
    attack.resolve_eps(20.0)  # re-resolving uses eps_rel again, not the previous eps
    assert attack.eps == pytest.approx(1.0)
    absolute = FGM("l2", eps=0.3).resolve_eps(10.0)
    assert absolute.eps == 0.3  # absolute radii ignore the scale


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "l1", "eps": 0.1}, r"'l1'.*valid norms"),
        ({"norm": "linf"}, "exactly one of eps"),
        ({"norm": "linf", "eps": 0.1, "eps_rel": 0.1}, "exactly one of eps"),
        ({"norm": "linf", "eps": -0.1}, r"eps must be .*>= 0, got -0.1"),
        ({"norm": "l2", "eps_rel": float("nan")}, "eps_rel"),
        ({"norm": "linf", "eps": 0.1, "labels": "gold"}, r"labels must be one of .*'gold'"),
        ({"norm": "linf", "eps": "0.1"}, "eps must be a float"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FGM(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_resolve_rejects_bad_norm():
    with pytest.raises(ValueError, match="mean_input_norm"):
        FGM("l2", eps_rel=0.05).resolve_eps(0.0)


def test_repr():
    assert repr(FGM("linf", eps=0.1)) == "FGM(norm='linf', eps=0.1, clip=True, labels='true')"
    assert repr(FGM("l2", eps_rel=0.05, labels="predicted", eval_mode=False)) == (
        "FGM(norm='l2', eps=None, eps_rel=0.05, clip=True, labels='predicted', eval_mode=False)"
    )
