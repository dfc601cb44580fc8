"""WRM: the Wasserstein-robust (Lagrangian-penalty) attack of Sinha, Namkoong, Duchi (ICLR 2018)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from sn_lightning.attacks.base import (
    Attack,
    LabelMode,
    _check_positive_int,
    _check_scalar,
)
from sn_lightning.errors import ConfigError

__all__ = ["WRM"]


class WRM(Attack):
    r"""Wasserstein robust method: gradient ascent on a Lagrangian-penalized loss (l2).

    WRM in 'Certifying Some Distributional Robustness with Principled Adversarial Training'
    [https://arxiv.org/abs/1710.10571], exactly as in Farnia et al. 2019 (``adversarial.wrm``).

    Distance Measure : L2 (Lagrangian penalty, no hard ball)

    Gradient ascent on ``phi(x') = c * CE(f(x'), y) - ||x' - x||^2 / 2``, ``c = 1 / (2 gamma)``
    (the reference's objective ``(CE - gamma ||x' - x||^2) / (2 gamma)``), CE summed per example::

        x' = x + c * grad_x CE(x)
        for t in 0 .. steps - 1:
            x' = x' + (1 / sqrt(t + 2)) * (c * grad_x CE(x') - (x' - x))

    so ``steps + 1`` gradient evaluations (reference: ``steps = 15``). With ``clip`` each iterate is
    clamped to [0, 1] (projected ascent; the reference does not clip).

    ``gamma`` is absolute, or relative: ``gamma = gamma_rel * C2`` with C2 the mean l2 norm of the
    training inputs, resolved by `resolve_eps` (reference: 0.04 on MNIST in [0, 1] units, as here;
    0.002 on CIFAR10/SVHN, but for per-image-whitened inputs: gamma has units of loss / length^2,
    so in [0, 1] pixel units that setting is ``gamma_w / s^2`` with s the images' pixel std, not
    ``0.002 * C2``; PAPERS 1.5).

    Args:
        gamma: Lagrange penalty (> 0); larger means smaller perturbations. Exclusive with
            ``gamma_rel``.
        gamma_rel: ``gamma`` as a fraction of the mean input l2 norm (> 0).
        steps: ascent iterations after the first step (>= 0).
        clip: clamp iterates to [0, 1].
        labels: ``"true"`` or ``"predicted"`` (argmax on the clean input; the reference's choice).
        eval_mode: attack the model in eval mode (default) or in its current modes.

    Shape:
        - x: :math:`(N, C, H, W)` (any (N, ...)), in [0, 1].
        - y: :math:`(N)` integer labels.
        - output: :math:`(N, C, H, W)`, detached.

    Examples::
        >>> attack = WRM(gamma_rel=0.04, labels="predicted")
        >>> attack.resolve_eps(mean_input_norm(train_loader))
        >>> x_adv = attack(model, x, y)
    """

    def __init__(
        self,
        gamma: float | None = None,
        gamma_rel: float | None = None,
        steps: int = 15,
        *,
        clip: bool = True,
        labels: LabelMode = "true",
        eval_mode: bool = True,
    ) -> None:
        super().__init__(labels=labels, eval_mode=eval_mode)
        if (gamma is None) == (gamma_rel is None):
            raise ConfigError(
                f"pass exactly one of gamma (absolute) and gamma_rel (fraction of the mean input "
                f"l2 norm); got gamma={gamma!r}, gamma_rel={gamma_rel!r}"
            )
        self.gamma = None if gamma is None else _check_scalar("gamma", gamma, positive=True)
        self.gamma_rel = (
            None if gamma_rel is None else _check_scalar("gamma_rel", gamma_rel, positive=True)
        )
        self.steps = _check_positive_int("steps", steps, minimum=0)
        self.clip = bool(clip)

    @property
    def is_resolved(self) -> bool:  # noqa: D102
        return self.gamma is not None

    def resolve_eps(self, mean_input_norm: float) -> WRM:
        """Set ``gamma = gamma_rel * mean_input_norm``; a no-op when ``gamma`` is absolute.

        Args:
            mean_input_norm: mean l2 norm of the training inputs (C2), > 0.

        Returns:
            ``self``, for chaining.
        """
        c2 = _check_scalar("mean_input_norm", mean_input_norm, positive=True)
        if self.gamma_rel is not None:
            self.gamma = self.gamma_rel * c2
        return self

    def _first_gradient_at_input(self) -> bool:
        return True

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        assert self.gamma is not None
        c = 1.0 / (2.0 * self.gamma)
        x_adv = x + c * self.gradient(model, x, y)
        if self.clip:
            x_adv = x_adv.clamp(0.0, 1.0)
        for t in range(self.steps):
            ascent = c * self.gradient(model, x_adv, y) - (x_adv - x)
            x_adv = x_adv + (1.0 / math.sqrt(t + 2)) * ascent
            if self.clip:
                x_adv = x_adv.clamp(0.0, 1.0)
        return x_adv

    def _repr_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"gamma": self.gamma}
        if self.gamma_rel is not None:
            fields["gamma_rel"] = self.gamma_rel
        return {**fields, "steps": self.steps, "clip": self.clip}
