"""Model surgery: bounded spectral normalization on every Conv/Linear of any backbone.

``apply_spectral_norm`` records each layer's input shape with one dry forward, then registers
:class:`~sn_lightning.spectral.parametrization.BoundedSpectralNorm` on the selected layers.
Export goes the other way: :func:`plain_state_dict` (non-destructive) or
:func:`remove_spectral_norm` (in place) give a state dict that loads, ``strict=True``, into the
unmodified backbone.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sn_lightning.errors import ConfigError, first_line
from sn_lightning.modes import eval_mode
from sn_lightning.spectral import grouped
from sn_lightning.spectral.ops import (
    SUPPORTED_LAYERS,
    batchnorm_act,
    check_input_shape,
    forward_kind,
)
from sn_lightning.spectral.parametrization import (
    METHODS,
    BoundedBatchNormScale,
    BoundedSpectralNorm,
    _accept_plain_checkpoints,
    _check_beta,
    _find,
    _own_class,
    _plain_class,
    _remove,
    _sync_running_var,
    bounded_spectral_norm,
    sync_batchnorm_bounds,
)

__all__ = [
    "BATCHNORM_POLICIES",
    "apply_spectral_norm",
    "convert_sync_batchnorm",
    "normalized_layers",
    "plain_state_dict",
    "remove_spectral_norm",
    "revert_sync_batchnorm",
    "spectral_norms",
]

BATCHNORM_POLICIES: tuple[str, ...] = ("leave", "bound")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _beta_for(name: str, beta: float | Mapping[str, float]) -> float | None:
    """The bound for layer ``name``: the float, or the first matching pattern (None: no match)."""
    if not isinstance(beta, Mapping):
        return beta
    for pattern, value in beta.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def _conv_like(module: nn.Module) -> bool:
    """A module of its own kind that owns a convolution weight (timm's ``CondConv2d``)."""
    return (
        not isinstance(module, SUPPORTED_LAYERS)
        and "conv" in type(module).__name__.lower()
        and isinstance(module._parameters.get("weight"), torch.Tensor)
    )


def _overrides_forward(module: nn.Module) -> bool:
    """True for subclasses (e.g. timm's StdConv2d, BatchNormAct2d) that change what the layer computes.

    Conv/Linear subclasses with a known forward (timm's Conv2dSame and Linear) are not: their
    operator is known (Note [subclass forwards] in ``ops``).
    """
    if isinstance(module, SUPPORTED_LAYERS):
        return forward_kind(module) is None
    base = next((b for b in _BATCHNORMS if isinstance(module, b)), None)
    if base is None or batchnorm_act(module):  # timm's BatchNormAct2d: BatchNorm, then act
        return False
    return type(module).forward is not base.forward


def _skipped_message(skipped: Mapping[str, nn.Module], show: int = 3) -> str:
    """One warning for the layers whose own forward hides their operator (BiT: 53 of them)."""
    names = [f"{n!r} ({type(m).__name__})" for n, m in list(skipped.items())[:show]]
    more = f" and {len(skipped) - show} more" if len(skipped) > show else ""
    message = (
        f"skipping {len(skipped)} layer(s) whose forward differs from their base class's, so "
        f"their operator is unknown: {', '.join(names)}{more}"
    )
    if any("StdConv" in type(m).__name__ for m in skipped.values()):
        message += (
            "; weight-standardized convolutions (timm's StdConv2d, ScaledStdConv2d: BiT, "
            "ResNetV2, NFNet) rescale their weight themselves, so no bound on it holds"
        )
    return message


def _unbounded_norms_message(skipped: Mapping[str, nn.Module], show: int = 3) -> str:
    """One warning for the BatchNorms ``batchnorm="bound"`` cannot bound, saying why."""
    names = [f"{n!r} ({type(m).__name__})" for n, m in list(skipped.items())[:show]]
    more = f" and {len(skipped) - show} more" if len(skipped) > show else ""
    message = (
        f"not bounding {len(skipped)} BatchNorm(s): {', '.join(names)}{more}; bounding one needs "
        "affine=True, running stats and the plain BatchNorm forward"
    )
    if any("FrozenBatchNorm" in type(m).__name__ for m in skipped.values()):
        message += (
            "; frozen BatchNorms (FrozenBatchNorm2d) keep their scale in buffers that training "
            "does not change (the network bound counts them as they are)"
        )
    return message


def _record_input_shapes(
    model: nn.Module, layers: Mapping[str, nn.Module], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """One eval-mode, no-grad forward of a batch of 1; returns each layer's input shape (no batch).

    Layers it does not reach get a second forward with the model's training-mode control flow
    (:func:`_training_branches`): auxiliary heads that only training runs (torchvision's
    GoogLeNet and Inception v3 ``aux_logits``).
    """
    shapes = _dry_forward(model, layers, input_shape, training=False)
    missing = {n: m for n, m in layers.items() if n not in shapes}
    if missing:
        shapes.update(_dry_forward(model, missing, input_shape, training=True))
    return shapes


@contextlib.contextmanager
def _training_branches(model: nn.Module) -> Iterator[None]:
    """The model in training mode but for its normalization and dropout layers, state kept.

    ``self.training`` then takes the training branches (auxiliary heads) while BatchNorm reads
    its running statistics (a batch of 1 has no batch statistics) and nothing random runs;
    buffers, the modes and the random generators are restored on exit.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"})
    with eval_mode(model):  # restores every module's mode on exit
        model.train()
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)):
                m.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _dry_forward(
    model: nn.Module, layers: Mapping[str, nn.Module], input_shape: Sequence[int], *, training: bool
) -> dict[str, tuple[int, ...]]:
    """The input shapes ``layers`` see in one no-grad forward of a batch of 1 (see above).

    ``training``: through :func:`_training_branches`; a model that fails there records nothing
    more (its unreached layers are then skipped with a warning).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
            if len(args) > 1 or kwargs:  # ConvTranspose's output_size sets its output_padding
                extra = [*(repr(type(a).__name__) for a in args[1:]), *map(repr, kwargs)]
                raise ConfigError(
                    f"layer {name!r} ({type(module).__name__}) is called with arguments besides "
                    f"its input ({', '.join(extra)}); its map then depends on the call, which "
                    "the spectral norm does not track: exclude it"
                )
            shape = tuple(args[0].shape[1:])
            if name in shapes and shapes[name] != shape:
                raise ConfigError(
                    f"layer {name!r} is called with several input shapes ({shapes[name]} and "
                    f"{shape}); one power-iteration vector needs one shape: exclude it"
                )
            shapes[name] = shape

        return record

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    with _training_branches(model) if training else eval_mode(model):
        try:
            with torch.no_grad():
                model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
        except ConfigError:
            raise
        except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as err:
            if training:  # not a run the model can train: nothing it recorded counts
                return {}
            raise ConfigError(
                f"the model cannot take input_shape {tuple(input_shape)} (one input, no batch dim): "
                f"{first_line(err)}"
            ) from err
        finally:
            for h in handles:
                h.remove()
    return shapes


def _check_untied(layers: Mapping[str, nn.Module]) -> None:
    """Refuse selected layers that share one weight Parameter (tied weights).

    Each would be normalized for its own operator, so the tied layers would compute with
    different weights, and removing the bounds writes one of them into the shared tensor.
    """
    owners: dict[int, str] = {}
    for name, m in layers.items():
        first = owners.setdefault(id(m.weight), name)
        if first != name:
            raise ConfigError(
                f"layers {first!r} and {name!r} share one weight Parameter (tied weights), "
                "which per-layer bounds cannot keep tied; untie them, or exclude both "
                "(exclude=[...]: both unbounded)"
            )


def _check_patterns(
    model: nn.Module,
    include: Sequence[str],
    exclude: Sequence[str],
    beta: float | Mapping[str, float],
    batchnorm: str,
) -> None:
    """Every user pattern must match some candidate layer: a typo would otherwise do nothing."""
    kinds = SUPPORTED_LAYERS + (_BATCHNORMS if batchnorm == "bound" else ())
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    groups = {"include": [p for p in include if p != "*"], "exclude": list(exclude)}
    if isinstance(beta, Mapping):
        groups["beta"] = list(beta)
    for key, patterns in groups.items():
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ConfigError(f"{key} patterns must be strings (fnmatch), got {pattern!r}")
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise ConfigError(
                    f"{key} pattern {pattern!r} matches no Linear/Conv layer name (full dotted "
                    f"names, fnmatch; e.g. 'layer1.*'); the model's layers: {shown}"
                )
    if isinstance(beta, Mapping):
        for pattern in beta:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            winners = {n: next(p for p in beta if fnmatch.fnmatchcase(n, p)) for n in matched}
            if all(w != pattern for w in winners.values()):
                first = winners[matched[0]]
                raise ConfigError(
                    f"beta pattern {pattern!r} never applies: every layer it matches (e.g. "
                    f"{matched[0]!r}) matches the earlier pattern {first!r}, and the first "
                    f"matching pattern wins; put {pattern!r} before {first!r}"
                )


def apply_spectral_norm(
    model: nn.Module,
    *,
    beta: float | Mapping[str, float] = 1.0,
    input_shape: Sequence[int],
    method: Literal["operator", "matrix"] = "operator",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    n_power_iterations: int = 1,
    init_iterations: int = 20,
    detach_uv: bool = True,
    batchnorm: Literal["leave", "bound"] = "leave",
    cuda_graph: bool = True,
    batch_fold: bool = True,
) -> nn.Module:
    """Bound every selected Conv/Linear layer's operator norm by beta, in place.

    Each selected layer gets ``W -> W / max(1, sigma / beta)`` (Farnia et al. 2019) with sigma
    the norm of its operator at the resolution it sees inside ``model``, recorded by one
    eval-mode, no-grad forward of ``zeros(1, *input_shape)`` (modes are restored afterwards).

    Selected layers: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` whose name
    matches a pattern of ``include``, none of ``exclude``, and (when ``beta`` is a mapping) a key
    of ``beta``. Names are ``model.named_modules()`` names (``net.layer1.0.conv1``); patterns use
    ``fnmatch``. Subclasses that override ``forward`` with a map this package does not know
    (timm's ``StdConv2d``) are skipped with a warning; timm's ``Conv2dSame`` (TF "same" padding)
    is normalized for its padded operator. Conv-like modules that are not torch layers (timm's
    ``CondConv2d``) and convolutions that neither the dry forward nor a second one with the
    training-mode branches reaches (``aux_logits`` heads are reached) are skipped with a
    warning; Linear layers need no shape and are always kept. Raw weight parameters used
    functionally (``nn.MultiheadAttention.in_proj_weight``, timm's ``pos_embed``) are not layers
    and are left alone. Layers sharing one weight Parameter are refused.

    Using the result: the bound holds at ``input_shape``; a convolution run at another
    resolution warns once (its operator norm there can exceed beta). ``u`` follows the weights
    one power-iteration round per training forward, so after many optimizer steps a layer can
    sit a few percent above beta until :func:`refresh_spectral_norm` (run it before evaluating
    or exporting, and on averaged copies such as ``AveragedModel(use_buffers=False)``, which do
    not average ``u``). Parameter names become ``<layer>.parametrizations.weight.original``:
    build optimizers after this call. A plain checkpoint loads into the result as well (its
    ``weight`` keys map onto ``original`` and ``u`` is converged for them; parametrization Note
    [plain load]). Remove the bounds (:func:`remove_spectral_norm`) before pickling,
    ``torch.jit.trace`` or ``torch.export``.
    Apply before wrapping in ``DistributedDataParallel``.

    Args:
        model: any ``nn.Module`` taking a ``(1, *input_shape)`` tensor.
        beta: one bound for all layers, or ``{pattern: bound}``; the first matching pattern
            wins and layers that match none are left alone. All bounds > 0 (``math.inf``: no
            rescaling, sigma is still tracked).
        input_shape: ``(C, H, W)`` of one model input, no batch dim.
        method: ``"operator"`` (exact operator norm) or ``"matrix"`` (reshaped kernel, like
            ``torch.nn.utils.parametrizations.spectral_norm``, with the beta clamp).
        include: ``fnmatch`` patterns of layer names to normalize.
        exclude: patterns of layer names to leave alone (wins over ``include``).
        n_power_iterations: power-iteration rounds per training forward.
        init_iterations: warm-up Krylov steps at registration (ops Note [Krylov refresh]).
        detach_uv: stop gradients through u, v (PyTorch) or not (reference code).
        batchnorm: ``"leave"`` (the reference: BN untouched) or ``"bound"``: every selected
            BatchNorm1d/2d/3d (same name filters and beta) gets
            ``gamma -> gamma / max(1, s / beta)`` with ``s = max_i |gamma_i| /
            sqrt(running_var_i + eps)``, its eval-mode Lipschitz constant
            (:class:`BoundedBatchNormScale`).
        cuda_graph: on CUDA, replay each layer's power iteration as a captured CUDA graph
            (fewer kernel launches; Note [CUDA graphs] in ``parametrization``).
        batch_fold: on CPU, training forwards of plain Conv/Linear layers compute the power
            iteration's ``A u`` inside their own batch and rescale the output instead of the
            weight (same values; Note [power iteration in the batch] in ``fused``).

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: unknown method or batchnorm policy, a bound <= 0, already-normalized layers.
        ConfigError (a ValueError): a bad ``input_shape`` or one the model cannot take, an
            include/exclude/beta pattern that matches no layer, a layer called with two input
            shapes, or no layer selected.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    if batchnorm not in BATCHNORM_POLICIES:
        raise ValueError(f"unknown batchnorm policy {batchnorm!r}; valid: {BATCHNORM_POLICIES}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConfigError(
            "apply_spectral_norm got a DistributedDataParallel wrapper; apply it to the module "
            "before wrapping (DDP registers the parameters it reduces when it is built)"
        )
    if isinstance(beta, Mapping):
        for pattern, value in beta.items():
            if not isinstance(pattern, str):
                raise ValueError(f"beta mapping keys must be name patterns, got {pattern!r}")
            try:
                _check_beta(value)
            except ValueError as err:
                raise ValueError(f"beta[{pattern!r}]: {err}") from None
    else:
        _check_beta(beta)
    if isinstance(include, str) or isinstance(exclude, str):
        raise ValueError(
            f"include/exclude must be sequences of patterns, got {include!r}, {exclude!r}"
        )
    input_shape = check_input_shape(input_shape)
    _check_patterns(model, include, exclude, beta, batchnorm)

    layers: dict[str, nn.Module] = {}
    norms: dict[str, nn.Module] = {}
    own_forward: dict[str, nn.Module] = {}
    unbounded_norms: dict[str, nn.Module] = {}
    conv_like: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not _match(name, include) or _match(name, exclude) or _beta_for(name, beta) is None:
            continue
        if _conv_like(m):
            conv_like[name] = m
        elif isinstance(m, SUPPORTED_LAYERS):
            if _overrides_forward(m):
                own_forward[name] = m
                continue
            if _find(m, "weight", BoundedSpectralNorm) is not None:
                raise ValueError(f"layer {name!r} already has a bounded spectral norm")
            layers[name] = m
        elif batchnorm == "bound" and isinstance(m, _BATCHNORMS):
            if not m.affine or m.running_var is None or _overrides_forward(m):
                unbounded_norms[name] = m
                continue
            norms[name] = m
        elif batchnorm == "bound" and "FrozenBatchNorm" in type(m).__name__:
            unbounded_norms[name] = m  # torchvision's and timm's: buffers, not parameters
    if own_forward:
        warnings.warn(_skipped_message(own_forward), stacklevel=2)
    if conv_like:
        shown = [f"{n!r} ({type(m).__name__})" for n, m in list(conv_like.items())[:3]]
        more = f" and {len(conv_like) - 3} more" if len(conv_like) > 3 else ""
        warnings.warn(
            f"skipping {len(conv_like)} convolution-like module(s) that are not torch Conv "
            f"layers, so their weights stay unbounded: {', '.join(shown)}{more}",
            stacklevel=2,
        )
    if unbounded_norms:
        warnings.warn(_unbounded_norms_message(unbounded_norms), stacklevel=2)
    if not layers and not norms:
        raise ConfigError(
            f"no Linear/Conv/ConvTranspose layer matched include={tuple(include)}, "
            f"exclude={tuple(exclude)}, beta patterns="
            f"{tuple(beta) if isinstance(beta, Mapping) else 'all'}"
        )

    _check_untied(layers)
    convs = {n: m for n, m in layers.items() if not isinstance(m, nn.Linear)}
    shapes = _record_input_shapes(model, convs, input_shape) if convs else {}
    members: list[tuple[nn.Module, BoundedSpectralNorm]] = []
    resolution_warning = {"warned": False}
    for name, m in layers.items():
        shape = shapes.get(name)
        if shape is None and name in convs:
            warnings.warn(
                f"skipping {name!r}: not called in the dry forward (eval or training mode)",
                stacklevel=2,
            )
            continue
        if isinstance(m, nn.Linear):
            shape = (m.in_features,)
        b = _beta_for(name, beta)
        assert b is not None
        bounded_spectral_norm(
            m,
            input_shape=shape,
            beta=b,
            method=method,
            n_power_iterations=n_power_iterations,
            init_iterations=init_iterations,
            detach_uv=detach_uv,
            cuda_graph=cuda_graph,
            batch_fold=batch_fold,
        )
        p = _find(m, "weight", BoundedSpectralNorm)
        p.network_input_shape = input_shape  # the network bound's default (report.py)
        p.layer_name = name  # for warnings
        p.resolution_warning = resolution_warning  # one warning per model
        members.append((m, p))
    if members:  # on CUDA: all layers' iterations in one graph (Note [one graph per model])
        grouped.install(model, members)
    for name, m in norms.items():
        b = _beta_for(name, beta)
        assert b is not None
        parametrize.register_parametrization(m, "weight", BoundedBatchNormScale(m, b))
        m.register_forward_pre_hook(_sync_running_var)
        _accept_plain_checkpoints(m)
    return model


def normalized_layers(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{name: (layer, parametrization)}`` for every BoundedSpectralNorm / BoundedBatchNormScale."""
    out: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, m in model.named_modules():
        p = _find(m, "weight", BoundedSpectralNorm) or _find(m, "weight", BoundedBatchNormScale)
        if p is not None:
            out[name] = (m, p)
    return out


def remove_spectral_norm(model: nn.Module) -> nn.Module:
    """Bake the normalized weights in and remove all bounds, in place; returns ``model``.

    Afterwards ``model.state_dict()`` loads (``strict=True``) into the unmodified backbone and
    reproduces the normalized model's eval-mode outputs. Parameters keep their identity.
    """
    grouped.uninstall(model)
    for m, p in normalized_layers(model).values():
        _remove(m, "weight")
        if isinstance(p, BoundedBatchNormScale):
            for key in [k for k, h in m._forward_pre_hooks.items() if h is _sync_running_var]:
                del m._forward_pre_hooks[key]
    return model


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the unmodified backbone, with normalized weights; ``model`` is untouched.

    Every parametrized tensor appears under its plain key (``conv.weight``) with the value an
    eval-mode forward uses; the parametrization entries (``original``, ``u``) are dropped. Load
    it into a freshly created backbone with ``strict=True`` (STYLE 3.6 (8)).
    """
    sync_batchnorm_bounds(model)
    state = model.state_dict()
    plain: dict[str, Tensor] = OrderedDict()
    values: dict[str, Tensor] = {}
    containers: set[str] = set()  # the modules holding parametrizations ("a.parametrizations")
    with eval_mode(model), torch.no_grad():
        for name, m in model.named_modules():
            if parametrize.is_parametrized(m):
                prefix = f"{name}." if name else ""
                containers.add(f"{prefix}parametrizations")
                for tensor_name in m.parametrizations:
                    values[f"{prefix}parametrizations.{tensor_name}."] = (
                        getattr(m, tensor_name).detach().clone()
                    )
    for key, value in state.items():
        for pre, baked in values.items():
            if key.startswith(pre):
                if key == pre + "original":
                    # "a.parametrizations.weight." -> "a.weight"
                    plain[pre.replace("parametrizations.", "")[:-1]] = baked
                break
        else:
            plain[key] = value
    # The per-module versions that load_state_dict hands to _load_from_state_dict (BatchNorm,
    # torchvision's MNASNet check theirs), less the parametrization containers' own entries.
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        plain._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, v)
            for k, v in metadata.items()
            if not any(k == c or k.startswith(c + ".") for c in containers)
        )
    return plain


def spectral_norms(model: nn.Module, *, normalized: bool = False) -> dict[str, float]:
    """Current sigma estimate per normalized layer, cheap enough to log every epoch.

    For a BoundedSpectralNorm: sigma of the *unnormalized* weight from the stored ``u`` and
    ``n_power_iterations`` rounds (what the next forward would use; no state is changed). With
    ``normalized=True``: ``min(sigma, beta)``, the estimate for the weight in use. For a bounded
    BatchNorm: its exact eval-mode scale ``max |gamma| / sqrt(var + eps)`` (before or after the
    bound). These are lower estimates; use ``spectral_norm_report`` for upper bounds.
    """
    sync_batchnorm_bounds(model)
    out: dict[str, float] = {}
    for name, (m, p) in normalized_layers(model).items():
        original = m.parametrizations.weight.original
        if isinstance(p, BoundedSpectralNorm):
            sigma = float(p.sigma(original))
        else:
            assert isinstance(p, BoundedBatchNormScale)
            with torch.no_grad():
                sigma = float(p.scale(original))
        out[name] = min(sigma, p.beta) if normalized else sigma
    return out


# Note [SyncBatchNorm by class]
#   ``nn.SyncBatchNorm.convert_sync_batchnorm`` (what Lightning's ``sync_batchnorm=True`` runs)
#   builds a new module and assigns it the old one's ``weight``. A bounded BatchNorm's ``weight``
#   is a parametrization's computed tensor, which a Parameter slot refuses (TypeError), and
#   timm's BatchNormAct2d becomes a plain SyncBatchNorm whose forward never calls its ``act``:
#   every activation after a BatchNorm silently disappears. SyncBatchNorm adds one attribute
#   (``process_group``) to BatchNorm and changes only ``forward``, so here each module changes
#   class in place instead (Parameters, buffers, hooks and parametrizations stay the same objects;
#   a parametrized module gets a parametrized class over the new base, as parametrize makes) and
#   remembers its old class for the revert. timm's BatchNormAct2d becomes timm's SyncBatchNormAct.

_UNSYNCED_CLASS = "_sn_unsynced_class"


def _rebase(module: nn.Module, base: type[nn.Module]) -> None:
    """Give ``module`` the class ``base`` in place (Note [SyncBatchNorm by class])."""
    if parametrize.is_parametrized(module):
        _own_class(module, base)
    else:
        module.__class__ = base


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every BatchNorm of ``model`` a ``SyncBatchNorm``, in place, keeping bounds; returns it.

    For multi-GPU runs with synchronized BatchNorm statistics. Unlike
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` it keeps ``apply_spectral_norm(batchnorm="bound")``
    bounds (that one raises a TypeError on them) and timm's activations (timm's BatchNormAct2d
    becomes timm's SyncBatchNormAct, not a SyncBatchNorm that drops its ``act``): each module
    changes class in place, so Parameters, buffers, hooks and bounds stay the same objects (Note
    [SyncBatchNorm by class]). BatchNorm subclasses with a forward of their own are left as they
    are, with one warning. :func:`revert_sync_batchnorm` restores the old classes.

    Args:
        model: any module; BatchNorm1d/2d/3d (and subclasses with their forward) are converted.
        process_group: the group to synchronize over (None: the whole world).
    """
    norm_act = sys.modules.get("timm.layers.norm_act")
    left: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.SyncBatchNorm):
            continue
        if batchnorm_act(m):  # timm is loaded: its module is in sys.modules
            target: type[nn.Module] = norm_act.SyncBatchNormAct  # type: ignore[union-attr]
        elif not _overrides_forward(m) and isinstance(m, _BATCHNORMS):
            target = nn.SyncBatchNorm
        else:
            left.append(f"{name!r} ({_plain_class(m).__name__})")
            continue
        old = _plain_class(m)
        _rebase(m, target)
        m.process_group = process_group
        m.__dict__[_UNSYNCED_CLASS] = old
    if left:
        warnings.warn(
            f"not synchronizing {len(left)} BatchNorm(s) with a forward of their own (their "
            f"statistics stay per process): {', '.join(left[:3])}"
            + (f" and {len(left) - 3} more" if len(left) > 3 else ""),
            stacklevel=2,
        )
    return model


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` in place (the old classes, bounds kept); returns it.

    SyncBatchNorms that it did not convert (the model's own) are left as they are.
    """
    for m in model.modules():
        old = m.__dict__.pop(_UNSYNCED_CLASS, None)
        if old is not None:
            _rebase(m, old)
            del m.process_group
    return model
