"""Threat models: norm balls around a clean input, intersected with the image box [0, 1]^d.

A threat model knows the geometry of the perturbation set and nothing about models, losses or
loops: where a random start lies, the steepest-ascent step for its norm, and the projection back
onto the set. Attacks (`PGD`, `FGM`) compose them, after MadryLab/robustness' ``AttackerStep``,
made stateless: the centre ``x0`` is passed to `project` instead of being stored.

All tensors are batches ``(N, ...)`` (for images ``(N, C, H, W)``) in [0, 1] pixel units; norms are
taken per example over all non-batch dimensions. Nothing here allocates on a device of its own:
outputs live on the device and in the dtype of the inputs.

Note [box clipping]
    The reference (Farnia et al. 2019, ``adversarial.py``) never clips to the data range. With
    ``clip=True`` (the default) the set is the ball intersected with [0, 1]^d. For the l_inf ball
    the intersection is again a box, so clamping is the exact Euclidean projection. For the l2 ball
    we project onto the ball, then clamp to [0, 1]: clamping moves each coordinate towards x0
    (which lies in the box), so the result stays in the ball and is feasible, though it is not the
    exact projection onto the intersection (the same convention as torchattacks and robustness).
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from sn_lightning.errors import ConfigError

__all__ = ["THREAT_MODELS", "L2Ball", "LinfBall", "ThreatModel", "create_threat_model"]


def _validate_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError(f"eps must be a float, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not eps >= 0.0 or eps == float("inf"):  # `not >=` also rejects NaN
        raise ConfigError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def _per_example_norm(t: Tensor) -> Tensor:
    """l2 norm of each example, shaped to broadcast against ``t``: (N, ...) -> (N, 1, ..., 1)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.dim() - 1)))


def unit_l2(t: Tensor) -> Tensor:
    """Divide by the l2 norm per example: (N, ...) -> (N, ...); all-zero examples stay zero.

    The norm is taken of ``t / max|t|`` (per example): in float32 the squares of entries below
    ~1e-19 underflow, and the norm of a tiny but nonzero gradient (a confident example) would
    read 0, giving a "unit" direction of norm ~1e13.
    """
    flat = t.flatten(1)
    tiny = torch.finfo(t.dtype).tiny
    scaled = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return (scaled / norm.clamp_min(tiny)).reshape(t.shape)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and bfloat16, else ``dtype``: where projections are computed."""
    return torch.promote_types(dtype, torch.float32)


def _round_toward(x: Tensor, x0: Tensor) -> Tensor:
    """``x`` (in ``_wide(x0.dtype)``) in ``x0``'s dtype, rounded toward ``x0`` per coordinate.

    ``|result - x0| <= |x - x0|`` in every coordinate, so a point of the ball stays in the ball
    and in the box: rounding to the nearest half or bfloat16 value can land 1.5% outside an l_inf
    ball of radius 0.1 (0.1016) and outside an l2 ball.
    """
    if x.dtype == x0.dtype:
        return x
    r = x.to(x0.dtype)
    x0w = x0.to(x.dtype)
    over = (r.to(x.dtype) - x0w).abs() > (x - x0w).abs()
    return torch.where(over, torch.nextafter(r, x0), r)


class ThreatModel(abc.ABC):
    """A norm ball of radius ``eps`` around ``x0``, optionally intersected with [0, 1]^d.

    Args:
        eps: radius in [0, 1] pixel units, >= 0.
        clip: intersect with the image box [0, 1]^d (see Note [box clipping]).
    """

    norm: str

    def __init__(self, eps: float, *, clip: bool = True) -> None:
        self.eps = _validate_eps(eps)
        self.clip = bool(clip)

    @abc.abstractmethod
    def random_init(self, x0: Tensor) -> Tensor:
        """A random point of the set around ``x0``: (N, ...) -> (N, ...)."""

    @abc.abstractmethod
    def step(self, x: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """One steepest-ascent step of length ``step_size`` (in this norm) along ``grad``.

        Args:
            x: current iterate, (N, ...).
            grad: gradient of the loss at ``x``, (N, ...).
            step_size: step length in this norm, in [0, 1] pixel units.

        Returns:
            ``x + step_size * d``, ``d = argmax_{||d|| <= 1} <grad, d>``; not projected.
        """

    @abc.abstractmethod
    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        """Project ``x`` onto the set around ``x0``: (N, ...), (N, ...) -> (N, ...), ``x0``'s dtype.

        Half and bfloat16 inputs are projected in float32 and rounded toward ``x0``, so the
        result lies in the set exactly, not to the dtype's rounding.
        """

    def _clip(self, x: Tensor) -> Tensor:
        return x.clamp(0.0, 1.0) if self.clip else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g}, clip={self.clip})"


class LinfBall(ThreatModel):
    """{x : ||x - x0||_inf <= eps} ∩ [0, 1]^d.

    step: ``x + step_size * sign(grad)``; project: clamp to [x0 - eps, x0 + eps], then to [0, 1]
    (the exact projection: the intersection of two boxes is a box).
    """

    norm = "linf"

    def random_init(self, x0: Tensor) -> Tensor:
        """x0 + U(-eps, eps)^d, clamped to [0, 1] (the torchattacks / Madry et al. start)."""
        return self._clip(x0 + torch.empty_like(x0).uniform_(-self.eps, self.eps))

    def step(self, x: Tensor, grad: Tensor, step_size: float) -> Tensor:  # noqa: D102
        return x + step_size * grad.sign()

    def project(self, x: Tensor, x0: Tensor) -> Tensor:  # noqa: D102
        wide = _wide(x0.dtype)
        x0w = x0.to(wide)
        lo, hi = x0w - self.eps, x0w + self.eps
        if self.clip:
            lo, hi = lo.clamp_(min=0.0), hi.clamp_(max=1.0)
        return _round_toward(torch.clamp(x.to(wide), lo, hi), x0)


class L2Ball(ThreatModel):
    """{x : ||x - x0||_2 <= eps} ∩ [0, 1]^d, norms per example.

    step: ``x + step_size * grad / ||grad||_2``; project: ``x0 + delta / max(1, ||delta|| / eps)``,
    then clamp to [0, 1] (see Note [box clipping]).
    """

    norm = "l2"

    def random_init(self, x0: Tensor) -> Tensor:
        """x0 + r * u: u uniform on the unit sphere, r ~ U(0, eps) (the torchattacks start)."""
        direction = unit_l2(torch.randn_like(x0))
        radius = torch.rand_like(_per_example_norm(x0)) * self.eps  # (N, 1, ..., 1)
        return self._clip(x0 + radius * direction)

    def step(self, x: Tensor, grad: Tensor, step_size: float) -> Tensor:  # noqa: D102
        return x + step_size * unit_l2(grad)

    def project(self, x: Tensor, x0: Tensor) -> Tensor:  # noqa: D102
        wide = _wide(x0.dtype)
        x0w = x0.to(wide)
        delta = x.to(wide) - x0w
        norm = _per_example_norm(delta)
        # eps / max(||delta||, eps) without dividing by zero: 1 inside the ball, 0 when eps = 0.
        scale = (self.eps / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_max(1.0)
        return _round_toward(self._clip(x0w + delta * scale), x0)


THREAT_MODELS: dict[str, type[ThreatModel]] = {"linf": LinfBall, "l2": L2Ball}


def create_threat_model(norm: str, eps: float, *, clip: bool = True) -> ThreatModel:
    """Build a threat model by norm name.

    Args:
        norm: a key of `THREAT_MODELS` (``"linf"`` or ``"l2"``).
        eps: radius in [0, 1] pixel units, >= 0.
        clip: intersect the ball with [0, 1]^d.

    Raises:
        ValueError: unknown ``norm`` (the message lists the valid ones) or invalid ``eps``.
    """
    if norm not in THREAT_MODELS:
        raise ConfigError(f"unknown norm {norm!r}; valid norms: {sorted(THREAT_MODELS)}")
    return THREAT_MODELS[norm](eps, clip=clip)
