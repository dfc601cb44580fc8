"""One factory from a spec string to a model whose first layer is the input normalization.

Specs: ``timm:<name>`` (any timm model), ``torchvision:<name>`` (any torchvision classification model),
``sn_lightning:<name>`` (the built-in small nets). A bare name means a built-in if one is registered
under it, else timm (timm's own convention for unprefixed names).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sn_lightning._net import unreachable_reason
from sn_lightning.errors import ConfigError, choices_hint, first_line
from sn_lightning.models import small
from sn_lightning.models.normalize import InputNormalize

SOURCES = ("timm", "torchvision", "sn_lightning")


def parse_backbone(spec: str) -> tuple[str, str]:
    """Split ``source:name``; a bare name is a built-in if registered, else timm."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"backbone must be a non-empty string like 'timm:resnet18', got {spec!r}")
    if ":" in spec:
        source, name = spec.split(":", 1)
        if source not in SOURCES:
            raise ConfigError(
                f"unknown backbone source {source!r} in {spec!r}; valid sources: {', '.join(SOURCES)}"
            )
        return source, name
    return ("sn_lightning" if small.get_builder(spec) else "timm"), spec


def list_backbones(source: str = "sn_lightning", pattern: str = "*") -> list[str]:
    """Backbone specs of one source that match an fnmatch `pattern`."""
    import fnmatch

    if source == "sn_lightning":
        names = small.builtin_names()
    elif source == "timm":
        import timm

        names = timm.list_models()
    elif source == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
    else:
        raise ConfigError(
            f"unknown backbone source {source!r}; valid sources: {', '.join(SOURCES)}"
        )
    return [f"{source}:{n}" for n in names if fnmatch.fnmatch(n, pattern)]


def _adapt_first_conv(net: nn.Module, in_chans: int) -> None:
    """Replace the first Conv2d of `net` by one with `in_chans` inputs (pretrained filters summed/tiled)."""
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_chans:
                    return
                new = nn.Conv2d(
                    in_chans,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    child.padding_mode,
                )
                with torch.no_grad():
                    w = child.weight  # (C_out, C_in, kh, kw)
                    if in_chans == 1:
                        new.weight.copy_(w.sum(dim=1, keepdim=True))
                    else:
                        reps = -(-in_chans // w.shape[1])
                        new.weight.copy_(
                            w.repeat(1, reps, 1, 1)[:, :in_chans] * w.shape[1] / in_chans
                        )
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return
    raise ConfigError("cannot adapt the input channels: the backbone has no Conv2d")


def _create_net(
    source: str,
    name: str,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
    pretrained: bool,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    if source == "sn_lightning":
        builder = small.get_builder(name)
        if builder is None:
            raise ConfigError(
                f"unknown built-in backbone {name!r}; {choices_hint(name, small.builtin_names())}"
            )
        if pretrained:
            raise ConfigError(f"built-in backbone {name!r} has no pretrained weights")
        return builder(num_classes=num_classes, in_chans=in_chans, input_size=input_size, **kwargs)
    if source == "timm":
        import timm

        if not timm.is_model(name):  # a bare name lands here too: suggest the built-ins as well
            choices = [*small.builtin_names(), *timm.list_models()]
            raise ConfigError(
                f"unknown backbone {name!r} (not a built-in or timm model); "
                f"{choices_hint(name, choices)}"
            )
        with _hub_offline_if_unreachable(pretrained):
            return timm.create_model(
                name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
            )
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ConfigError(
            f"unknown torchvision classification backbone {name!r}; {choices_hint(name, names)}"
        )
    kwargs = _torchvision_kwargs(name, in_chans, pretrained, kwargs)
    if not pretrained:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    else:  # the weights fix the head's classes (ImageNet's 1000); a new head replaces it
        categories = len(torchvision.models.get_model_weights(name).DEFAULT.meta["categories"])
        net = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        if num_classes != categories:
            replace_heads(net, categories, num_classes)
    if in_chans != 3:
        _adapt_first_conv(net, in_chans)
    return net


# torchvision models whose training forward returns auxiliary outputs (a named tuple) and whose
# pretrained weights switch on transform_input (an ImageNet re-normalization of channels 0-2)
_AUX_HEAD_MODELS = ("googlenet", "inception_v3")


def _torchvision_kwargs(
    name: str, in_chans: int, pretrained: bool, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """GoogLeNet / Inception v3: ``aux_logits`` and ``transform_input`` off unless given.

    (With weights torchvision loads the auxiliary heads and drops them when ``aux_logits`` was
    not given, and refuses it given as false.)

    Training returns a tensor of logits then, as the classifier's loss needs; the model's
    ``normalize`` layer already normalizes its input (``transform_input`` would map it again,
    and reads 3 channels).

    Raises:
        ConfigError: ``aux_logits=true`` (auxiliary outputs are not trained on), or
            ``transform_input=true`` on inputs without 3 channels.
    """
    kwargs = dict(kwargs)
    if name not in _AUX_HEAD_MODELS:
        return kwargs
    if kwargs.get("aux_logits", False) if pretrained else kwargs.setdefault("aux_logits", False):
        raise ConfigError(
            f"torchvision {name} with aux_logits=true returns auxiliary logits in training, which "
            "sn-lightning does not train on; leave backbone_kwargs.aux_logits unset (false)"
        )
    if kwargs.setdefault("transform_input", False) and in_chans != 3:
        raise ConfigError(
            f"torchvision {name} with transform_input=true reads 3 input channels, the data has "
            f"{in_chans}; leave backbone_kwargs.transform_input unset (false)"
        )
    return kwargs


@contextlib.contextmanager
def _hub_offline_if_unreachable(pretrained: bool) -> Iterator[None]:
    """Hugging Face Hub in offline mode (cache only) while its server cannot be reached.

    Without it, an uncached download is retried for about a minute before it fails; cached
    weights load either way. Uses ``huggingface_hub.constants.HF_HUB_OFFLINE``, which the hub
    reads on each request (``HF_HUB_OFFLINE=1`` in the environment does the same from the start).
    """
    if not pretrained:
        yield
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or unreachable_reason(constants.ENDPOINT) is None:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def replace_heads(net: nn.Module, old_classes: int, num_classes: int) -> list[str]:
    """Give a pretrained torchvision classifier ``num_classes`` outputs: new, untrained heads.

    The heads are the Linear (and SqueezeNet's 1x1 Conv2d) layers with ``old_classes`` outputs:
    the classifier and GoogLeNet's / Inception's auxiliary ones, in every torchvision
    classification model (tests/models). Returns their names.

    Raises:
        ConfigError: no layer has ``old_classes`` outputs.
    """
    heads = [
        name
        for name, m in net.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == old_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == old_classes)
    ]
    if not heads:
        raise ConfigError(
            f"cannot find the {old_classes}-class head of {type(net).__name__} to give it "
            f"{num_classes} classes; pass --model.pretrained=false"
        )
    for name in heads:
        old = net.get_submodule(name)
        factory = {"device": old.weight.device, "dtype": old.weight.dtype}
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(
                old.in_features, num_classes, bias=old.bias is not None, **factory
            )
        else:
            assert isinstance(old, nn.Conv2d)
            new = nn.Conv2d(
                old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,  # type: ignore[arg-type]
                old.dilation, old.groups, old.bias is not None, old.padding_mode, **factory,
            )  # fmt: skip
        net.set_submodule(name, new)
    return heads


def create_backbone(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Sequential:
    """Create ``nn.Sequential(normalize=InputNormalize(mean, std), net=<backbone>)``.

    Args:
        name: ``timm:<name>``, ``torchvision:<name>`` or ``sn_lightning:<name>`` (see module doc).
        num_classes: number of output logits.
        in_chans: input channels; torchvision backbones get their first conv adapted when != 3.
        input_size: (H, W) of the input; the built-ins size their classifier head from it.
        mean: per-channel mean of the [0, 1] inputs; None -> 0 (no shift).
        std: per-channel std; None -> 1 (no scaling).
        pretrained: load pretrained weights (timm / torchvision; needs network access).
        **kwargs: passed to the backbone constructor; None values are dropped (timm convention).

    Returns:
        The model; it maps images (N, in_chans, H, W) in [0, 1] to logits (N, num_classes).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if in_chans < 1:
        raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}")
    source, net_name = parse_backbone(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    mean = list(mean) if mean is not None else [0.0] * in_chans
    std = list(std) if std is not None else [1.0] * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(
            f"mean/std need {in_chans} values (one per channel), got {mean} and {std}"
        )
    try:
        net = _create_net(
            source, net_name, num_classes, in_chans, tuple(input_size), pretrained, kwargs
        )
    except TypeError as err:
        raise ConfigError(
            f"backbone {name!r} rejected its arguments {sorted(kwargs)}: {err}"
        ) from err
    except (OSError, RuntimeError) as err:  # the weights' download (network, cache, checksum)
        if not pretrained:
            raise
        raise ConfigError(
            f"pretrained weights of {name!r} could not be loaded ({first_line(err)}); they "
            "need network access or a filled cache, or pass --model.pretrained=false"
        ) from err
    return nn.Sequential(OrderedDict(normalize=InputNormalize(mean, std), net=net))
