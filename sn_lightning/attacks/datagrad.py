"""DataGrad: data-gradient regularization (Ororbia, Kifer, Giles, Neural Computation 2017).

Objective (arXiv 1601.07213): ``L_DG = mean_i [ L_i(x_i) + lambda * R(J_i) ]``, ``J_i = grad_x L_i``
the gradient of example i's own loss, ``R = ||.||_1`` (``norm="l1"``) or ``||.||_2^2``
(``norm="l2"``). Two forms, both pure functions that return losses for the caller's single
``.backward()``; they take gradients with respect to the input only and never touch ``.grad``:

* exact (`datagrad_penalty`): double backprop; ``create_graph=True`` on ``grad_x``. One forward,
  and the caller's backward runs through the gradient graph (about 2-3x a plain step).
* finite difference (`datagrad_fd_loss`): ``grad_theta L(x + phi r) ~ grad_theta L(x) + phi *
  (d^2 L / dtheta dx) r`` with ``r = grad_J R(J)`` detached, so the gradient of
  ``(1 - lambda/phi) L(x) + (lambda/phi) L(x + phi r)`` approximates ``grad_theta L_DG``
  (2 forwards, 2 backwards). With ``norm="l1"``, ``r = sign(J)`` and ``x + phi r`` is FGSM with
  ``eps = phi``: the update is exactly FGSM training ``alpha L(x) + (1 - alpha) L(x_adv)``,
  ``alpha = 1 - lambda/phi``. With ``norm="l2"``, ``r = 2 J`` (the gradient of ``||J||^2``).

Note [per-example data gradient]
    ``grad_x`` of a *mean* loss is ``J_i / N``: the L1 penalty summed over the batch would not
    change, but the squared L2 one would shrink like ``1/N^2``. Both functions therefore
    differentiate the *summed* loss, so row i is ``J_i``, and average ``R(J_i)`` over examples.
    That holds while examples do not interact: a train-mode BatchNorm couples them through the
    batch statistics, and row i is then the gradient of the batch's summed loss with respect to
    ``x_i`` (``J_i`` plus the terms through the other examples' losses), which is what the
    penalty regularizes in that case (measured 4% above the per-example penalty on a small BN
    CNN at batch 64); models in eval mode or without batch statistics get ``J_i`` exactly.

Pitfalls for callers (PAPERS.md section 4): the FD form's second train-mode forward updates
BatchNorm running statistics with perturbed data; fused SDPA attention and ``torch.compile`` have
no double backward (exact form); under fp16 AMP pass the GradScaler's scale as ``grad_scale``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sn_lightning.errors import ConfigError

__all__ = ["DataGradTerms", "datagrad_fd_loss", "datagrad_penalty"]

_NORMS = ("l1", "l2")


def _check_norm(norm: str) -> None:
    if norm not in _NORMS:
        raise ConfigError(f"norm must be one of {list(_NORMS)}, got {norm!r}")


class DataGradTerms(NamedTuple):
    """What a DataGrad step needs: ``loss`` to backpropagate, the ``penalty`` and the clean logits.

    ``penalty`` is exact (with a graph) for `datagrad_penalty`; for `datagrad_fd_loss` it is the
    detached finite-difference estimate ``(L(x + phi r) - L(x)) / (k phi)`` of ``mean_i R(J_i)``,
    for logging: the difference estimates ``<J, r>`` and, R being homogeneous of degree k
    (1 for l1, 2 for the squared l2), ``<J, grad R(J)> = k R(J)`` (Euler), so both forms log the
    same quantity. ``logits`` (N, K) come from the clean forward.
    """

    loss: Tensor
    penalty: Tensor
    logits: Tensor


def datagrad_penalty(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: Literal["l1", "l2"] = "l1",
    *,
    grad_scale: float = 1.0,
    label_smoothing: float = 0.0,
) -> DataGradTerms:
    """Exact DataGrad by double backprop: the mean loss, the data-gradient penalty, the logits.

    Train with ``(loss + lam * penalty).backward()``. The model runs once, in its current mode.

    Args:
        model: maps (N, ...) inputs to (N, K) logits; must support double backward.
        x: inputs, (N, ...), in [0, 1]; not modified.
        y: integer labels, (N,).
        norm: ``"l1"``: ``R(J) = ||J||_1``; ``"l2"``: ``R(J) = ||J||_2^2``.
        grad_scale: multiply the loss by this before differentiating and divide the gradient by
            it afterwards (out of place), e.g. ``scaler.get_scale()`` under fp16 AMP so that
            ``J`` does not underflow. 1.0 otherwise.
        label_smoothing: of the cross-entropy (``F.cross_entropy``'s), in [0, 1).

    Returns:
        ``(loss, penalty, logits)``: ``loss = mean_i CE(f(x)_i, y_i)`` and
        ``penalty = mean_i R(grad_x CE(f(x)_i, y_i))``, scalars with graphs to the parameters.
    """
    _check_norm(norm)
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss_sum = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad(loss_sum * grad_scale, x, create_graph=True)
    grad = grad.flatten(1) / grad_scale  # (N, D): row i is J_i (Note [per-example data gradient])
    per_example = grad.abs().sum(dim=1) if norm == "l1" else grad.pow(2).sum(dim=1)  # (N,)
    return DataGradTerms(loss_sum / x.shape[0], per_example.mean(), logits)


def datagrad_fd_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lam: float,
    phi: float,
    norm: Literal["l1", "l2"] = "l1",
    *,
    clip: bool = False,
    label_smoothing: float = 0.0,
    grad_scale: float = 1.0,
) -> DataGradTerms:
    """Finite-difference DataGrad: ``(1 - lam/phi) L(x) + (lam/phi) L(x + phi * r)``.

    ``r = sign(J)`` (``"l1"``) or ``2 J`` (``"l2"``), ``J = grad_x`` of the summed loss at ``x``,
    detached; ``L`` is the mean cross-entropy. Its parameter gradient approximates that of
    ``L + lam * mean_i R(J_i)`` (exact as ``phi -> 0`` on smooth networks) and, for ``"l1"``,
    equals FGSM training with mixing weight ``alpha = 1 - lam/phi`` and ``eps = phi``.

    Args:
        model: maps (N, ...) inputs to (N, K) logits; runs twice, in its current mode.
        x: inputs, (N, ...), in [0, 1]; not modified.
        y: integer labels, (N,).
        lam: penalty weight lambda, in [0, phi].
        phi: finite-difference step (> 0), in input units; for ``"l1"`` the FGSM radius.
        norm: the penalty R, as in `datagrad_penalty`.
        clip: clamp ``x + phi * r`` to [0, 1] (breaks the finite-difference identity).
        label_smoothing: of the cross-entropy, in [0, 1).
        grad_scale: as in `datagrad_penalty` (fp16 AMP: the GradScaler's scale, so that ``J``
            does not underflow to 0, whose sign would leave ``x`` unperturbed).

    Returns:
        ``(loss, penalty, logits)``: the scalar loss to call ``.backward()`` on, the detached
        finite-difference penalty estimate and the clean logits.
    """
    _check_norm(norm)
    if not phi > 0.0:
        raise ConfigError(f"phi must be > 0, got {phi}")
    if not 0.0 <= lam <= phi:
        raise ConfigError(f"lam must be in [0, phi={phi}], got {lam}")
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss_clean = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad(loss_clean * grad_scale, x, retain_graph=True)
    grad = grad / grad_scale  # J_i per row, (N, ...)
    direction = grad.sign() if norm == "l1" else 2.0 * grad
    x_fd = x.detach() + phi * direction
    if clip:
        x_fd = x_fd.clamp(0.0, 1.0)
    loss_fd = F.cross_entropy(model(x_fd), y, label_smoothing=label_smoothing)
    w = lam / phi
    loss_mean = loss_clean / x.shape[0]
    degree = 1.0 if norm == "l1" else 2.0  # <J, r> = degree * R(J), DataGradTerms
    penalty = ((loss_fd - loss_mean) / (degree * phi)).detach()
    return DataGradTerms((1.0 - w) * loss_mean + w * loss_fd, penalty, logits)
