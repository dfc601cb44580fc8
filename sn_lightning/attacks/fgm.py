"""Fast gradient method (FGM): one steepest-ascent step of length eps."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from sn_lightning.attacks.base import LabelMode, _BallAttack

__all__ = ["FGM"]


class FGM(_BallAttack):
    r"""Fast gradient method: one step of length eps (FGSM for linf).

    FGSM in 'Explaining and Harnessing Adversarial Examples' [https://arxiv.org/abs/1412.6572];
    the l2 variant (Miyato et al.) as in Farnia et al. 2019 (arXiv 1811.07457).

    Distance Measure : Linf (FGSM) or L2

    ``x_adv = Proj(x + eps * d)``, ``d = sign(g)`` (linf) or ``g / ||g||_2`` per example (l2),
    ``g = grad_x CE(f(x), y)``; ``Proj`` clips to [0, 1] when ``clip`` (the ball constraint holds
    by construction).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius in [0, 1] pixel units (>= 0); exclusive with ``eps_rel``.
        eps_rel: radius as a fraction of the mean l2 norm of the training inputs (reference: 0.05
            for l2); resolve it with `resolve_eps` before use.
        clip: keep ``x_adv`` in [0, 1] (the reference does not clip).
        labels: ``"true"`` or ``"predicted"`` (argmax on the clean input; the reference's choice).
        eval_mode: attack the model in eval mode (default) or in its current modes.

    Shape:
        - x: :math:`(N, C, H, W)` (any (N, ...)), in [0, 1].
        - y: :math:`(N)` integer labels.
        - output: :math:`(N, C, H, W)`, detached.

    Examples::
        >>> attack = FGM(norm="linf", eps=8 / 255)
        >>> x_adv = attack(model, x, y)
    """

    def __init__(
        self,
        norm: Literal["linf", "l2"] = "linf",
        eps: float | None = None,
        eps_rel: float | None = None,
        *,
        clip: bool = True,
        labels: LabelMode = "true",
        eval_mode: bool = True,
    ) -> None:
        super().__init__(norm, eps, eps_rel, clip=clip, labels=labels, eval_mode=eval_mode)

    def _first_gradient_at_input(self) -> bool:
        return True

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:  # noqa: D102
        threat = self.threat_model()
        grad = self.gradient(model, x, y)
        return threat.project(threat.step(x, grad, threat.eps), x)

    def _repr_fields(self) -> dict[str, Any]:
        return {**super()._repr_fields(), "clip": self.clip}
