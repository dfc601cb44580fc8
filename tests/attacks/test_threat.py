import math

import pytest
import torch

from sn_lightning.attacks import THREAT_MODELS, L2Ball, LinfBall, create_threat_model
from sn_lightning.errors import ConfigError


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    p = math.inf if norm == "linf" else 2
    return torch.linalg.vector_norm(delta.flatten(1), ord=p, dim=1)


@pytest.fixture
def x0() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(16, 3, 5, 5)


def test_registry_maps_names_to_classes():
    assert dict(THREAT_MODELS) == {"linf": LinfBall, "l2": L2Ball}
    assert isinstance(create_threat_model("l2", 0.5), L2Ball)
    assert create_threat_model("linf", 0.1, clip=False).clip is False


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("clip", [True, False])
def test_project_lands_in_ball_and_box_and_is_idempotent(x0, norm, clip):
    threat = create_threat_model(norm, 0.3, clip=clip)
    x = x0 + 2.0 * torch.randn_like(x0)
    p = threat.project(x, x0)
    assert (_norms(p - x0, norm) <= 0.3 + 1e-6).all()
    if clip:
        assert p.min() >= 0.0 and p.max() <= 1.0
    else:
        assert p.min() < 0.0 or p.max() > 1.0  # the ball is not clipped to the box
    torch.testing.assert_close(threat.project(p, x0), p)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_keeps_points_inside(x0, norm):
    threat = create_threat_model(norm, 0.3)
    x = (x0 + 0.01 * torch.randn_like(x0)).clamp(0, 1)
    torch.testing.assert_close(threat.project(x, x0), x)


def test_linf_project_is_exact_clamp(x0):
    x = x0 + torch.randn_like(x0)
    expected = torch.max(torch.min(x, x0 + 0.1), x0 - 0.1).clamp(0, 1)
    assert torch.equal(LinfBall(0.1).project(x, x0), expected)


def test_l2_project_rescales_radially(x0):
    delta = torch.randn_like(x0)
    p = L2Ball(0.5, clip=False).project(x0 + delta, x0)
    expected = x0 + delta * (0.5 / _norms(delta, "l2")).view(-1, 1, 1, 1)
    torch.testing.assert_close(p, expected)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_radius_projects_to_center(x0, norm):
    p = create_threat_model(norm, 0.0).project(x0 + torch.randn_like(x0), x0)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, x0)


def test_steps_are_steepest_ascent(x0):
    grad = torch.randn_like(x0)
    grad[0] = 0.0  # a zero gradient must not produce NaN
    assert torch.equal(LinfBall(1.0).step(x0, grad, 0.1), x0 + 0.1 * grad.sign())
    step = L2Ball(1.0).step(x0, grad, 0.1) - x0
    assert torch.isfinite(step).all()
    torch.testing.assert_close(_norms(step[1:], "l2"), torch.full((15,), 0.1))
    assert torch.equal(step[0], torch.zeros_like(step[0]))
    cos = torch.nn.functional.cosine_similarity(step[1:].flatten(1), grad[1:].flatten(1))
    torch.testing.assert_close(cos, torch.ones(15))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_in_ball_and_box(x0, norm):
    threat = create_threat_model(norm, 0.2)
    x = threat.random_init(x0)
    assert (_norms(x - x0, norm) <= 0.2 + 1e-6).all()
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert not torch.equal(x, x0)
    assert x.dtype == x0.dtype and x.device == x0.device


def test_dtype_is_preserved(x0):
    x0 = x0.double()
    for threat in (LinfBall(0.1), L2Ball(0.1)):
        out = threat.project(threat.step(x0, torch.randn_like(x0), 0.05), x0)
        assert out.dtype == torch.float64


def test_bad_norm_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'l3'.*\['l2', 'linf'\]"):
        create_threat_model("l3", 0.1)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_bad_eps_raises(eps):
    with pytest.raises(ConfigError, match="eps"):
        LinfBall(eps)


def test_repr():
    assert repr(L2Ball(0.5)) == "L2Ball(eps=0.5, clip=True)"


@pytest.mark.parametrize("scale", [1e-20, 1e-25, 1e-30, 1e-37])
def test_l2_step_has_its_length_for_tiny_gradients(x0, scale):
    """In float32 the squares of entries below ~1e-19 underflow; the norm must not read 0."""
    grad = torch.randn_like(x0) * scale  # a confident example's input gradient
    grad[3] = 0.0  # an all-zero example stays put
    step = L2Ball(2.0).step(x0, grad, 0.1) - x0
    lengths = _norms(step, "l2")
    expected = torch.full((16,), 0.1)
    expected[3] = 0.0
    torch.testing.assert_close(lengths, expected)
    direction = grad[0].double() / grad[0].double().norm()
    torch.testing.assert_close(step[0].double() / 0.1, direction, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("linf", 8 / 255), ("l2", 0.5)])
def test_low_precision_projection_stays_inside_the_ball_exactly(norm, eps, dtype):
    """x0 + eps rounded to the nearest bfloat16 lands outside (0.1 -> 0.1016); round toward x0."""
    torch.manual_seed(1)
    x0 = torch.rand(64, 3, 8, 8).to(dtype)
    threat = create_threat_model(norm, eps)
    x = x0 + torch.randn(x0.shape).sign().to(dtype) * 0.3  # far outside the ball
    out = threat.project(x, x0)
    assert out.dtype == dtype
    delta = out.double() - x0.double()
    assert (_norms(delta, norm) <= eps).all()
    assert out.double().min() >= 0.0 and out.double().max() <= 1.0
    # a point of the set is a fixed point
    torch.testing.assert_close(threat.project(out, x0), out, rtol=0, atol=0)
    # on the boundary to the dtype's resolution: not shrunk more than rounding requires (no box
    # clipping here, which shortens l2 steps by itself; one ulp of |x| < 2 per coordinate)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    unclipped = create_threat_model(norm, eps, clip=False).project(x, x0).double() - x0.double()
    slack = ulp if norm == "linf" else ulp * math.sqrt(x0[0].numel())
    assert (_norms(unclipped, norm) <= eps).all()
    assert (_norms(unclipped, norm) >= eps - slack).all()
