"""Projected gradient descent (PGD, the reference's "PGM") with restarts and worst-case tracking."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sn_lightning.attacks.base import (
    LabelMode,
    _BallAttack,
    _check_positive_int,
    _check_scalar,
)
from sn_lightning.errors import ConfigError

__all__ = ["PGD"]


class PGD(_BallAttack):
    r"""Projected gradient descent in a norm ball, with restarts.

    PGD in 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083]; the reference's PGM (Farnia et al. 2019, arXiv 1811.07457).

    Distance Measure : Linf or L2

    From ``x_0 = x`` (or a random point of the ball), ``steps`` times:
    ``x_{t+1} = Proj(x_t + step_size * d_t)``, ``d_t = sign(g_t)`` (linf) or ``g_t / ||g_t||_2``
    (l2), ``g_t = grad_x sum_i CE(f(x_t)_i, y_i)``; ``Proj`` onto the ball ∩ [0, 1]^d. The
    reference: 15 steps, ``step_size = 2 * eps / steps``, no random start, no clipping, predicted
    labels.

    With ``restarts > 1`` the loop is rerun from fresh random starts on the examples that are
    still classified correctly, and each example keeps its worst case over restarts:
    a misclassified iterate, else the one with the highest loss (one extra forward per restart).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius in [0, 1] pixel units (>= 0); exclusive with ``eps_rel``.
        eps_rel: radius as a fraction of the mean l2 norm of the training inputs (reference: 0.05
            for l2); resolve it with `resolve_eps` before use.
        steps: number of gradient steps (>= 1).
        step_size: step length in the attack's norm; ``None`` -> ``2 * eps / steps``
            (the reference's choice, evaluated with the resolved ``eps``).
        random_start: start from a random point of the ball (Madry et al.) instead of ``x``.
        restarts: number of runs (>= 1); more than one needs ``random_start=True``.
        clip: keep iterates in [0, 1] (the reference does not clip).
        labels: ``"true"`` or ``"predicted"`` (argmax on the clean input; the reference's choice).
        eval_mode: attack the model in eval mode (default) or in its current modes.

    Shape:
        - x: :math:`(N, C, H, W)` (any (N, ...)), in [0, 1].
        - y: :math:`(N)` integer labels.
        - output: :math:`(N, C, H, W)`, detached.

    Examples::
        >>> attack = PGD(norm="linf", eps=8 / 255, steps=10, step_size=2 / 255)
        >>> x_adv = attack(model, x, y)
    """

    def __init__(
        self,
        norm: Literal["linf", "l2"] = "linf",
        eps: float | None = None,
        eps_rel: float | None = None,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = False,
        restarts: int = 1,
        *,
        clip: bool = True,
        labels: LabelMode = "true",
        eval_mode: bool = True,
    ) -> None:
        super().__init__(norm, eps, eps_rel, clip=clip, labels=labels, eval_mode=eval_mode)
        self.steps = _check_positive_int("steps", steps)
        self.step_size = (
            None if step_size is None else _check_scalar("step_size", step_size, positive=True)
        )
        self.random_start = bool(random_start)
        self.restarts = _check_positive_int("restarts", restarts)
        if self.restarts > 1 and not self.random_start:
            raise ConfigError(
                f"restarts={restarts} repeats the same deterministic run; set random_start=True"
            )

    def effective_step_size(self) -> float:
        """The step length used: ``step_size``, or ``2 * eps / steps`` when it is None."""
        if self.step_size is not None:
            return self.step_size
        if self.eps is None:
            raise RuntimeError("PGD: eps_rel is not resolved yet")
        return 2.0 * self.eps / self.steps

    def _first_gradient_at_input(self) -> bool:
        return not self.random_start

    def _run(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """One PGD run from ``x`` (or a random start): (N, ...) -> (N, ...)."""
        threat = self.threat_model()
        step_size = self.effective_step_size()
        x_adv = threat.random_init(x) if self.random_start else x
        for _ in range(self.steps):
            grad = self.gradient(model, x_adv, y)
            x_adv = threat.project(threat.step(x_adv, grad, step_size), x)
        return x_adv

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        x_best = self._run(model, x, y)
        if self.restarts == 1:
            return x_best
        with torch.no_grad():
            logits = model(x_best)
            best_fooled = logits.argmax(dim=1) != y  # (N,)
            best_loss = F.cross_entropy(logits, y, reduction="none")  # (N,)
        for _ in range(self.restarts - 1):
            idx = (~best_fooled).nonzero().squeeze(1)  # examples still classified correctly
            if idx.numel() == 0:
                break
            x_new = self._run(model, x[idx], y[idx])
            with torch.no_grad():
                logits = model(x_new)
                fooled = logits.argmax(dim=1) != y[idx]
                loss = F.cross_entropy(logits, y[idx], reduction="none")
                better = fooled | (loss > best_loss[idx])
                idx, x_new = idx[better], x_new[better]
                x_best[idx] = x_new
                best_fooled[idx] = fooled[better]
                best_loss[idx] = loss[better]
        return x_best

    def _repr_fields(self) -> dict[str, Any]:
        return {
            **super()._repr_fields(),
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "clip": self.clip,
        }
