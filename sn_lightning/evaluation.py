"""Framework-free evaluation loops: accuracy, loss and margins of a classifier over a data loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sn_lightning.modes import eval_mode


def logit_margins(logits: Tensor, y: Tensor) -> Tensor:
    """f_y - max_{j != y} f_j per example (N,); > 0 iff correctly classified (ties count as errors)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return true - other


def worse_logits(clean: Tensor, adversarial: Tensor, y: Tensor) -> Tensor:
    """Per example, the logits (N, K) of whichever of x and x_adv has the lower margin at ``y``.

    Robust accuracy counts a point only if the whole ball is classified correctly, x itself
    included: an attack on predicted labels moves a misclassified x away from its wrong class,
    often onto the true one, which the attack's own accuracy would count as robust.
    """
    take_clean = logit_margins(clean, y) < logit_margins(adversarial, y)
    return torch.where(take_clean[:, None], clean, adversarial)


Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _input_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating parameters, else None.

    ``precision: 64-true`` or ``bf16-true`` converts the parameters, and Lightning converts the
    batches of its own loops; batches given here are converted to match.
    """
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str | None = None,
    *,
    attack: Attack | None = None,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Accuracy, mean cross-entropy and margin statistics of `model` in eval mode over `batches`.

    Args:
        model: maps images (N, C, H, W) in [0, 1] to logits (N, K); its train/eval mode is restored.
        batches: (x, y) pairs, e.g. a DataLoader.
        device: where to run; None: the model's parameter device.
        attack: ``attack(model, x, y) -> x_adv``; the numbers are then robust: per example
            those of the worse of x and x_adv (:func:`worse_logits`; a clean error is never
            robust), and ``attack_acc`` is the accuracy on x_adv alone (the seed paper's measure
            under its predicted-label attacks, which can count a clean error as correct).
        max_examples: evaluate the first this many examples (at most); None: all.

    Returns:
        ``{"acc", "loss", "margin_mean", "margin_median", "n"}`` over all examples, and
        ``"attack_acc"`` with an attack.
    """
    if device is None:
        device = next(model.parameters()).device
    dtype = _input_dtype(model)
    correct, attack_correct, loss, n, margins = 0, 0, 0.0, 0, []
    with eval_mode(model):  # each submodule's own mode comes back (a frozen BatchNorm stays)
        for x, y in batches:
            if max_examples is not None and n + len(y) > max_examples:  # the first rows only
                x, y = x[: max_examples - n], y[: max_examples - n]
            x, y = x.to(device, dtype=dtype if x.is_floating_point() else None), y.to(device)
            if attack is not None:
                x_adv = attack(model, x, y)
                with torch.no_grad():
                    adversarial = model(x_adv).float()
                    logits = worse_logits(model(x).float(), adversarial, y)
                attack_correct += int((adversarial.argmax(dim=1) == y).sum())
            else:
                with torch.no_grad():
                    logits = model(x).float()
            correct += int((logits.argmax(dim=1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            margins.append(logit_margins(logits, y).cpu())
            n += len(y)
            if max_examples is not None and n >= max_examples:
                break
    if n == 0:
        raise ValueError("evaluate() got no examples")
    m = torch.cat(margins)
    out = {
        "acc": correct / n,
        "loss": loss / n,
        "margin_mean": float(m.mean()),
        "margin_median": float(m.median()),
        "n": n,
    }
    if attack is not None:
        out["attack_acc"] = attack_correct / n
    return out
