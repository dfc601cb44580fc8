"""Pure math for exact spectral normalization: layer operators, power iteration, norm bounds.

A layer here is the *linear* map x -> layer(x) - bias on ONE input of a fixed shape: a matrix for
``nn.Linear``, a (strided, padded, dilated, grouped) convolution operator for ``nn.Conv1d/2d/3d``
and ``nn.ConvTranspose1d/2d/3d``. Its spectral norm ``||A||_2`` is the layer's l2 Lipschitz
constant. Nothing in this module holds state or picks a device: tensors come in, tensors go out.

Note [operator norm depends on input size]
    For a convolution, ``||A||_2`` depends on the spatial input size (zero padding truncates the
    kernel at the border) and grows with it towards the circular (FFT) bound of Sedghi et al.
    (2019). The reshaped kernel norm ``||M||_2`` (M = W.reshape(C_out, -1), what
    ``torch.nn.utils.parametrizations.spectral_norm`` uses) satisfies
    ``||M|| <= ||A|| <= sqrt(ceil(kh/s) * ceil(kw/s)) * ||M||`` on inputs that are large
    compared to the kernel (PAPERS 1.4), so it underestimates by up to k; on tiny maps it can
    overestimate instead (a 3x3 conv on a 1x1 map is its centre tap: ResNet-18's last stage at
    32 px has ``||M|| = 2 ||A||``, benchmarks/sigma_accuracy.py). Every function here therefore
    takes the layer's real input shape.

Note [power iteration is a lower bound]
    ``sigma = ||A u||`` with ``u`` a unit vector (or ``||A^T v||`` with ``v`` one) is
    ``<= ||A||_2`` at every iterate and only approaches the norm from below. A certificate needs
    :func:`operator_norm_upper_bound`.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sn_lightning.errors import ConfigError
from sn_lightning.modes import eval_mode

__all__ = [
    "LinearOp",
    "OperatorSpec",
    "conv_operator",
    "conv_transpose_operator",
    "dense_operator_norm",
    "forward_kind",
    "linear_operator",
    "operator_norm",
    "operator_norm_upper_bound",
    "power_iteration",
    "rescale",
]

LinearOp = Callable[[Tensor], Tensor]
PaddingMode = Literal["zeros", "circular", "reflect", "replicate"]
PADDING_MODES: tuple[str, ...] = ("zeros", "circular", "reflect", "replicate")
# Supported layer types, in the order error messages list them.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
# Above this many rows or columns (the smaller of the two), the upper bound switches from the exact
# dense norm to the FFT bound. With the Kronecker form and the certified top eigenvalue, 2048 keeps
# one bound under ~0.5 s on two CPU cores.
DENSE_MAX_DIM = 2048
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# Note [subclass forwards]
#     A subclass of a supported layer that overrides ``forward`` (or a convolution's
#     ``_conv_forward``) may compute another map (timm's StdConv2d standardizes its weight first),
#     so its operator is unknown unless its forward is one of these, found by (module, class) so
#     that timm is never imported here: timm's ``Linear`` is the base's map (it only casts dtypes
#     under TorchScript); timm's ``Conv2dSame`` (tf_* EfficientNets and other TensorFlow ports)
#     is TensorFlow's 'SAME' zero padding, computed from the input size at each call with the odd
#     pixel on the right and bottom, then an unpadded convolution (its ``padding`` attribute is 0
#     and unused).
_KNOWN_FORWARDS: dict[tuple[str, str], str] = {
    ("timm.layers.linear", "Linear"): "base",
    ("timm.layers.conv2d_same", "Conv2dSame"): "tf_same",
}


# The methods a layer's map runs through: one patched on an instance (a LoRA or quantization
# wrapper's ``layer._conv_forward = ...``) changes the map as a subclass's override would.
_MAP_METHODS = ("forward", "_conv_forward", "_output_padding")


def forward_kind(layer: nn.Module) -> str | None:
    """How a supported layer maps its input (Note [subclass forwards]).

    Returns ``"base"`` (the torch layer's own map), ``"tf_same"`` (timm's ``Conv2dSame``) or None
    (a subclass whose forward is unknown, or not a supported layer).
    """
    base = next((b for b in SUPPORTED_LAYERS if isinstance(layer, b)), None)
    if base is None:
        return None
    if any(name in vars(layer) for name in _MAP_METHODS):  # patched on this one instance
        return None
    cls = type(layer)
    if parametrize.is_parametrized(layer):
        # torch.nn.utils.parametrize injects a subclass; the layer's map is its base class's
        # (the injected class may carry this package's fused training forward, the same map)
        cls = cls.__bases__[0]
    if base is not nn.Linear and cls._conv_forward is not base._conv_forward:  # type: ignore[attr-defined]
        return None
    if hasattr(base, "_output_padding") and cls._output_padding is not base._output_padding:  # type: ignore[attr-defined]
        return None  # a transposed convolution with other output sizes than its attributes say
    if cls.forward is base.forward:
        return "base"
    for (module, name), kind in _KNOWN_FORWARDS.items():
        known = getattr(sys.modules.get(module), name, None)
        if isinstance(known, type) and isinstance(layer, known) and cls.forward is known.forward:
            return kind
    return None


def batchnorm_act(module: nn.Module) -> bool:
    """True for timm's ``BatchNormAct2d`` or ``SyncBatchNormAct`` with their own forwards.

    Their forward is BatchNorm's (``F.batch_norm`` with the module's weight and running
    statistics; ``SyncBatchNorm``'s in the synchronized one) followed by the ``drop`` and ``act``
    modules (EfficientNet, RegNet, CSPNet, ...), so a bound on the scale is a bound on the
    BatchNorm part (Note [subclass forwards]; timm is not imported here).
    """
    norm_act = sys.modules.get("timm.layers.norm_act")
    for known in (
        getattr(norm_act, "BatchNormAct2d", None),
        getattr(norm_act, "SyncBatchNormAct", None),
    ):
        if isinstance(known, type) and isinstance(module, known):
            return type(module).forward is known.forward
    return False


def tf_same_padding(
    spatial: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """TensorFlow 'SAME' (left, right) zero padding per spatial dim: output ``ceil(n / s)``.

    The total ``max((ceil(n / s) - 1) s + (k - 1) d + 1 - n, 0)`` is split with the odd pixel on
    the right, as timm's ``pad_same``.
    """
    pads = []
    for n, k, s, d in zip(spatial, kernel_size, stride, dilation, strict=True):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


# --------------------------------------------------------------------------- power iteration


def _transforms_active() -> bool:
    """True inside a ``torch.func`` transform (``jvp``, ``jacrev``, ``vmap``, ``grad`` ...).

    Custom ``autograd.Function`` fast paths and in-place buffer writes step aside there.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _check_n_iter(n_iter: int) -> None:
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")


def check_input_shape(input_shape: object) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (one input, no batch dim), else ValueError."""
    try:
        shape = tuple(input_shape)  # type: ignore[arg-type]
    except TypeError:
        shape = ()
    if not shape or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ConfigError(
            f"input_shape must be a sequence of positive ints, one input without the batch dim "
            f"(e.g. (3, 32, 32)), got {input_shape!r}"
        )
    return tuple(int(d) for d in shape)


def _unit_blocks(t: Tensor, blocks: int, min_norm: float) -> tuple[Tensor, Tensor]:
    """``(t with each block scaled to norm 1, the block norms (blocks,))``; see Note [blocks].

    A block that is (numerically) zero restarts at the uniform unit vector, so a channel group
    whose weights were zero, or whose part of ``u`` a checkpoint holds as zeros, can come back.
    """
    flat = t.reshape(blocks, -1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    restart = flat.new_full((), flat.shape[1] ** -0.5)
    unit = torch.where(
        (norms > min_norm)[:, None], flat / norms.clamp_min(min_norm)[:, None], restart
    )
    return unit.reshape(t.shape), norms


def _top_block(t: Tensor, norms: Tensor, blocks: int) -> Tensor:
    """``t`` with every block but the one of the largest norm set to 0 (no host sync)."""
    mask = torch.arange(blocks, device=t.device) == norms.argmax()  # one block, even on ties
    return (t.reshape(blocks, -1) * mask[:, None]).reshape(t.shape)


# Note [blocks]
#     A grouped convolution (depthwise included) is block diagonal: group g maps its input
#     channels to its output channels and nothing else, and ||A|| = max_g ||A_g||. One power
#     iteration on the whole of A loses the weaker groups: their share of u shrinks by
#     (sigma_g / sigma_max)^2 a round and underflows to exactly 0 in float32, after which
#     training can grow such a group past the others unseen (a depthwise layer of
#     torchvision's MNASNet: 145 of 576 channel groups at 0 after the 20 warm-up rounds; a
#     layer measured at 1.8 beta after five SGD steps and any number of refresh rounds). With
#     ``blocks = groups`` every group runs its own iteration on the same products: u and v are
#     normalized per group (each group's part of u is a unit vector), sigma is the largest
#     group's estimate, and the pair ``(u, v)`` returned for sigma's gradient is that group's
#     alone (zeros elsewhere), so ``sigma = <A u, v>`` still holds. Each group also converges
#     at its own spectral gap, not at the gap between the two strongest groups.


def _power_iteration(
    op: LinearOp,
    adjoint: LinearOp,
    u: Tensor,
    n_iter: int,
    min_norm: float = 1e-12,
    blocks: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Power iteration on A^T A; returns (u, v, sigma) with sigma = <A u, v> = ||A^T v||.

    ``blocks > 1``: per-group rounds of a block-diagonal A (Note [blocks]); u and v then have a
    unit vector in every group and sigma is the largest group's ``||A_g^T v_g||``.
    """
    _check_n_iter(n_iter)
    norm = torch.linalg.vector_norm  # not Tensor.norm: its Python wrapper costs ~10 us a call
    if blocks > 1:
        for _ in range(n_iter):
            v, _ = _unit_blocks(op(u), blocks, min_norm)
            u, sigmas = _unit_blocks(adjoint(v), blocks, min_norm)
        return u, v, sigmas.max()
    u = u / norm(u).clamp_min(min_norm)  # _next_u may hand the start back: unit, as _estimate's
    for _ in range(n_iter):
        v = op(u)
        v = v / norm(v).clamp_min(min_norm)
        w = adjoint(v)
        sigma = norm(w)
        u = _next_u(w, sigma, u, min_norm)
    return u, v, sigma


def _next_u(w: Tensor, w_norm: Tensor, u: Tensor, min_norm: float) -> Tensor:
    """``w / ||w||``, or the unit ``u`` it came from where ``w = A^T A u`` is (numerically) zero.

    Note [zero u]
        A zero weight (a zero-initialized head) maps every ``u`` to 0; normalizing that 0 stored
        ``u = 0`` for good (at registration already), sigma stayed 0 once training made the
        weight non-zero, and the layer was never rescaled. Keeping the random ``u`` lets the
        iteration find the weight as it grows; a zero ``u`` loaded from a checkpoint restarts
        at load (``BoundedSpectralNorm._load_from_state_dict``), grouped blocks at their uniform
        vector (:func:`_unit_blocks`). No host sync (CUDA graphs).
    """
    return torch.where(w_norm > min_norm, w / w_norm.clamp_min(min_norm), u)


def _estimate(
    op: LinearOp,
    adjoint: LinearOp,
    u: Tensor,
    n_iter: int,
    min_norm: float = 1e-12,
    *,
    advance: bool = True,
    blocks: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One forward's estimate: ``(u, v, sigma, u_next)`` with ``sigma = ||A u|| = <A u, v>``.

    ``blocks > 1`` (Note [blocks]): sigma is the largest group's ``||A_g u_g||``, ``(u, v)``
    that group's unit pair (zeros elsewhere) and ``u_next`` advances every group.

    Note [estimate, then advance]
        ``n_iter - 1`` full rounds from ``u``, then ``sigma = ||A u||`` for that unit ``u`` and
        ``v = A u / sigma``; ``advance`` then takes one more half round,
        ``u_next = A^T v / ||A^T v||``, the vector to store. Per training forward that is
        the same two products per round as Miyato et al.'s ``sigma = ||W v||`` after
        ``v = W^T u / ||.||``: with ``u`` on the input side, the adjoint half of the round is
        taken at the end of the previous step (one optimizer step earlier). The forward
        product ``A u`` is the one a layer can compute inside its own batch
        (:mod:`sn_lightning.spectral.fused`), and forwards that do not store (eval, frozen)
        need that product alone. ``sigma <= ||A||_2`` for any unit ``u``.
    """
    _check_n_iter(n_iter)
    norm = torch.linalg.vector_norm
    if blocks > 1:
        if n_iter > 1:
            u, _, _ = _power_iteration(op, adjoint, u, n_iter - 1, min_norm, blocks)
        else:
            u, _ = _unit_blocks(u, blocks, min_norm)
        v, sigmas = _unit_blocks(op(u), blocks, min_norm)
        sigma = sigmas.max()
        u_top, v_top = _top_block(u, sigmas, blocks), _top_block(v, sigmas, blocks)
        if not advance:
            return u_top, v_top, sigma, None
        return u_top, v_top, sigma, _unit_blocks(adjoint(v), blocks, min_norm)[0]
    if n_iter > 1:
        u, _, _ = _power_iteration(op, adjoint, u, n_iter - 1, min_norm)
    else:  # the stored vector is unit; a loaded one may not be (never 0: Note [zero u])
        u = u / norm(u).clamp_min(min_norm)
    Au = op(u)
    sigma = norm(Au)
    v = Au / sigma.clamp_min(min_norm)
    if not advance:
        return u, v, sigma, None
    w = adjoint(v)
    return u, v, sigma, _next_u(w, norm(w), u, min_norm)


# Note [Krylov refresh]
#     Power iteration converges at the ratio of the top two singular values: where they nearly tie
#     (a cluster at the top, common at random init), 100 rounds leave sigma 1-2% low (timm
#     LeViT-128S's ``stem.conv3`` after five SGD steps: 0.988 of the norm; DLA-34's stem after 20
#     rounds 0.913), and the rescaled layer that much above beta. The warm-up at registration,
#     :func:`~sn_lightning.spectral.parametrization.refresh_spectral_norm`, :func:`operator_norm`
#     and the report's sigma therefore run Golub-Kahan-Lanczos bidiagonalization on the same
#     products instead: ``k`` steps (``k`` products with ``A`` and ``k`` with ``A^T``) build the
#     Krylov space ``{u, (A^T A) u, ..., (A^T A)^k u}``, which contains the power iterate of ``k``
#     rounds, and take ``u = A^T w / ||A^T w||`` for the unit ``w`` in ``A K_k`` that ``A^T``
#     stretches most, so its ``||A u||`` is never below the power iterate's (exact arithmetic,
#     within one cycle; :func:`_krylov_cycle`) and converges at about the square root of the gap
#     (same cases: 0.999998 and 1.0000 of the norm). Each block (Note [blocks]) runs its own
#     bidiagonalization on the shared products. Only the smaller side's basis is reorthogonalized
#     (Simon and Zha 2000: one-sided reorthogonalization keeps the singular values accurate;
#     measured the same to 1e-7 as both sides on five timm backbones, at half the cost), by
#     classical Gram-Schmidt, repeated where one pass removed over half the vector. A vector below
#     ``100 eps`` times the block's largest coefficient so far marks an invariant subspace (its
#     Ritz values are exact); the block goes on from a fixed-seed random vector orthogonal to its
#     basis, so a start on an exact lower singular vector, where power iteration stays for ever,
#     still finds the top; a block whose whole space is spanned stops. A cycle holds at most
#     ``KRYLOV_CYCLE`` steps (at least 4; fewer than 20 only where both bases would exceed
#     ``KRYLOV_BYTES``); longer runs restart from the cycle's vector (a restart seeds its
#     generator anew), and stop once a cycle gains no block more than ``KRYLOV_RTOL`` (relative,
#     pro rata for shorter cycles): a converged ``u`` costs one cycle. The per-forward iteration
#     stays the paper's power round: a Krylov step needs the whole basis, a training step keeps
#     only ``u``.
KRYLOV_CYCLE = 20
KRYLOV_BYTES = 1 << 28
KRYLOV_RTOL = 1e-6


def _project_out(x: Tensor, basis: Tensor) -> Tensor:
    """``x (blocks, n)`` minus its projection on the orthonormal rows of ``basis (blocks, j, n)``."""
    if x.shape[0] == 1:  # one block: two matrix-vector products
        return torch.addmv(x[0], basis[0].mT, basis[0] @ x[0], alpha=-1)[None]
    coef = (basis * x[:, None]).sum(-1)  # many small blocks: elementwise beats batched products
    return x - (basis * coef[:, :, None]).sum(1)


def _orthogonalize(x: Tensor, basis: Tensor) -> Tensor:
    """:func:`_project_out`, twice where once lost most of ``x`` (Kahan: twice is enough)."""
    before = torch.linalg.vector_norm(x, dim=1)
    x = _project_out(x, basis)
    if bool((torch.linalg.vector_norm(x, dim=1) < 0.5 * before).any()):
        x = _project_out(x, basis)
    return x


def _krylov_cycle(
    op: LinearOp, adjoint: LinearOp, u: Tensor, max_steps: int, blocks: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Up to ``max_steps`` Golub-Kahan steps from the unit (per block) ``u``.

    Step ``j`` takes ``A p_j = beta_{j-1} q_{j-1} + alpha_j q_j`` and
    ``A^T q_j = alpha_j p_j + beta_j p_{j+1}``: after ``k`` steps ``A^T Q_k = P_{k+1} B^T`` with
    orthonormal ``P`` (input side), ``Q`` (output side) and ``B`` the ``k x (k+1)`` upper
    bidiagonal of the coefficients. For the top singular triple ``(x, s, y)`` of ``B``,
    ``u = P_{k+1} y = A^T w / s`` with ``w = Q_k x`` the unit vector of ``span Q_k = A K_k``
    that ``A^T`` stretches most, so ``||A u|| >= s``; the power iterate after ``k`` rounds is
    ``A^T`` of a vector in that span, so this ``u`` is never below it (exact arithmetic).

    Returns:
        ``(P y`` (not normalized), ``s`` per block and the start's ``||A u_0||`` per block (both
        on the CPU), the number of steps taken``)``: fewer than ``max_steps`` where the bases
        would exceed ``KRYLOV_BYTES`` (at least 4) or every block's space is spanned.
    """
    shape, dtype, device = u.shape, u.dtype, u.device
    tol = 100 * torch.finfo(dtype).eps
    Ap = op(u)
    out_shape = tuple(Ap.shape)
    n, m = u.numel() // blocks, Ap.numel() // blocks
    per_step = u.element_size() * (u.numel() + Ap.numel()) * (2 if blocks > 1 else 1)
    steps = min(max_steps, max(4, min(KRYLOV_CYCLE, KRYLOV_BYTES // per_step)))
    right_side = n <= m  # reorthogonalize the smaller side only
    P = u.new_empty(blocks, steps + 1, n)  # rows: the input-side basis of each block
    Q = Ap.new_empty(blocks, steps, m)
    P[:, 0] = u.reshape(blocks, n)
    alpha, beta = u.new_zeros(blocks, steps), u.new_zeros(blocks, steps)
    alive = torch.ones(blocks, dtype=torch.bool, device=device)  # finite, space not exhausted
    scale = u.new_zeros(blocks)  # each block's largest coefficient so far
    gen: torch.Generator | None = None

    def split(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x's norms, which are kept (finite, above the breakdown level), x normalized there)."""
        nonlocal alive, scale
        norms = torch.linalg.vector_norm(x, dim=1)
        finite = torch.isfinite(norms)
        alive = alive & finite
        scale = torch.maximum(scale, torch.where(finite, norms, 0.0))
        keep = alive & (norms > tol * scale)
        x = x / norms.clamp_min(1e-30)[:, None]
        if bool(keep.all()):
            return norms, keep, x
        return torch.where(keep, norms, 0.0), keep, torch.where(keep[:, None], x, 0.0)

    taken = 0
    for j in range(steps):
        if j:
            Ap = op(P[:, j].reshape(shape))
        q = Ap.reshape(blocks, m)
        if j:
            q = q - beta[:, j - 1, None] * Q[:, j - 1]
            if not right_side:
                q = _orthogonalize(q, Q[:, :j])
        alpha[:, j], _, Q[:, j] = split(q)  # not kept: A p_j in the span so far, alpha_j = 0
        r = adjoint(Q[:, j].reshape(out_shape)).reshape(blocks, n) - alpha[:, j, None] * P[:, j]
        if right_side:
            r = _orthogonalize(r, P[:, : j + 1])
        beta[:, j], keep, p = split(r)
        taken = j + 1
        if not bool(keep.all()):  # an invariant subspace: go on from a random orthogonal vector
            if gen is None:
                gen = torch.Generator(device=device).manual_seed(seed)
            z = torch.randn(blocks, n, generator=gen, device=device, dtype=dtype)
            z = _orthogonalize(z, P[:, : j + 1])
            z_norms = torch.linalg.vector_norm(z, dim=1)
            alive = alive & (keep | (z_norms > 1e-3 * math.sqrt(n)))  # else: all of the space
            p = torch.where(keep[:, None], p, z / z_norms.clamp_min(1e-30)[:, None])
            p = torch.where(alive[:, None], p, 0.0)
        P[:, j + 1] = p
        if not bool(alive.any()):
            break
    B = u.new_zeros(blocks, taken, taken + 1)
    idx = torch.arange(taken, device=device)
    B[:, idx, idx], B[:, idx, idx + 1] = alpha[:, :taken], beta[:, :taken]
    B = B.detach().to("cpu", torch.float64)
    _, S, Vh = torch.linalg.svd(B, full_matrices=False)
    y = Vh[:, 0, :]  # (blocks, taken + 1)
    first = torch.zeros_like(y)
    first[:, 0] = 1.0
    y = torch.where(S[:, :1] > 0, y, first)  # nothing learnt: keep u
    y = y * torch.where(y[:, :1] < 0, -1.0, 1.0)  # sign: the start vector's side
    top = torch.bmm(y[:, None].to(device, dtype), P[:, : taken + 1])[:, 0].reshape(shape)
    return top, S[:, 0], B[:, 0, 0], taken


def _krylov_top(
    op: LinearOp,
    adjoint: LinearOp,
    u: Tensor,
    n_iter: int,
    min_norm: float = 1e-12,
    blocks: int = 1,
    rtol: float = KRYLOV_RTOL,
) -> Tensor:
    """The top right singular vector estimate by at most ``n_iter`` Krylov steps.

    Note [Krylov refresh]: cycles of up to ``KRYLOV_CYCLE`` Golub-Kahan steps (``A`` and
    ``A^T`` once each a step, as a power round), each from the previous cycle's vector; it
    stops once a cycle raised no block's estimate by more than ``rtol`` (relative; pro rata for
    a shorter cycle) over the value it started from. Returns ``u`` with a unit vector per block.
    """
    _check_n_iter(n_iter)
    u, _ = _unit_blocks(u, blocks, min_norm)
    done = 0
    while done < n_iter:
        top, ritz, start, steps = _krylov_cycle(op, adjoint, u, n_iter - done, blocks, done)
        done += steps
        u, _ = _unit_blocks(top, blocks, min_norm)
        if bool((ritz <= start * (1 + rtol * steps / KRYLOV_CYCLE)).all()):  # no more to gain
            break
    return u


def _top_sigma(op: LinearOp, u: Tensor, blocks: int = 1) -> Tensor:
    """``max_g ||A_g u_g||`` for ``u`` with a unit vector per block: a lower bound of ``||A||``."""
    return torch.linalg.vector_norm(op(u).reshape(blocks, -1), dim=1).max()


def power_iteration(
    op: LinearOp, adjoint: LinearOp, u: Tensor, n_iter: int, *, min_norm: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Estimate ``||A||_2`` by ``n_iter`` rounds of power iteration on ``A^T A``.

    One round (Farnia et al. 2019, Algorithm 1)::

        v = A(u) / ||A(u)||;  u = A^T(v) / ||A^T(v)||;  sigma = ||A^T(v)|| = <A(u), v>

    Norms are whole-tensor norms, so ``u`` may have any shape ``op`` accepts.

    Args:
        op: the linear map A.
        adjoint: its exact adjoint A^T.
        u: start vector, shaped like an input of ``op`` (need not be normalized).
        n_iter: number of rounds, >= 1.
        min_norm: guard against division by zero.

    Returns:
        ``(u, sigma)``: the unit right singular vector estimate and ``sigma <= ||A||_2`` (a lower
        bound at every iterate; see Note [power iteration is a lower bound]).
    """
    u, _, sigma = _power_iteration(op, adjoint, u, n_iter, min_norm)
    return u, sigma


def rescale(weight: Tensor, sigma: Tensor, beta: float) -> Tensor:
    """The bounded rule ``W / max(1, sigma / beta)`` (Farnia et al. 2019, PAPERS 1.1).

    It only shrinks: layers with ``sigma <= beta`` keep their values. Differentiable in W and
    sigma; :class:`~sn_lightning.spectral.parametrization.BoundedSpectralNorm` uses a fused
    equivalent.
    """
    return weight / torch.clamp(sigma / beta, min=1.0).to(weight.dtype)


# --------------------------------------------------------------------------- operators


def _ntuple(x: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(x, int):
        return (x,) * n
    x = tuple(int(i) for i in x)
    if len(x) == 1:
        return x * n
    if len(x) != n:
        raise ValueError(f"expected an int or {n} values, got {x}")
    return x


def _resolve_padding(
    padding: str | int | Sequence[int],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """(left, right) padding per spatial dim; 'same' follows torch (extra pixel on the right)."""
    nd = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1, got stride={tuple(stride)}")
            pads = []
            for k, d in zip(kernel_size, dilation, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"unknown padding {padding!r}; valid: an int, a tuple, 'same', 'valid'")
    return tuple((p, p) for p in _ntuple(padding, nd))


def _flat_pads(pads: Sequence[tuple[int, int]]) -> list[int]:
    """F.pad order: last dim first."""
    out: list[int] = []
    for left, right in reversed(pads):
        out += [left, right]
    return out


def _pad_adjoint(y: Tensor, x_shape: Sequence[int], flat: list[int], mode: str) -> Tensor:
    """Adjoint of ``F.pad(., flat, mode)`` by autograd (exact; differentiable in y)."""
    with torch.enable_grad():
        x = torch.zeros(x_shape, dtype=y.dtype, device=y.device, requires_grad=True)
        (g,) = torch.autograd.grad(F.pad(x, flat, mode=mode), x, y, create_graph=y.requires_grad)
    return g


def linear_operator(weight: Tensor) -> tuple[LinearOp, LinearOp]:
    """``(A, A^T)`` for ``x -> x @ W^T`` with W ``(out, in)``; inputs ``(..., in)``."""
    return (lambda x: F.linear(x, weight)), (lambda y: F.linear(y, weight.t()))


def _conv_ops(
    weight: Tensor,
    spatial: Sequence[int],
    pads: Sequence[tuple[int, int]],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    padding_mode: str,
) -> tuple[LinearOp, LinearOp]:
    """Conv operator with resolved per-side padding; see :func:`conv_operator`."""
    nd = weight.dim() - 2
    conv, conv_t = _CONV[nd], _CONV_T[nd]
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads, strict=True))
    out_pad = tuple(
        (n - d * (k - 1) - 1) % s
        for n, k, d, s in zip(padded, weight.shape[2:], dilation, stride, strict=True)
    )
    if _use_matmul(weight, padded, dilation, stride, groups):
        return _matmul_conv_ops(weight, spatial, pads, stride, dilation, padding_mode)
    if padding_mode == "zeros" and all(lo == hi >= 0 for lo, hi in pads):
        p = tuple(lo for lo, _ in pads)

        def op(x: Tensor) -> Tensor:
            return conv(x, weight, None, stride, p, dilation, groups)

        def adjoint(y: Tensor) -> Tensor:
            return conv_t(y, weight, None, stride, p, out_pad, groups, dilation)

        return op, adjoint

    flat = _flat_pads(pads)
    unpad = [-p for p in flat]  # adjoint of a constant pad: crop (negative pads: zero-fill)
    zero = (0,) * nd
    mode = "constant" if padding_mode == "zeros" else padding_mode

    def op(x: Tensor) -> Tensor:
        return conv(F.pad(x, flat, mode=mode), weight, None, stride, zero, dilation, groups)

    def adjoint(y: Tensor) -> Tensor:
        z = conv_t(y, weight, None, stride, zero, out_pad, groups, dilation)  # (B, C, *padded)
        if mode == "constant":
            return F.pad(z, unpad)
        return _pad_adjoint(z, (z.shape[0], z.shape[1], *spatial), flat, mode)

    return op, adjoint


def _use_matmul(
    weight: Tensor,
    padded: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    groups: int,
) -> bool:
    """Whether to run a conv operator as im2col + GEMM.

    Note [skinny convolutions on CPU]
        A power-iteration conv sees one image, and deep layers at small resolutions have few
        output positions L (ResNet-18 at 32 px: L = 4 in layer3, 1 in layer4). There the CPU
        conv kernels run their GEMM in a slow orientation: (256x2304) @ (2304x4) took 0.69 ms,
        the same product as (4x2304) @ (2304x256) 0.11 ms (MKL, one thread). For
        ``16 L <= C_in k`` we use unfold + matmul in the fast orientation; elsewhere the library
        conv is as fast or faster.
    """
    if weight.device.type != "cpu" or groups != 1 or weight.dim() not in (3, 4):
        return False
    if weight.numel() < (1 << 16):  # small weights: the extra pad/unfold calls cost more
        return False
    n_pos = math.prod(
        (n - d * (k - 1) - 1) // s + 1
        for n, k, d, s in zip(padded, weight.shape[2:], dilation, stride, strict=True)
    )
    return 16 * n_pos <= weight[0].numel()


def _matmul_conv_ops(
    weight: Tensor,
    spatial: Sequence[int],
    pads: Sequence[tuple[int, int]],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding_mode: str,
) -> tuple[LinearOp, LinearOp]:
    """Conv1d/2d (groups 1) as im2col + GEMM; see Note [skinny convolutions on CPU]."""
    nd = weight.dim() - 2
    c_out = weight.shape[0]
    Wm = weight.reshape(c_out, -1)  # (C_out, C_in*K)
    flat = _flat_pads(pads)
    unpad = [-p for p in flat]
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads, strict=True))
    kernel, dil, st, size = tuple(weight.shape[2:]), tuple(dilation), tuple(stride), padded
    if nd == 1:  # as a conv2d of height 1
        kernel, dil, st, size = (1, *kernel), (1, *dil), (1, *st), (1, *size)
    out = tuple(
        (n - d * (k - 1) - 1) // s + 1 for n, k, d, s in zip(size, kernel, dil, st, strict=True)
    )
    out_shape = out[1:] if nd == 1 else out
    n_pos = math.prod(out)
    # Symmetric zero padding goes into unfold/fold themselves (no padded copies).
    inner = mode == "constant" and nd == 2 and all(lo == hi >= 0 for lo, hi in pads)
    pad2 = tuple(lo for lo, _ in pads) if inner else 0
    fold_size = tuple(spatial) if inner else size
    Wt = Wm.t()

    def op(x: Tensor) -> Tensor:
        xp = x if inner else F.pad(x, flat, mode=mode)  # (B, C, *padded)
        if nd == 1:
            xp = xp.unsqueeze(2)
        cols = F.unfold(xp, kernel, dil, pad2, st)  # (B, C*K, L)
        y = cols.mT @ Wt  # (B, L, C_out)
        return y.mT.reshape(x.shape[0], c_out, *out_shape)

    def adjoint(y: Tensor) -> Tensor:
        cols = y.reshape(y.shape[0], c_out, n_pos).mT @ Wm  # (B, L, C*K)
        z = F.fold(cols.mT, fold_size, kernel, dil, pad2, st)  # (B, C, *padded or spatial)
        if inner:
            return z
        if nd == 1:
            z = z.squeeze(2)
        if mode == "constant":
            return F.pad(z, unpad)
        return _pad_adjoint(z, (z.shape[0], z.shape[1], *spatial), flat, mode)

    return op, adjoint


def conv_operator(
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> tuple[LinearOp, LinearOp]:
    """``(A, A^T)`` for the convolution ``x -> conv(x; W)`` (no bias) on inputs ``(B, *input_shape)``.

    Same semantics as ``nn.Conv1d/2d/3d``: any stride, padding (ints, tuples, 'same', 'valid'),
    dilation, groups (depthwise included) and ``padding_mode`` (zeros, circular, reflect,
    replicate). The adjoint is exact: ``conv_transpose`` with
    ``output_padding = (n + p_l + p_r - d(k-1) - 1) mod s`` per dim (PAPERS 1.2). Asymmetric or
    non-zero padding is an explicit ``F.pad``, whose adjoint is a crop (zeros) or autograd.

    Args:
        weight: ``(C_out, C_in / groups, *kernel)``.
        input_shape: ``(C_in, *spatial)``, no batch dim.
        stride: as ``nn.ConvNd``.
        padding: as ``nn.ConvNd``.
        dilation: as ``nn.ConvNd``.
        groups: as ``nn.ConvNd``.
        padding_mode: as ``nn.ConvNd``.

    Raises:
        ValueError: bad weight rank, padding or padding_mode.
    """
    nd = weight.dim() - 2
    if nd not in _CONV:
        raise ValueError(f"conv weight must have 3-5 dims, got shape {tuple(weight.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}; valid: {PADDING_MODES}")
    stride_, dilation_ = _ntuple(stride, nd), _ntuple(dilation, nd)
    pads = _resolve_padding(padding, tuple(weight.shape[2:]), dilation_, stride_)
    if len(input_shape) != nd + 1:
        raise ValueError(
            f"input_shape {tuple(input_shape)} must be (C, *spatial) for a {nd}-d conv"
        )
    return _conv_ops(weight, input_shape[1:], pads, stride_, dilation_, groups, padding_mode)


def conv_transpose_operator(
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> tuple[LinearOp, LinearOp]:
    """``(A, A^T)`` for ``x -> conv_transpose(x; W)`` (no bias) on inputs ``(B, *input_shape)``.

    The adjoint is the forward convolution with the same weight and geometry, cropped to the
    input size (one extra row appears when ``output_padding >= stride``).

    Args:
        weight: ``(C_in, C_out / groups, *kernel)`` (the ``nn.ConvTransposeNd`` layout).
        input_shape: ``(C_in, *spatial)``, no batch dim.
        stride: as ``nn.ConvTransposeNd``.
        padding: as ``nn.ConvTransposeNd``.
        output_padding: as ``nn.ConvTransposeNd``.
        dilation: as ``nn.ConvTransposeNd``.
        groups: as ``nn.ConvTransposeNd``.
    """
    nd = weight.dim() - 2
    if nd not in _CONV:
        raise ValueError(f"conv weight must have 3-5 dims, got shape {tuple(weight.shape)}")
    stride_, dilation_ = _ntuple(stride, nd), _ntuple(dilation, nd)
    padding_, output_padding_ = _ntuple(padding, nd), _ntuple(output_padding, nd)
    conv, conv_t = _CONV[nd], _CONV_T[nd]
    crop = tuple(slice(0, n) for n in input_shape[1:])

    def op(x: Tensor) -> Tensor:
        return conv_t(x, weight, None, stride_, padding_, output_padding_, groups, dilation_)

    def adjoint(y: Tensor) -> Tensor:
        return conv(y, weight, None, stride_, padding_, dilation_, groups)[(..., *crop)]

    return op, adjoint


# --------------------------------------------------------------------------- norms


def dense_operator_norm(
    op: LinearOp,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Exact ``||A||_2`` from the dense Jacobian: ``op`` on the identity basis, then an SVD.

    A test oracle, independent of the bounds (those build the matrix from the kernel,
    :meth:`OperatorSpec.dense_matrix`); memory and time grow as ``prod(input_shape)^2``, so
    keep it to small operators.

    Args:
        op: the linear map; it must accept ``(n, *input_shape)`` tensors of ``dtype``.
        input_shape: one input's shape, no batch dim.
        dtype: dtype of the basis (float64 by default: build ``op`` from a float64 weight).
        device: device of the basis.

    Returns:
        A 0-dim tensor, the largest singular value.
    """
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=dtype, device=device).reshape(n, *input_shape)
    with torch.no_grad():
        J_t = op(basis).reshape(n, -1)  # (n_in, n_out) = A^T
    return _top_singular_value(J_t)


def _top_singular_value(A: Tensor) -> Tensor:
    """Largest singular value of each matrix of a batch ``(..., m, n)``.

    The top eigenvalue of the smaller Gram matrix: cheaper than an SVD, relative error ~ 1e-15.
    """
    G = A @ A.mH if A.shape[-2] <= A.shape[-1] else A.mH @ A
    return _top_eigenvalue(G).clamp_min(0).sqrt()


def _norm_upper_bound(A: Tensor) -> float:
    """An upper bound of ``||A||_2`` for a matrix, or of the largest over a batch ``(..., m, n)``.

    Smaller side below ``CERTIFY_MIN_DIM`` or not on the CPU: :func:`_top_singular_value_bound`
    (batched). Otherwise a rigorous bound at most ~1e-6 (typically 1e-9) above the norm, several
    times faster, one matrix at a time (Note [certified top eigenvalue]).
    """
    if min(A.shape[-2:]) >= CERTIFY_MIN_DIM and A.device.type == "cpu" and not A.is_complex():
        return max(_certified_top_singular_value(a) for a in A.reshape(-1, *A.shape[-2:]))
    return float(_top_singular_value_bound(A).max())


def _top_singular_value_bound(A: Tensor) -> Tensor:
    """Upper bounds of the largest singular value of each matrix of a batch ``(..., m, n)``.

    :func:`_top_singular_value` in float64 / complex128 plus its rounding: the Gram matrix's,
    ``||fl(G) - G||_2 <= gamma_k ||A||_F^2`` (k the inner dimension, ``2k + 2`` for complex
    products), and eigvalsh's backward error, ``gamma_n ||G||_F <= gamma_n ||A||_F^2`` (the
    allowance of Note [certified top eigenvalue]'s fallback). Without it the result can be
    ~1e-15 below the norm; with it, at most ``(n^2 + n k) u / 2`` above (~1e-9 for n = 2048).
    """
    A = A.detach().to(torch.complex128 if A.is_complex() else torch.float64)
    n, k = min(A.shape[-2:]), max(A.shape[-2:])
    frob2 = A.abs().square().sum((-2, -1)) * (1 + 1e-6)  # 1e-6: its own rounding, generously
    margin = (_gamma(n) + _gamma(2 * k + 2 if A.is_complex() else k)) * frob2
    top = _top_singular_value(A)
    return (top.square() + margin).sqrt() * (1 + 4 * _UNIT_ROUNDOFF)


def _top_eigenvalue(G: Tensor) -> Tensor:
    """Largest eigenvalue of each symmetric matrix of a batch ``(..., n, n)`` (LAPACK eigvalsh)."""
    if G.device.type != "cpu":
        return torch.linalg.eigvalsh(G)[..., -1]
    # Note [single-threaded LAPACK]: on a busy machine, multi-threaded MKL eigensolvers spin at
    # barriers; measured 13 s for a 1024^2 eigvalsh with 2 threads vs 0.1 s with one thread.
    # These matrices are small, so one thread loses little even on an idle machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(G)[..., -1]
    finally:
        torch.set_num_threads(threads)


# Note [certified top eigenvalue]
#     A full eigvalsh of a large Gram matrix costs O(n^3) with a large constant (3.6 s for
#     n = 4096 on 2 cores: VGG's 4096-wide Linear layers, every epoch). Instead: the Gram matrix
#     G = fl(W W^T) in float64 (BLAS syrk on the CPU, half a GEMM's flops), a Lanczos estimate
#     lam <= lambda_max(G), and a Cholesky factorization of M = fl(tau I - G) at
#     tau = lam (1 + rel): if it succeeds, M + E = R^T R with |E| <= gamma_{n+1} |R^T| |R|
#     (Demmel 1989; Higham, Accuracy and Stability, Thm 10.3; we take gamma_{n+2} in case LAPACK
#     divides by multiplying with a reciprocal), so
#         lambda_max(G) <= tau + gamma_{n+2} ||R||_F^2 + u max_i |M_ii|
#     (the last term covers rounding tau - G_ii), and the rounding of the Gram matrix itself
#     adds ||fl(W W^T) - W W^T||_2 <= gamma_k || |W| |W|^T ||_2 <= gamma_k ||W||_F^2 (k the
#     inner dimension). W is first scaled by a power of two (exact) to max |W| in [1/2, 1), so
#     nothing overflows and underflow adds at most 2^-1074 per rounded value (the `floor`
#     term); NaN/inf entries raise. With u = 2^-53 the margins are ~1e-9 relative at
#     n = 4096. A Cholesky is ~8x cheaper than the eigvalsh (0.55 s at n = 4096). When Lanczos
#     has not converged far enough for the factorization to succeed at rel <= 1e-6 (a tight
#     cluster at the top), the exact eigvalsh runs instead.
CERTIFY_MIN_DIM = 1024
_UNIT_ROUNDOFF = 2.0**-53


def _gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)`` for float64."""
    return k * _UNIT_ROUNDOFF / (1 - k * _UNIT_ROUNDOFF)


def _smaller_gram(A: Tensor) -> Tensor:
    """``A A^T`` or ``A^T A`` (the smaller) of a real float64 CPU matrix, symmetric in full.

    Uses BLAS ``dsyrk`` (half a GEMM's flops: 4.4 s instead of 8.5 s for 4096 x 25088).
    """
    from scipy.linalg import blas

    B = A.detach().numpy().T  # (n, m), Fortran order: no copy
    trans = 1 if A.shape[0] <= A.shape[1] else 0  # syrk: B^T B (m x m) or B B^T (n x n)
    upper = torch.from_numpy(blas.dsyrk(1.0, B, trans=trans))  # strictly lower part: zeros
    G = upper + upper.mT
    G.diagonal().mul_(0.5)  # exact
    return G


def _lanczos_top(G: Tensor, max_steps: int = 160, rtol: float = 1e-13) -> float:
    """Lanczos estimate of the largest eigenvalue of a symmetric ``(n, n)`` matrix (a lower bound).

    Full reorthogonalization; fixed-seed start (global RNG untouched). The top Ritz value only
    grows with the steps (interlacing); it stops once that value has moved by less than ``rtol``
    (relative) over the last 8 steps. VGG's 25088 -> 4096 layer (top eigenvalues 0.4% apart):
    relative error 3e-4 after 32 steps, 4e-9 after 64, 1e-13 after 96 (~7 ms a step).
    """
    n = G.shape[0]
    steps = min(max_steps, n)
    gen = torch.Generator().manual_seed(0)
    Q = G.new_zeros(steps, n)
    q = torch.randn(n, generator=gen, dtype=G.dtype)
    Q[0] = q / q.norm()
    alpha, beta = G.new_zeros(steps), G.new_zeros(steps)
    history: list[float] = []
    scale = 0.0  # the largest |alpha|, |beta| so far: ||T|| within a factor of 3
    for j in range(steps):
        w = G @ Q[j]
        alpha[j] = Q[j] @ w
        for _ in range(2):  # full reorthogonalization; twice is enough
            w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = w.norm()
        T = torch.diag(alpha[: j + 1]) + torch.diag(beta[:j], 1) + torch.diag(beta[:j], -1)
        history.append(float(torch.linalg.eigvalsh(T)[-1]))
        if len(history) > 8 and history[-1] - history[-9] <= rtol * abs(history[-1]):
            break
        scale = max(scale, abs(float(alpha[j])), float(b))
        # An invariant subspace (b at rounding level, e.g. G a multiple of the identity): its
        # Ritz values are exact; normalizing the rounding noise would lose orthogonality and
        # send the Ritz values far above lambda_max (209x for a 1024 identity).
        if j + 1 == steps or float(b) <= n * _UNIT_ROUNDOFF * scale:
            break
        beta[j] = b
        Q[j + 1] = w / b
    return history[-1]


def _certified_top_singular_value(A: Tensor) -> float:
    """A rigorous upper bound of ``||A||_2`` for a real CPU matrix (Note [certified top eigenvalue]).

    Raises:
        ValueError: ``A`` has NaN or infinite entries (no bound exists).
    """
    A = A.detach()
    peak = float(torch.linalg.vector_norm(A, float("inf")))  # max |a|: exact, no copy of A
    if not math.isfinite(peak):
        raise ValueError(f"cannot bound the norm of a {tuple(A.shape)} matrix with NaN/inf entries")
    if peak == 0:
        return 0.0
    # Scale by a power of two so that max |W| is in [1/2, 1): no overflow, and underflow only in
    # entries and products far below the peak, covered by `floor` (2^-1074 per rounded value).
    # In place on the float64 copy (exact: a power of two, the same values as ldexp); a float32
    # 4096 x 25088 matrix is 0.8 GB in float64, so every further copy costs ~0.5 s.
    exponent = math.frexp(peak)[1]
    W = A.to(torch.float64, copy=True).mul_(2.0**-exponent)
    G = _smaller_gram(W)
    n, k = G.shape[0], max(W.shape)
    floor = 2.0 * n * k * 2.0**-1074 + math.sqrt(W.numel()) * 2.0**-1074
    # ||W||_F^2 = trace(W W^T); each diagonal entry of fl(G) is within gamma_k of its value
    frob2 = float(G.diagonal().sum()) * (1 + 2 * _gamma(k)) * (1 + _gamma(n)) + floor
    gram_error = _gamma(k) * frob2 + floor
    lam = max(_lanczos_top(G), 0.0)
    for rel in (1e-9, 1e-6):
        tau = lam * (1 + rel)
        M = -G
        M.diagonal().add_(tau)
        R, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            # gamma_{n+2}: LAPACK may divide by multiplying with a reciprocal (one more rounding)
            lam_max = tau + _gamma(n + 2) * float(torch.linalg.vector_norm(R)) ** 2
            lam_max += _UNIT_ROUNDOFF * float(M.diagonal().abs().max()) + floor
            return math.ldexp(math.sqrt(lam_max + gram_error) * (1 + 4 * _UNIT_ROUNDOFF), exponent)
    # eigvalsh is backward stable: the eigenvalues of G + E with ||E||_2 <= p(n) u ||G||_2, p(n)
    # a modest function of n that LAPACK leaves unspecified; n u ||G||_F is the usual allowance.
    lam_max = float(_top_eigenvalue(G).clamp_min(0)) + _gamma(n) * float(G.norm()) + floor
    return math.ldexp(math.sqrt(lam_max + gram_error) * (1 + 4 * _UNIT_ROUNDOFF), exponent)


def _circular_bound(
    W: Tensor,
    grid: Sequence[tuple[int, int]],
    offsets: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    max_chunk: int = 1 << 22,
) -> float:
    """``||S_N C_N||_2`` for the strided circular conv of W on grid N (per dim ``(N, s)``, s | N).

    Polyphase form (Sedghi et al. 2019 for s = 1): tap ``t = d*k + offset = s*q + r`` reads
    phase ``r`` of the input at shift ``q`` on the coarse grid ``M = N / s``, so the operator is a
    stride-1 circular conv on M with ``C_in * prod(s)`` input channels. Its norm is the max over
    the M-point DFT frequencies f of ``||sum_k W_k exp(2 pi i f.q_k / M) e_{r_k}||_2`` (a
    ``C_out/g x C_in/g*prod(s)`` matrix per group); real W lets the last dim keep f <= M/2.
    """
    nd = W.dim() - 2
    c_out, c_in = W.shape[0] // groups, W.shape[1]
    Wg = W.reshape(groups, c_out, c_in, *W.shape[2:]).to(torch.complex128)
    phases = []
    for i, ((N, s), off, d) in enumerate(zip(grid, offsets, dilation, strict=True)):
        M = N // s
        t = d * torch.arange(W.shape[2 + i], dtype=torch.int64) + off
        r, q = torch.remainder(t, s), torch.div(t, s, rounding_mode="floor")
        n_f = M // 2 + 1 if i == nd - 1 else M
        f = torch.arange(n_f, dtype=torch.int64)
        # f q mod M exactly in integers: the angle is then in [0, 2 pi), rounded to ~6 pi u
        angle = 2 * math.pi * torch.remainder(torch.outer(f, q), M).to(torch.float64) / M
        P = torch.zeros(n_f, s, len(t), dtype=torch.complex128)
        P[:, r, torch.arange(len(t))] = torch.polar(torch.ones_like(angle), angle)
        phases.append(P.to(W.device))
    k_idx, f_idx, r_idx = "hij"[:nd], "pqr"[:nd], "uvw"[:nd]
    spec = (
        f"goc{k_idx},"
        + ",".join(f"{f_idx[i]}{r_idx[i]}{k_idx[i]}" for i in range(nd))
        + f"->{f_idx}goc{r_idx}"
    )
    n_inner = c_in * math.prod(s for _, s in grid)
    per_f0 = math.prod(P.shape[0] for P in phases[1:]) * groups * c_out * n_inner
    step = max(1, max_chunk // max(per_f0, 1))
    best = 0.0
    for start in range(0, phases[0].shape[0], step):
        chunk = [phases[0][start : start + step], *phases[1:]]
        What = torch.einsum(spec, Wg, *chunk).reshape(-1, c_out, n_inner)
        best = max(best, float(_top_singular_value_bound(What).max()))
    # Each entry of What sums the K taps times computed unit phases. Per dim a phase is off by
    # at most (6 pi + 3) u (the angle in [0, 2 pi) to ~6 pi u, cos/sin and polar to ~3 u), the
    # einsum's products of nd phases and its sum add gamma_{K+nd}: the entry's error is at most
    # (gamma_{K+nd} + nd (6 pi + 4) u) sum_k |W_k[o, c]|, so ||What - exact||_2 <= that factor
    # times sqrt(K) ||W||_F (Cauchy-Schwarz over taps, Frobenius over entries).
    taps = math.prod(W.shape[2:])
    factor = _gamma(taps + nd) + nd * (6 * math.pi + 4) * _UNIT_ROUNDOFF
    return best + factor * math.sqrt(taps) * float(torch.linalg.vector_norm(W)) * (1 + 1e-6)


def _pad_norm(spatial: Sequence[int], pads: Sequence[tuple[int, int]], mode: str) -> float:
    """``||Pad||_2 = sqrt(max copies of one pixel)`` for a copying pad (reflect, replicate, ...)."""
    x = torch.zeros((1, 1, *spatial), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = F.pad(x, _flat_pads(pads), mode=mode)
        (counts,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return math.sqrt(float(counts.max()))


def _dense_ok(n_in: int, n_out: int, dense_max_dim: int) -> bool:
    return min(n_in, n_out) <= dense_max_dim and n_in * n_out <= (1 << 23)


def _check_fits(
    spatial: Sequence[int],
    pads: Sequence[tuple[int, int]],
    kernel: Sequence[int],
    dilation: Sequence[int],
    padding_mode: str,
) -> None:
    """Raise ValueError when the padded input is smaller than the dilated kernel (no output)."""
    if any(
        n + lo + hi < d * (k - 1) + 1
        for n, (lo, hi), k, d in zip(spatial, pads, kernel, dilation, strict=True)
    ):
        raise ValueError(
            f"input size {tuple(spatial)} is too small for kernel {tuple(kernel)}, "
            f"{padding_mode} padding {tuple(pads)}, dilation {tuple(dilation)}: the layer has no output"
        )


def _trim_taps(
    spatial: Sequence[int],
    pads: Sequence[tuple[int, int]],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] | None:
    """Kernel taps that ever read an input pixel (zero padding), and the matching padding.

    Note [trimmed taps]
        At tiny resolutions (ResNet-18's last stage sees 1x1 or 2x2 maps at 32 px) most taps of
        a zero-padded kernel only ever read padding: a 3x3 conv on a 1x1 input is its centre tap.
        The operator then equals the conv with the kernel cut to taps ``[k0, k1)`` and left
        padding ``p_l - d*k0`` (negative: crop), whose FFT bound is tighter and cheaper. (Power
        iteration keeps the full kernel: gathering the taps costs more than it saves.) Returns ``((k0, k1) per dim, (left, right) padding per dim)``, or None when
        every tap is used.
    """
    taps, new_pads, trimmed = [], [], False
    for n, (lo, hi), k, d, s in zip(spatial, pads, kernel, dilation, stride, strict=True):
        out = (n + lo + hi - d * (k - 1) - 1) // s + 1  # >= 1: checked by _check_fits
        used = [t for t in range(k) if any(lo <= i * s + d * t < lo + n for i in range(out))]
        k0, k1 = (min(used), max(used) + 1) if used else (0, k)  # none: A = 0, keep all
        if (k0, k1) == (0, k):
            taps.append((0, k))
            new_pads.append((lo, hi))
            continue
        trimmed = True
        left = lo - d * k0
        right = (out - 1) * s + d * (k1 - 1 - k0) + 1 - n - left  # exactly `out` outputs
        taps.append((k0, k1))
        new_pads.append((left, right))
    return (tuple(taps), tuple(new_pads)) if trimmed else None


def _tap_reads(
    spatial: Sequence[int],
    pads: Sequence[tuple[int, int]],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    padding_mode: str,
    out_size: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Which input pixel each (tap, output position) of a convolution reads (Note [Kronecker form]).

    Returns long tensors ``(t, p, q)`` of equal length: tap ``t`` at output position ``p`` reads
    input pixel ``q`` (flat indices; pairs that read zero padding are left out). The padded cells
    of a grid of pixel indices hold the pixel they copy (reflect, replicate, circular) or -1.
    ``out_size`` keeps only the first output positions per dim (a ConvTranspose's input grid,
    when its output_padding gives the adjoint conv more windows than that).
    """
    n_pix = math.prod(spatial)
    grid = torch.arange(n_pix, dtype=torch.float64).reshape(1, 1, *spatial)
    flat = _flat_pads(pads)
    if any(flat):
        if padding_mode == "zeros":
            grid = F.pad(grid, flat, value=-1.0)
        else:
            grid = F.pad(grid, flat, mode=padding_mode)
    windows = grid[0, 0]
    for i, (k, d, s) in enumerate(zip(kernel, dilation, stride, strict=True)):
        windows = windows.unfold(i, d * (k - 1) + 1, s)  # appends a window dim
    if out_size is not None:
        windows = windows[tuple(slice(0, n) for n in out_size)]
    taps = windows[(Ellipsis, *[slice(None, None, d) for d in dilation])]  # (*out, *k)
    n_taps = math.prod(kernel)
    src = taps.reshape(-1, n_taps).long()  # (P, taps)
    pos = torch.arange(src.shape[0]).unsqueeze(1).expand_as(src)
    tap = torch.arange(n_taps).unsqueeze(0).expand_as(src)
    keep = src >= 0
    return tap[keep], pos[keep], src[keep]


@dataclass(frozen=True)
class OperatorSpec:
    """The geometry of one layer's linear map, without its weight (cheap to copy and pickle).

    Built once with :meth:`from_layer`; :meth:`operator` turns any weight of that layer into
    ``(A, A^T)`` on inputs ``(B, *input_shape)``. For Linear, ``input_shape = (in_features,)``:
    a Linear layer applied to a token sequence ``(T, in)`` has the norm of W, so tokens drop out.
    """

    kind: Literal["linear", "conv", "conv_transpose"]
    input_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()  # (left, right) per spatial dim
    output_padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    # Note [trimmed taps]: (start, stop) per dim and the padding that goes with them; () = all.
    taps: tuple[tuple[int, int], ...] = ()
    tap_padding: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_layer(cls, layer: nn.Module, input_shape: Sequence[int] | None = None) -> OperatorSpec:
        """Read the geometry of ``layer``; convolutions need ``input_shape = (C, *spatial)``.

        Raises:
            ValueError: unsupported layer type, or a missing or mismatched ``input_shape``.
        """
        if isinstance(layer, nn.Linear):
            if input_shape and check_input_shape(input_shape)[-1] != layer.in_features:
                raise ValueError(
                    f"input_shape {tuple(input_shape)} must end in in_features="
                    f"{layer.in_features} for Linear"
                )
            return cls("linear", (layer.in_features,))
        if not isinstance(layer, SUPPORTED_LAYERS):
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise ValueError(f"unsupported layer type {type(layer).__name__}; supported: {names}")
        assert isinstance(layer, nn.modules.conv._ConvNd)
        nd = len(layer.kernel_size)
        if input_shape is None:
            raise ValueError(
                f"{type(layer).__name__} needs input_shape (C, *spatial): its operator norm "
                "depends on the input size"
            )
        shape = check_input_shape(input_shape)
        if any(s < 1 for s in _ntuple(layer.stride, nd)):
            raise ValueError(f"stride must be >= 1, got {layer.stride}")
        if len(shape) != nd + 1 or shape[0] != layer.in_channels:
            raise ValueError(
                f"input_shape {shape} must be (C={layer.in_channels}, *spatial) with {nd} spatial "
                f"dims for {type(layer).__name__}"
            )
        stride, dilation = _ntuple(layer.stride, nd), _ntuple(layer.dilation, nd)
        if layer.transposed:
            pad, out_pad = _ntuple(layer.padding, nd), _ntuple(layer.output_padding, nd)
            out = tuple(
                (n - 1) * s - 2 * p + d * (k - 1) + o + 1
                for n, s, p, d, k, o in zip(
                    shape[1:], stride, pad, dilation, layer.kernel_size, out_pad, strict=True
                )
            )
            if min(out) < 1:
                raise ValueError(
                    f"input_shape {shape} is too small for {type(layer).__name__} with kernel "
                    f"{tuple(layer.kernel_size)}, stride {stride}, padding {pad}, dilation "
                    f"{dilation}: its output would be {out}"
                )
            return cls(
                "conv_transpose",
                shape,
                stride=stride,
                padding=tuple((p, p) for p in _ntuple(layer.padding, nd)),  # type: ignore[arg-type]
                output_padding=_ntuple(layer.output_padding, nd),
                dilation=dilation,
                groups=layer.groups,
            )
        kind = forward_kind(layer)
        if kind is None:
            raise ValueError(
                f"{type(layer).__name__} changes the forward of {type(layer).__mro__[1].__name__}, "
                "so its operator is unknown; subclasses with a known operator: timm's Conv2dSame "
                "and Linear"
            )
        if kind == "tf_same":
            pads = tf_same_padding(shape[1:], layer.kernel_size, stride, dilation)
        else:
            pads = _resolve_padding(layer.padding, layer.kernel_size, dilation, stride)
        if layer.padding_mode in ("reflect", "circular"):  # torch: reflect < n, circular <= n
            slack = 1 if layer.padding_mode == "reflect" else 0
            if any(max(pad) > n - slack for pad, n in zip(pads, shape[1:], strict=True)):
                raise ValueError(
                    f"{layer.padding_mode} padding {tuple(pads)} is too wide for input_shape "
                    f"{shape}"
                )
        _check_fits(shape[1:], pads, layer.kernel_size, dilation, layer.padding_mode)
        trim = None
        if layer.padding_mode == "zeros":
            trim = _trim_taps(shape[1:], pads, layer.kernel_size, dilation, stride)
        return cls(
            "conv",
            shape,
            stride=stride,
            padding=pads,
            dilation=dilation,
            groups=layer.groups,
            padding_mode=layer.padding_mode,
            taps=trim[0] if trim else (),
            tap_padding=trim[1] if trim else (),
        )

    def _trimmed(self, weight: Tensor) -> tuple[Tensor, tuple[tuple[int, int], ...]]:
        """The weight cut to the used taps and its padding (Note [trimmed taps]); for bounds."""
        if not self.taps:
            return weight, self.padding
        cut = tuple(slice(a, b) for a, b in self.taps)
        return weight[(slice(None), slice(None), *cut)], self.tap_padding

    @property
    def u_shape(self) -> tuple[int, ...]:
        """Shape of the power-iteration vector u: one input with a batch dim of 1."""
        return (1, *self.input_shape)

    @property
    def blocks(self) -> int:
        """Diagonal blocks of the operator: the convolution's groups, 1 for Linear (Note [blocks])."""
        return 1 if self.kind == "linear" else self.groups

    def operator(self, weight: Tensor) -> tuple[LinearOp, LinearOp]:
        """``(A, A^T)`` of this layer with ``weight``."""
        if self.kind == "linear":
            return linear_operator(weight)
        if self.kind == "conv_transpose":
            return conv_transpose_operator(
                weight,
                self.input_shape,
                stride=self.stride,
                padding=tuple(lo for lo, _ in self.padding),
                output_padding=self.output_padding,
                dilation=self.dilation,
                groups=self.groups,
            )
        return _conv_ops(
            weight, self.input_shape[1:], self.padding, self.stride, self.dilation, self.groups,
            self.padding_mode,
        )  # fmt: skip

    def sigma_grad(self, weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """``d<A_W u, v> / dW`` for fixed u, v: the gradient of ``sigma = <A u, v>`` (shape of W).

        An outer product for Linear; one weight-gradient convolution on a single image
        (``aten.convolution_backward``) for convolutions; autograd for other paddings.
        """
        if self.kind == "linear":
            return v.reshape(-1, v.shape[-1]).mT @ u.reshape(-1, u.shape[-1])  # (out, in)
        mask = [False, True, False]
        if self.kind == "conv_transpose":
            return torch.ops.aten.convolution_backward(
                v, u, weight, None, self.stride, [lo for lo, _ in self.padding], self.dilation,
                True, self.output_padding, self.groups, mask,
            )[1]  # fmt: skip
        if self.padding_mode == "zeros" and all(lo == hi for lo, hi in self.padding):
            nd = len(self.stride)
            return torch.ops.aten.convolution_backward(
                v, u, weight, None, self.stride, [lo for lo, _ in self.padding], self.dilation,
                False, [0] * nd, self.groups, mask,
            )[1]  # fmt: skip
        with torch.enable_grad():
            W = weight.detach().requires_grad_(True)
            op, _ = self.operator(W)
            (grad,) = torch.autograd.grad(torch.sum(op(u) * v), W)
        return grad

    def scaled_sigma_grad(
        self,
        weight: Tensor,
        g: Tensor,
        a: float | Tensor,
        b: float | Tensor,
        u: Tensor,
        v: Tensor,
        *,
        inplace: bool = False,
    ) -> Tensor:
        """``a * g + b * d<A_W u, v>/dW`` without materializing the second term where possible.

        Linear: one ``addmm``. Conv1d/2d: ``baddbmm`` of ``v`` with the unfolded (im2col) ``u``,
        which reads and writes each weight-sized tensor once; the fused backward of the
        parametrization is built on it. Other layers: :meth:`sigma_grad`. ``a`` and ``b`` may be
        0-dim tensors (no host sync on accelerators): ``b`` then scales ``v``, not the weight.
        ``inplace`` writes the result into ``g`` (contiguous; the CUDA-graph gradient buffer).
        """
        if isinstance(b, Tensor):
            v, b = v * b, 1.0  # d<A u, b v>/dW = b d<A u, v>/dW: scale the small factor
        # `g * a` then an in-place GEMM: addmm/baddbmm with beta copy the input first (slower).
        scaled = g.mul_ if inplace else g.mul
        if self.kind == "linear":
            return scaled(a).addmm_(v.mT, u, alpha=b)
        nd = len(self.stride)
        if self.kind != "conv" or nd > 2:
            return scaled(a).add_(self.sigma_grad(weight, u, v), alpha=b)
        kernel, stride, dilation = tuple(weight.shape[2:]), self.stride, self.dilation
        pad: int | tuple[int, ...] = 0
        if nd == 2 and self.padding_mode == "zeros" and all(lo == hi for lo, hi in self.padding):
            x, pad = u, tuple(lo for lo, _ in self.padding)  # unfold pads itself
        else:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(u, _flat_pads(self.padding), mode=mode)  # (1, C, *padded)
        if nd == 1:
            x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
        cols = F.unfold(x, kernel, dilation, pad, stride)  # (1, C*K, L)
        n_pos = cols.shape[-1]
        grp, c_out = self.groups, weight.shape[0]
        if n_pos != math.prod(v.shape[2:]):
            return scaled(a).add_(self.sigma_grad(weight, u, v), alpha=b)
        V = v.reshape(grp, c_out // grp, n_pos)
        U = cols.reshape(grp, -1, n_pos).mT  # (g, L, C/g*K)
        # Double backward (exact DataGrad) hands in a permuted weight gradient, (in, out) strides:
        # `g * a` keeps that layout and `view` needs the contiguous one.
        out = scaled(a).contiguous()
        out.view(grp, c_out // grp, -1).baddbmm_(V, U, alpha=b)
        return out

    def output_shape(self, weight: Tensor) -> tuple[int, ...]:
        """Shape of ``A(x)`` for one input, no batch dim."""
        if self.kind == "linear":
            return (weight.shape[0],)
        op, _ = self.operator(weight)
        with torch.no_grad():
            return tuple(op(weight.new_zeros(self.u_shape)).shape[1:])

    def upper_bound(self, weight: Tensor, *, dense_max_dim: int = DENSE_MAX_DIM) -> float:
        """A guaranteed upper bound on ``||A||_2``; see :func:`operator_norm_upper_bound`."""
        W = weight.detach().to(torch.float64)
        if self.kind == "linear":
            return _norm_upper_bound(W)
        out_shape = self.output_shape(W)
        n_in, n_out = math.prod(self.input_shape), math.prod(out_shape)
        if _dense_ok(n_in, n_out, dense_max_dim):
            return _norm_upper_bound(self.dense_matrix(W))
        g = self.groups
        if (
            g > 1
            and _dense_ok(n_in // g, n_out // g, dense_max_dim)
            and n_in * n_out // g <= 1 << 23
        ):
            # block diagonal over groups (depthwise: one small block per channel): the exact
            # norm is the largest block's
            return _norm_upper_bound(self.dense_matrix(W, per_group=True))
        return self.fft_bound(W)

    def dense_matrix(self, weight: Tensor, *, per_group: bool = False) -> Tensor:
        """The convolution as a dense ``(n_out, n_in)`` matrix (channel-major flattening).

        ``per_group``: the ``(groups, n_out / groups, n_in / groups)`` diagonal blocks instead
        (channels of group g and all positions); the matrix is their block diagonal.

        Note [Kronecker form]
            A convolution is ``A = sum_t M_t (x) S_t`` over kernel taps t: ``M_t`` the
            ``(C_out, C_in)`` channel matrix of tap t (block-diagonal over groups; the transposed
            slice for ConvTranspose) and ``S_t`` the 0/1 map "output position p of tap t reads
            input pixel q" (stride, dilation, padding and padding mode included). Each row of
            ``S_t`` has at most one 1 (a padded cell copies one pixel or is zero), so
            :func:`_tap_reads` finds the pairs ``(p, q)`` by padding and windowing a grid of pixel
            indices, and ``A`` is assembled by adding ``M_t`` at each pair: ``taps * P * C_out *
            C_in / g`` additions, against ``n_in`` applications of the whole layer for the
            Jacobian from the identity basis (:func:`dense_operator_norm`, the tests' oracle):
            0.05-0.07 s instead of 1.6-1.8 s for a 512-channel 3x3 conv on 2x2 maps. A
            ConvTranspose is the adjoint of the conv with its geometry from its output grid to
            its input grid.
        """
        if self.kind == "linear":
            return weight.unsqueeze(0) if per_group else weight
        g = self.groups
        kernel = tuple(weight.shape[2:])
        n_taps = math.prod(kernel)
        out_spatial = self.output_shape(weight)[1:]
        if self.kind == "conv":
            c_out, c_in = weight.shape[0], weight.shape[1] * g
            Wg = weight.reshape(g, c_out // g, c_in // g, n_taps)
            t, p, q = _tap_reads(
                self.input_shape[1:], self.padding, kernel, self.dilation, self.stride,
                self.padding_mode,
            )  # fmt: skip
        else:  # (C_in, C_out/g, *k): output channel o reads W[i, o]
            c_in, c_out = weight.shape[0], weight.shape[1] * g
            Wg = weight.reshape(g, c_in // g, c_out // g, n_taps).transpose(1, 2)
            t, q, p = _tap_reads(
                out_spatial, self.padding, kernel, self.dilation, self.stride, "zeros",
                self.input_shape[1:],
            )  # fmt: skip
        n_pos, n_pix = math.prod(out_spatial), math.prod(self.input_shape[1:])
        co, ci = c_out // g, c_in // g
        A = weight.new_zeros(g, n_pos, n_pix, co, ci)
        dev = weight.device
        values = Wg.permute(3, 0, 1, 2)[t.to(dev)]  # (pairs, g, co, ci)
        A.permute(1, 2, 0, 3, 4).index_put_((p.to(dev), q.to(dev)), values, accumulate=True)
        blocks = A.permute(0, 3, 1, 4, 2).reshape(g, co * n_pos, ci * n_pix)
        return blocks if per_group else torch.block_diag(*blocks)

    def fft_bound(self, weight: Tensor) -> float:
        """The circular-embedding bound (Sedghi et al. 2019) with exact stride handling.

        zeros/reflect/replicate: ``A = R S_N C_N E Pad`` with E the zero embedding into a grid
        ``N = s * ceil((n + p_l + p_r) / s)`` (no wrap-around), S_N the stride, R a row
        selection, so ``||A|| <= ||S_N C_N|| * ||Pad||`` with ``||Pad|| = 1`` for zeros and
        ``sqrt(max copies of a pixel)`` for reflect/replicate. circular: the rows of A are rows of
        the circular conv on the unpadded grid, repeated at most ``c`` times:
        ``||A|| <= sqrt(c) ||S_n C_n||``. ConvTranspose: the adjoint conv on the output shape.
        """
        W = weight.detach().to(torch.float64)
        nd = W.dim() - 2
        pads = self.padding
        spatial: Sequence[int]
        if self.kind == "conv":
            # Cropped pixels are never read and padding is zero: the trimmed conv is A.
            W, pads = self._trimmed(W)
            spatial, mode = self.input_shape[1:], self.padding_mode
        elif self.kind == "conv_transpose":
            spatial, mode = self.output_shape(W)[1:], "zeros"
            # The adjoint conv on the output grid, trimmed alike (Note [trimmed taps]): its rows
            # include A^T's (one more where output_padding >= stride), so the bound holds.
            trim = _trim_taps(spatial, pads, W.shape[2:], self.dilation, self.stride)
            if trim is not None:
                W = W[(slice(None), slice(None), *(slice(a, b) for a, b in trim[0]))]
                pads = trim[1]
        else:
            raise ValueError(f"fft_bound needs a conv layer, got kind={self.kind!r}")
        kernel = tuple(W.shape[2:])
        if all(k == 1 for k in kernel) and mode != "circular":
            # A 1x1 conv is W applied to the kept pixels (pads only add zero or copied pixels,
            # whose rows we bound by ||Pad||): the bound is the matrix norm, max over groups.
            Wg = W.reshape(self.groups, W.shape[0] // self.groups, W.shape[1])
            bound = _norm_upper_bound(Wg)
            return bound * (_pad_norm(spatial, pads, mode) if mode != "zeros" else 1.0)
        if mode == "circular":
            grid, offsets, mult = [], [], 1
            for n, (lo, hi), k, d, s in zip(
                spatial, pads, kernel, self.dilation, self.stride, strict=True
            ):
                out = (n + lo + hi - d * (k - 1) - 1) // s + 1
                if n % s == 0:
                    grid.append((n, s))
                    mult *= math.ceil(out / (n // s))
                else:
                    grid.append((n, 1))
                    mult *= max(sum(1 for m in range(out) if m * s % n == r) for r in range(n))
                offsets.append(-lo)
            return math.sqrt(mult) * _circular_bound(W, grid, offsets, self.dilation, self.groups)
        padded = [n + lo + hi for n, (lo, hi) in zip(spatial, pads, strict=True)]
        grid = [(s * math.ceil(n / s), s) for n, s in zip(padded, self.stride, strict=True)]
        bound = _circular_bound(W, grid, [0] * nd, self.dilation, self.groups)
        if mode in ("reflect", "replicate"):
            bound *= _pad_norm(spatial, pads, mode)
        return bound


def _effective_weight(layer: nn.Module) -> Tensor:
    """``layer.weight`` as the forward pass sees it, computed without updating any state.

    Parametrizations are evaluated in eval mode (no power-iteration write-back), then the mode
    is restored.
    """
    with eval_mode(layer), torch.no_grad():
        return layer.weight.detach()


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """Power iteration dtype: at least float32 (Note [float32 under autocast])."""
    return torch.promote_types(dtype, torch.float32)


def operator_norm(layer: nn.Module, input_shape: Sequence[int] | None, n_iter: int = 100) -> float:
    """Estimate of the layer's operator norm from its operator and adjoint (a lower bound; no bias).

    Golub-Kahan-Lanczos (Note [Krylov refresh]): ``n_iter`` steps cost as many products as
    ``n_iter`` power-iteration rounds and end no lower (a theorem up to ``KRYLOV_CYCLE`` steps,
    measured beyond); ``sigma = ||A u||`` for the final unit
    ``u`` (:func:`power_iteration` is the plain round). Starts from a fixed-seed random vector
    (global RNG untouched), so results are reproducible. For a parametrized layer this is the
    norm of the weight the forward pass uses.

    Args:
        layer: Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d (parametrized or not).
        input_shape: one input's shape without the batch dim, ``(C, *spatial)``; ignored for
            Linear (may be None).
        n_iter: Krylov steps, >= 1.

    Returns:
        ``sigma <= ||A||_2``.
    """
    spec = OperatorSpec.from_layer(layer, input_shape)
    W = _effective_weight(layer)
    W = W.to(_float_dtype(W.dtype))
    # A scales linearly with W: iterate on W / 2^e with max |W| / 2^e in [1/2, 1) (exact), so
    # float32 neither overflows (weights near 1e19 gave inf) nor underflows (near 1e-19: 0).
    peak = float(torch.linalg.vector_norm(W, float("inf")))
    exponent = math.frexp(peak)[1] if math.isfinite(peak) and peak > 0 else 0
    op, adjoint = spec.operator(torch.ldexp(W, torch.tensor(-exponent)) if exponent else W)
    gen = torch.Generator(device=W.device).manual_seed(0)
    u = torch.randn(spec.u_shape, generator=gen, device=W.device, dtype=W.dtype)
    with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
        u = _krylov_top(op, adjoint, u, n_iter, blocks=spec.blocks)
        return math.ldexp(float(_top_sigma(op, u, spec.blocks)), exponent)


def operator_norm_upper_bound(
    layer: nn.Module, input_shape: Sequence[int] | None, *, dense_max_dim: int = DENSE_MAX_DIM
) -> float:
    """A guaranteed upper bound on the layer's operator norm (bias excluded), in float64.

    - Linear: the exact matrix norm.
    - Small operators (``min(n_in, n_out) <= dense_max_dim``): the exact norm of the dense
      matrix, built from the kernel (:meth:`OperatorSpec.dense_matrix`).
    - Either of those with both sides >= ``CERTIFY_MIN_DIM`` on the CPU: a certified bound at
      most ~1e-6 (typically 1e-9) above the norm (Note [certified top eigenvalue]).
    - Larger convolutions: the circular-embedding (FFT) bound of :meth:`OperatorSpec.fft_bound`,
      exact for circular padding with ``s | n`` and out size = n/s, and an upper bound otherwise.
      Measured tightness against the exact norm (benchmarks/sigma_accuracy.py, ResNet-18 at
      32 px; tests): 1.01-1.03x on 8x8 and larger maps, 1.10-1.14x on 4x4, up to 1.5x on 2x2
      (such small operators take the exact path); 1.009x for a N(0,1) 3x3 16->16 conv at 16x16.
      Reflect/replicate padding multiplies it by ``||Pad||`` (looser, up to ~(1+p) per dim).

    Grouped and depthwise convolutions past ``dense_max_dim`` take the exact path per group
    (the matrix is block diagonal) while the blocks fit. Every path adds its float64 rounding
    margin, so the result is never below the norm (at most ~1e-9 above on the exact paths).

    Args:
        layer: Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d (parametrized or not).
        input_shape: one input's shape ``(C, *spatial)``, no batch dim; ignored for Linear.
        dense_max_dim: size limit for the exact dense path.
    """
    spec = OperatorSpec.from_layer(layer, input_shape)
    return spec.upper_bound(_effective_weight(layer), dense_max_dim=dense_max_dim)
