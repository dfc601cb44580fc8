"""Input normalization as the model's first layer, so data, attacks and radii live in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class InputNormalize(nn.Module):
    """(x - mean) / std per channel; inputs are images in [0, 1] pixel space.

    Args:
        mean: per-channel mean, length C.
        std: per-channel standard deviation, length C, all > 0.

    Shapes: x (N, C, ...) -> (N, C, ...). Lipschitz constant (l2): 1 / min(std).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, ...) in [0, 1] -> normalized (N, C, ...)."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def lipschitz(self) -> float:
        """The l2 Lipschitz constant of this map: 1 / min(std)."""
        return float(1.0 / self.std.min())

    def extra_repr(self) -> str:
        """Mean and std, for print(model)."""
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
