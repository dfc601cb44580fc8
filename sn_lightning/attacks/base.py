"""The attack base class: an input-space optimizer that takes the model at call time.

`Attack.__call__` owns every side effect so that subclasses only write the optimization loop
(`Attack.perturb`):

* the model runs in eval mode by default (BatchNorm uses running statistics, dropout is off,
  spectral-norm vectors are not advanced); the train/eval flag of **every submodule** is restored
  in ``finally``, so mixed modes (a frozen BatchNorm inside a training model) survive;
* with ``eval_mode=False`` the model keeps its current modes and all its buffers (BatchNorm running
  statistics, spectral-norm vectors) are saved before and written back after the attack;
* the loop runs inside ``torch.nn.utils.parametrize.cached()``, so parametrized weights (spectral
  normalization) are computed once per attack instead of once per step;
* gradients are taken with ``torch.autograd.grad`` with respect to the input only: parameters'
  ``.grad`` is never touched and no ``.backward()`` is called;
* in eval mode, every Conv → BatchNorm pair is folded into one convolution for the duration of
  the call (:func:`~sn_lightning.attacks.fold.folded_view`: the same function, fewer kernels per
  step; ``fold_batchnorm = False`` on an instance turns it off);
* grad mode is switched on (and inference mode off), so an attack can run inside a validation
  loop under ``torch.no_grad()`` or ``torch.inference_mode()``;
* devices and dtypes come from ``x``; the output is detached, with ``x``'s dtype and device;
  half and bfloat16 inputs are attacked with float32 iterates (the model sees them cast back to
  its dtype: Note [float32 iterates]), and the result is rounded toward ``x`` so it stays in the
  ball;
* :func:`in_attack` is True during the call, so training-time hooks (layerwise perturbation)
  neither perturb nor record the attack's own forwards and backwards, in any mode.

Note [predicted labels for free]
    With ``labels="predicted"`` the labels are ``argmax f(x)`` on the clean input. When an attack's
    first gradient is taken at ``x`` itself (FGM, WRM, PGD without random start), the forward that
    predicts the labels is kept with its graph and gives that first gradient too: one forward
    fewer than predicting under ``no_grad`` and then attacking (a third of FGM's cost). The
    gradient is handed to the subclass through `Attack.gradient` during the call, so an attack
    instance must not be called from two threads at once.

Note [float32 iterates]
    Under ``precision: bf16-true`` the batch reaches the attack in bfloat16, whose spacing is
    2^-8 = 0.0039 on [0.5, 1): a PGD step of 2/255 / 20 * 2 = 0.0008 added in bfloat16 rounds back
    to the pixel, and the attack never moves (robust accuracy silently overstated). The iterates
    are therefore kept in float32, where the steps add up, and only the model's input is cast to
    the model's dtype; the final point is rounded toward ``x``, coordinate by coordinate, so it
    stays in the ball and the box.
"""

from __future__ import annotations

import abc
import contextvars
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sn_lightning.attacks.fold import folded_view
from sn_lightning.attacks.threat import THREAT_MODELS, ThreatModel, _round_toward, _wide
from sn_lightning.errors import ConfigError

__all__ = ["Attack", "LabelMode", "in_attack", "input_gradient", "mean_input_norm"]

LabelMode = Literal["true", "predicted"]
_LABEL_MODES = ("true", "predicted")
_IN_ATTACK: contextvars.ContextVar[bool] = contextvars.ContextVar("sn_in_attack", default=False)


def in_attack() -> bool:
    """Whether an `Attack` call is running (in this thread / context)."""
    return _IN_ATTACK.get()


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the summed cross-entropy with respect to the input.

    The loss is summed over the batch (the reference's ``mean=False``), so row ``i`` of the result
    is the gradient of example ``i``'s own loss, not that divided by N (this also keeps fp16/bf16
    gradients away from underflow).

    Args:
        model: maps (N, ...) inputs to (N, K) logits.
        x: inputs, (N, ...); detached.
        y: integer labels, (N,).

    Returns:
        ``grad_x sum_i CE(model(x)_i, y_i)``, (N, ...), detached.
    """
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@torch.no_grad()
def mean_input_norm(batches: Iterable[Tensor | tuple[Any, ...] | list[Any]]) -> float:
    """Mean l2 norm of the inputs: the reference's scale C2 for relative radii (``eps_rel``).

    Args:
        batches: an iterable of input tensors (N, ...) or of ``(x, y, ...)`` tuples (a DataLoader).

    Returns:
        ``mean_i ||x_i||_2`` over all examples, in the units of the inputs ([0, 1] pixels).
    """
    total, count = 0.0, 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        total += float(torch.linalg.vector_norm(x.flatten(1).double(), dim=1).sum())
        count += x.shape[0]
    if count == 0:
        raise ValueError("mean_input_norm got no examples")
    return total / count


@contextmanager
def _attack_context(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Eval mode (or buffer snapshot), parametrize cache, grad on; restores everything."""
    modes = [(m, m.training) for m in model.modules()]
    saved: list[tuple[nn.Module, str, Tensor]] = []
    if not eval_mode:  # by (module, name): a module may rebind a buffer instead of writing it
        saved = [
            (m, name, b.detach().clone())
            for m in model.modules()
            for name, b in m.named_buffers(recurse=False)
        ]
    token = _IN_ATTACK.set(True)
    try:
        if eval_mode:
            model.eval()
        with torch.inference_mode(False), torch.enable_grad(), parametrize.cached():
            yield
    finally:
        _IN_ATTACK.reset(token)
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for m, name, value in saved:
                current = m._buffers.get(name)
                if current is not None and current.shape == value.shape:
                    current.copy_(value)
                else:
                    m._buffers[name] = value


def check_linf(norm: str, eps: float, given: str = "", hint: str = "") -> float:
    """``eps``, unless an linf radius covers the whole [0, 1] pixel range (e.g. 8 for 8/255)."""
    if norm == "linf" and eps >= 1.0:
        given = given or f"{eps:g}"
        hint = hint or f"did you mean {eps:g}/255 = {eps / 255:.4g}?"
        raise ConfigError(
            f"linf eps {given} >= 1 covers the whole [0, 1] pixel range; radii are in [0, 1] "
            f"pixel units ({hint})"
        )
    return eps


def check_l2_radius(eps: float, input_shape: tuple[int, ...], who: str) -> None:
    """Refuse an l2 radius that covers the whole [0, 1] input box (diameter ``sqrt(C H W)``).

    ``input_shape``: one input, no batch dim; ``who`` names the radius in the error.
    """
    diameter = math.sqrt(math.prod(input_shape))
    if eps >= diameter:
        raise ConfigError(
            f"{who}: l2 eps {eps:g} >= {diameter:.4g}, the diameter of the [0, 1] box of "
            f"{tuple(input_shape)} inputs, covers every input; radii are in [0, 1] pixel units"
        )


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_scalar(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = value > 0.0 if positive else value >= 0.0  # NaN fails both
    if not ok or value == float("inf"):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value}")
    return value


class _InputsAs(nn.Module):
    """``model`` on its input cast to ``dtype`` (Note [float32 iterates]): (N, ...) -> logits."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype))


class Attack(abc.ABC):
    """Base class: ``attack(model, x, y) -> x_adv``.

    Subclasses implement `perturb` (taking gradients through `gradient`); `__call__` handles
    modes, caching, grad mode, labels and restores the model (see the module docstring). Attacks
    hold only their configuration, so one instance can be shared between models, devices and
    processes (not between threads during a call, see Note [predicted labels for free]).

    Args:
        labels: ``"true"`` attacks the given labels; ``"predicted"`` attacks the model's prediction
            ``argmax f(x)`` on the clean input (the reference's choice, against label leaking,
            Kurakin et al. 2017), computed in the attack's mode.
        eval_mode: run the model in eval mode (default). ``False`` keeps the model's current
            modes (train-mode BatchNorm then uses batch statistics); buffers are restored after.

    Attributes:
        fold_batchnorm: in eval mode, attack a view of the model with Conv → BatchNorm pairs
            folded (same function; default True).
    """

    fold_batchnorm: bool = True

    def __init__(self, *, labels: LabelMode = "true", eval_mode: bool = True) -> None:
        if labels not in _LABEL_MODES:
            raise ConfigError(f"labels must be one of {list(_LABEL_MODES)}, got {labels!r}")
        self.labels = labels
        self.eval_mode = bool(eval_mode)

    # -- relative radii ------------------------------------------------------------------------
    @property
    def is_resolved(self) -> bool:
        """Whether every radius is absolute (True unless a relative radius awaits `resolve_eps`)."""
        return True

    def resolve_eps(self, mean_input_norm: float) -> Attack:
        """Turn relative radii into absolute ones; a no-op for attacks without them.

        Args:
            mean_input_norm: mean l2 norm of the training inputs (C2), see `mean_input_norm`.

        Returns:
            ``self``, for chaining.
        """
        _check_scalar("mean_input_norm", mean_input_norm, positive=True)
        return self

    # -- the call ------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Attack ``model`` at ``x``.

        Args:
            model: maps inputs (N, ...) in [0, 1] to logits (N, K). Pass the unwrapped module (not
                a DDP wrapper).
            x: clean inputs, (N, ...), floating point, in [0, 1].
            y: integer labels, (N,); required when ``labels="true"``, ignored otherwise.

        Returns:
            ``x_adv``, (N, ...), detached, with the dtype and device of ``x``.
        """
        if not self.is_resolved:
            raise RuntimeError(
                f"{type(self).__name__} has a relative radius; call "
                "attack.resolve_eps(mean_input_norm) before attacking (mean l2 norm of the "
                "training inputs, see sn_lightning.attacks.mean_input_norm)"
            )
        if not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if self.labels == "true":
            if y is None:
                raise ValueError('labels="true" needs y; pass labels or use labels="predicted"')
            if y.shape != x.shape[:1]:
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"y must hold integer class labels, got {y.dtype}")
            y = y.long()  # int32/uint8 labels (cross-entropy takes int64 only)
        with _attack_context(model, self.eval_mode):
            if self.eval_mode and self.fold_batchnorm:
                model = folded_view(model, x)
            x = x.detach()
            if x.is_inference():  # batches created under inference_mode cannot enter autograd
                x = x.clone()
            narrow = x
            if _wide(x.dtype) != x.dtype:  # Note [float32 iterates]
                model, x = _InputsAs(model, x.dtype), x.to(_wide(x.dtype))
            if self.labels == "predicted" and self._first_gradient_at_input():
                # Note [predicted labels for free]: the first step needs grad_x at x itself, so
                # the forward that predicts the labels also serves the first gradient.
                x_req = x.detach().requires_grad_(True)
                logits = model(x_req)
                y = logits.detach().argmax(dim=1)
                loss = F.cross_entropy(logits, y, reduction="sum")
                self._grad_at_x = (x, torch.autograd.grad(loss, x_req)[0])
            elif self.labels == "predicted":
                with torch.no_grad():
                    y = model(x).argmax(dim=1)
            else:
                assert y is not None
                y = y.detach().clone() if y.is_inference() else y.detach()
            try:
                x_adv = self.perturb(model, x, y)
            finally:
                self._grad_at_x = None
        return _round_toward(x_adv.detach().to(x.dtype), narrow).to(narrow.dtype)

    _grad_at_x: tuple[Tensor, Tensor] | None = None

    def _first_gradient_at_input(self) -> bool:
        """Whether `perturb` takes its first gradient at ``x`` itself (not at a random start)."""
        return False

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """`input_gradient`, reusing the one computed with the predicted labels when possible.

        Subclasses call this inside `perturb`. When ``labels="predicted"`` and the subclass
        declares (``_first_gradient_at_input``) that its first gradient is at the clean input, the
        gradient computed in `__call__` together with the labels is returned for that input
        object (identity check, once) instead of a second forward and backward.
        """
        cached = self._grad_at_x
        if cached is not None and cached[0] is x:
            self._grad_at_x = None
            return cached[1]
        return input_gradient(model, x, y)

    @abc.abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The optimization loop, called by `__call__` inside the attack context.

        Args:
            model: the model, already in the attack's mode; use `gradient` for gradients.
            x: clean inputs, (N, ...), detached, in [0, 1].
            y: labels to attack, (N,) (true or predicted).

        Returns:
            ``x_adv``, (N, ...).
        """

    # -- repr ----------------------------------------------------------------------------------
    def _repr_fields(self) -> dict[str, Any]:
        """The subclass's own constructor arguments, in signature order."""
        return {}

    def __repr__(self) -> str:
        items = {**self._repr_fields(), "labels": self.labels}
        if not self.eval_mode:
            items["eval_mode"] = False
        fields = ", ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in items.items()
        )
        return f"{type(self).__name__}({fields})"


class _BallAttack(Attack):
    """Shared configuration of attacks in a norm ball: ``norm``, ``eps`` or ``eps_rel``, ``clip``.

    Note [relative radius]
        The reference sets l2 radii relative to the data: ``eps = eps_rel * C2``, C2 the mean l2
        norm of the (preprocessed) training inputs (``eps_rel = 0.05``: "approximately 2.44 for
        CIFAR10"). An attack built with ``eps_rel`` is unresolved (``eps is None``) until
        `resolve_eps` is called once with C2 (from the data module, `mean_input_norm`); afterwards
        ``eps`` is absolute. Calling an unresolved attack raises.
    """

    def __init__(
        self,
        norm: Literal["linf", "l2"],
        eps: float | None,
        eps_rel: float | None,
        *,
        clip: bool,
        labels: LabelMode,
        eval_mode: bool,
    ) -> None:
        super().__init__(labels=labels, eval_mode=eval_mode)
        if norm not in THREAT_MODELS:
            raise ConfigError(f"unknown norm {norm!r}; valid norms: {sorted(THREAT_MODELS)}")
        if (eps is None) == (eps_rel is None):
            raise ConfigError(
                f"pass exactly one of eps (absolute, [0, 1] pixel units) and eps_rel (fraction of "
                f"the mean input l2 norm); got eps={eps!r}, eps_rel={eps_rel!r}"
            )
        self.norm = norm
        self.eps = None if eps is None else check_linf(norm, _check_scalar("eps", eps))
        self.eps_rel = None if eps_rel is None else _check_scalar("eps_rel", eps_rel)
        self.clip = bool(clip)

    @property
    def is_resolved(self) -> bool:
        return self.eps is not None

    def resolve_eps(self, mean_input_norm: float) -> _BallAttack:
        """Set ``eps = eps_rel * mean_input_norm`` (see Note [relative radius]); no-op if absolute.

        Args:
            mean_input_norm: mean l2 norm of the training inputs (C2), > 0.

        Returns:
            ``self``, for chaining.
        """
        c2 = _check_scalar("mean_input_norm", mean_input_norm, positive=True)
        if self.eps_rel is not None:
            self.eps = check_linf(
                self.norm,
                self.eps_rel * c2,
                f"eps_rel {self.eps_rel:g} x mean input norm {c2:.4g} = {self.eps_rel * c2:g}",
                f"use eps_rel below 1 / {c2:.4g} = {1 / c2:.4g}, an absolute eps, or norm l2",
            )
        return self

    def threat_model(self) -> ThreatModel:
        """The `ThreatModel` for the current (resolved) ``eps``."""
        if self.eps is None:
            raise RuntimeError(f"{type(self).__name__}: eps_rel is not resolved yet")
        return THREAT_MODELS[self.norm](self.eps, clip=self.clip)

    def _repr_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"norm": self.norm, "eps": self.eps}
        if self.eps_rel is not None:
            fields["eps_rel"] = self.eps_rel
        return fields
