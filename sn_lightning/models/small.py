"""Built-in small nets for small images: the reference paper's nets and the certified-training nets.

Every builder takes ``num_classes``, ``in_chans`` and ``input_size`` ((H, W) of the input) and returns a
plain ``nn.Sequential`` (a feed-forward chain: easy to bound, to trace and to normalize layer by layer).
Inputs are normalized images; normalization is added in front by :func:`create_backbone`.

References:
    Farnia, Zhang, Tse, "Generalizable Adversarial Training via Spectral Normalization", ICLR 2019
    (mini-AlexNet, ELU-Net, MLPs; PAPERS.md 1.6). Fazlyab et al., NeurIPS 2023 (4C3F, 6C2F, 8C2F; 2.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sn_lightning.errors import ConfigError

Builder = Callable[..., nn.Sequential]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under ``sn_lightning:<name>``."""

    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def builtin_names() -> list[str]:
    """Names of the built-in nets, sorted."""
    return sorted(_REGISTRY)


def get_builder(name: str) -> Builder | None:
    """The builder registered under `name`, or None."""
    return _REGISTRY.get(name)


def _flat_features(features: nn.Module, in_chans: int, input_size: tuple[int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, in_chans, *input_size)).numel())


def _head(
    features: nn.Sequential, widths: list[int], flat: int, act: type[nn.Module]
) -> nn.Sequential:
    layers: list[nn.Module] = [*features, nn.Flatten()]
    dims = [flat, *widths]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@register("digits_cnn")
def digits_cnn(
    num_classes: int = 10, in_chans: int = 1, input_size: tuple[int, int] = (8, 8), width: int = 32
) -> nn.Sequential:
    """Small CNN for 8x8 digits: conv3-32, conv3-64, maxpool 2, FC 128, FC classes (ReLU)."""
    features = nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    flat = _flat_features(features, in_chans, input_size)
    return _head(features, [128, num_classes], flat, nn.ReLU)


@register("mini_alexnet")
def mini_alexnet(
    num_classes: int = 10,
    in_chans: int = 3,
    input_size: tuple[int, int] = (28, 28),
    act: str = "relu",
) -> nn.Sequential:
    """Mini-AlexNet of the reference (PAPERS 1.6): conv5x5x96-pool3/2-LRN-conv5x5x256-pool3/2-LRN-FC384-FC192.

    ``act="elu"`` gives the ELU-AlexNet variant.
    """
    activations = {"relu": nn.ReLU, "elu": nn.ELU}
    if act not in activations:
        raise ConfigError(f"mini_alexnet act {act!r} is not one of {', '.join(activations)}")
    a = activations[act]
    features = nn.Sequential(
        nn.Conv2d(in_chans, 96, 5, padding=2),
        a(),
        nn.MaxPool2d(3, 2),
        nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
        nn.Conv2d(96, 256, 5, padding=2),
        a(),
        nn.MaxPool2d(3, 2),
        nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
    )
    flat = _flat_features(features, in_chans, input_size)
    return _head(features, [384, 192, num_classes], flat, a)


@register("elu_net")
def elu_net(
    num_classes: int = 10, in_chans: int = 1, input_size: tuple[int, int] = (28, 28)
) -> nn.Sequential:
    """MNIST ELU-Net of the reference: conv8x8x64 s2 SAME, conv6x6x128 s2 VALID, conv5x5x128 VALID, FC."""
    features = nn.Sequential(
        nn.Conv2d(in_chans, 64, 8, stride=2, padding=3),
        nn.ELU(),
        nn.Conv2d(64, 128, 6, stride=2),
        nn.ELU(),
        nn.Conv2d(128, 128, 5),
        nn.ELU(),
    )
    flat = _flat_features(features, in_chans, input_size)
    return _head(features, [num_classes], flat, nn.ELU)


def _mlp(
    num_classes: int, in_chans: int, input_size: tuple[int, int], hidden: list[int]
) -> nn.Sequential:
    flat = in_chans * input_size[0] * input_size[1]
    return _head(nn.Sequential(), [*hidden, num_classes], flat, nn.ReLU)


@register("mlp1")
def mlp1(
    num_classes: int = 10,
    in_chans: int = 1,
    input_size: tuple[int, int] = (28, 28),
    width: int = 512,
) -> nn.Sequential:
    """MLP with one hidden layer of `width` (reference: 512) and ReLU."""
    return _mlp(num_classes, in_chans, input_size, [width])


@register("mlp2")
def mlp2(
    num_classes: int = 10,
    in_chans: int = 1,
    input_size: tuple[int, int] = (28, 28),
    width: int = 512,
) -> nn.Sequential:
    """MLP with two hidden layers of `width` (reference: 512) and ReLU."""
    return _mlp(num_classes, in_chans, input_size, [width, width])


def _convnet(
    convs: list[tuple[int, int, int, int]],
    fcs: list[int],
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_chans
    for out, k, s, p in convs:
        layers += [nn.Conv2d(c, out, k, stride=s, padding=p), nn.ReLU()]
        c = out
    features = nn.Sequential(*layers)
    flat = _flat_features(features, in_chans, input_size)
    return _head(features, [*fcs, num_classes], flat, nn.ReLU)


@register("c4f3")
def c4f3(
    num_classes: int = 10, in_chans: int = 1, input_size: tuple[int, int] = (28, 28)
) -> nn.Sequential:
    """4C3F (MNIST certified training): 4 convs 32-32-64-64 (k3s1, k4s2), FC 512-512-classes."""
    convs = [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)]
    return _convnet(convs, [512, 512], num_classes, in_chans, input_size)


@register("c6f2")
def c6f2(
    num_classes: int = 10, in_chans: int = 3, input_size: tuple[int, int] = (32, 32)
) -> nn.Sequential:
    """6C2F (CIFAR-10 certified training): 6 convs 32-32-64-64-64-64, FC 512-classes."""
    convs = [
        (32, 3, 1, 1),
        (32, 4, 2, 1),
        (64, 3, 1, 1),
        (64, 4, 2, 1),
        (64, 3, 1, 1),
        (64, 4, 2, 1),
    ]
    return _convnet(convs, [512], num_classes, in_chans, input_size)


@register("c8f2")
def c8f2(
    num_classes: int = 200, in_chans: int = 3, input_size: tuple[int, int] = (64, 64)
) -> nn.Sequential:
    """8C2F (Tiny-ImageNet certified training): 8 convs 64-...-256, FC 256-classes."""
    convs = [
        (64, 3, 1, 1),
        (64, 3, 1, 0),
        (64, 4, 2, 0),
        (128, 3, 1, 1),
        (128, 3, 1, 1),
        (128, 4, 2, 0),
        (256, 3, 1, 1),
        (256, 4, 2, 0),
    ]
    return _convnet(convs, [256], num_classes, in_chans, input_size)
