"""A training order and augmentation that a resumed run repeats exactly (Note [exact resume]).

Note [exact resume]
    A run resumed from a checkpoint saved at the end of epoch k should train epochs k+1, ...
    exactly as the uninterrupted run did. Three random streams feed a training epoch, and none
    of them lives in a Lightning checkpoint: the shuffle, the augmentation (drawn inside
    DataLoader workers, whose seeds come from when the workers were started) and the global
    RNG of the training step (random attack starts, dropout). So:

    - :class:`VisitSampler` draws pass p's permutation from ``derive_seed(seed, p)``, where p
      counts the passes started; the data module saves p in the checkpoint
      (``ImageDataModule.state_dict``). It yields ``(index, visit seed)`` pairs, one seed per
      visit of an example, and :class:`SeededVisits` runs the dataset's random transforms
      under that seed, whichever worker (or the main process) loads it and whenever. It is a
      ``DistributedSampler``, so Lightning keeps it under DDP, and it shards one permutation
      over the ranks as DistributedSampler does.
    - The classifier reseeds the global RNGs at every training epoch's start from
      ``derive_seed(seed_everything, epoch, rank)``.

    A pass is counted when its iteration starts, which is when the DataLoader creates its
    iterator: Lightning creates the first epoch's iterator before it restores a checkpoint's
    epoch, so the epoch number (``set_epoch``) is not yet right then, while the restored count
    is. Resumption is exact at epoch boundaries; a checkpoint saved mid-epoch restarts that
    epoch's data with the next permutation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["SeededVisits", "VisitSampler", "derive_seed", "reseed_global_rngs"]

_SEED_BITS = 63


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` from integers; distinct tuples give independent streams.

    numpy's ``SeedSequence`` hashes the tuple (negative parts are taken modulo 2**64).
    """
    entropy = [int(p) % 2**64 for p in parts]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state) >> (64 - _SEED_BITS)


def reseed_global_rngs(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch's (CPU and every accelerator)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class VisitSampler(DistributedSampler):
    """Seeded shuffle yielding ``(index, visit seed)``; one shard of it per rank.

    Pass p (counted in :attr:`passes`, from 0) is a permutation of the ``len(dataset)``
    indices drawn from ``derive_seed(seed, p)`` (``shuffle=False``: the indices in order),
    padded by repeating its start to a multiple of ``num_replicas`` (as ``DistributedSampler``
    with ``drop_last=False``); rank r takes positions r, r + num_replicas, ... Every position
    gets its own visit seed from the same generator. ``set_epoch`` is accepted and ignored: the
    order follows the pass count (Note [exact resume]).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        passes: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.passes = passes

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.passes))
        self.passes += 1
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (self.total_size,), generator=g)
        if self.total_size > n:
            order = order.repeat(math.ceil(self.total_size / n))[: self.total_size]
        shard = slice(self.rank, self.total_size, self.num_replicas)
        return iter(list(zip(order[shard].tolist(), seeds[shard].tolist(), strict=True)))


class SeededVisits(Dataset):
    """``dataset[i]`` for keys ``(i, seed)``, its random transforms drawn under ``seed``.

    Torch's global CPU generator is seeded for the call and restored after it (about 5 µs), so
    the process's own stream (the main process's, with ``num_workers=0``) is left as it was.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        if isinstance(key, int):  # another sampler's plain index: the process's own stream
            return self.dataset[key]
        index, seed = key
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)
