"""Shared fixtures: sklearn digits (8x8, [0, 1]) and tiny models trained for a few seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from sn_lightning.models.normalize import InputNormalize


def tiny_cnn(batchnorm: bool = True) -> nn.Sequential:
    """(N, 1, 8, 8) in [0, 1] -> (N, 10) logits; normalization is the first layer."""
    return nn.Sequential(
        InputNormalize([0.3], [0.4]),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16) if batchnorm else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def smooth_mlp() -> nn.Sequential:
    """A twice-differentiable MLP (softplus, tanh) for finite-difference checks."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.Softplus(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads that spin against other processes made these tests up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): x (N, 1, 8, 8) float32 in [0, 1], y (N,) int64."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - 63, 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    return model.eval()


@pytest.fixture(scope="session")
def trained_cnn(digits: tuple[Tensor, ...]) -> nn.Module:
    """A BatchNorm CNN trained on digits (~97% test accuracy), in eval mode; do not mutate."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _single_thread (session fixtures run before it)
    try:
        model = _train(tiny_cnn(), x_train, y_train, epochs=12)
    finally:
        torch.set_num_threads(threads)
    assert accuracy(model, x_test, y_test) > 0.93
    return model


@pytest.fixture
def model(trained_cnn: nn.Module) -> nn.Module:
    """A fresh copy of the trained CNN that a test may put in any mode."""
    import copy

    return copy.deepcopy(trained_cnn)


@pytest.fixture
def batch(digits: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """64 test images and labels."""
    _, _, x_test, y_test = digits
    return x_test[:64].clone(), y_test[:64].clone()
