"""A training order and augmentation that a resumed run repeats exactly (Note [exact resume]).

Note [exact resume]
    A run resumed from a checkpoint, saved at an epoch's end or in the middle of one, should
    continue exactly as the uninterrupted run did. Three random streams feed a training step,
    and none of them lives in a Lightning checkpoint: the shuffle, the augmentation (drawn
    inside DataLoader workers, whose seeds come from when the workers were started) and the
    global RNG of the training step (random attack starts, dropout). So:

    - :class:`VisitSampler` draws pass p's permutation from ``derive_seed(seed, p)`` and yields
      ``(index, visit seed)`` pairs, one seed per visit of an example; :class:`SeededVisits`
      runs the dataset's random transforms under that seed, whichever worker (or the main
      process) loads it and whenever. It is a ``DistributedSampler``, so Lightning keeps it
      under DDP, and it shards one permutation over the ranks as DistributedSampler does.
    - The data module saves the next batch to train, batch k of pass p (epoch p's pass), in
      the checkpoint (``ImageDataModule.state_dict``), read off the trainer's counts as
      Lightning will resume from them: between epochs the next epoch's batch 0; saved after
      the last batch's training step, also the next epoch's batch 0 (Lightning closes that
      epoch on resume); otherwise batch k of the epoch, k the batches whose training step has
      run (after the last batch's validation: k = all, an empty rest). The loader's own count
      runs one batch ahead (Lightning prefetches to spot the last batch). On resume the
      sampler starts pass p at batch k without loading the batches before it. Lightning
      restores the data module before it builds the first training iterator;
      :class:`ResumableLoader` also hands the same state to Lightning's loader interface,
      which tells Lightning the loader resumes mid-epoch.
    - :class:`~sn_lightning.lit.classifier.ReseedEachBatch` reseeds the global RNGs before
      every training batch's other hooks from ``derive_seed(seed_everything, epoch, batch
      index, rank)``.

    A pass is counted when its iteration starts, which is when the DataLoader creates its
    iterator: Lightning creates the first epoch's iterator before it restores a checkpoint's
    epoch, so the epoch number (``set_epoch``) is not yet right then, while the restored
    position is.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableLoader", "SeededVisits", "VisitSampler", "derive_seed", "reseed_global_rngs"]

_SEED_BITS = 63


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` from integers; distinct tuples give independent streams.

    numpy's ``SeedSequence`` hashes the tuple (negative parts are taken modulo 2**64).
    """
    entropy = [int(p) % 2**64 for p in parts]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state) >> (64 - _SEED_BITS)


def reseed_global_rngs(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch's, CPU and accelerators.

    Torch's: the CPU generator and those of every initialized accelerator (CUDA, XPU, MTIA;
    MPS where available), the same state as ``torch.manual_seed(seed)`` on each, in about
    10 µs instead of 170 µs (2 CPU cores, measured): ``torch.manual_seed`` also queues seeds
    for accelerators not yet initialized, formatting a stack trace for each, and this runs
    once a training batch. An accelerator initialized later starts from its own queued or
    initial seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    for backend in (torch.cuda, torch.xpu, torch.mtia):
        if backend.is_initialized():
            backend.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)


class VisitSampler(DistributedSampler):
    """Seeded shuffle yielding ``(index, visit seed)``; one shard of it per rank.

    Pass p (counted in :attr:`passes`, from 0) is a permutation of the ``len(dataset)``
    indices drawn from ``derive_seed(seed, p)`` (``shuffle=False``: the indices in order),
    padded by repeating its start to a multiple of ``num_replicas`` (as ``DistributedSampler``
    with ``drop_last=False``); rank r takes positions r, r + num_replicas, ... Every position
    gets its own visit seed from the same generator. ``set_epoch`` is accepted and ignored: the
    order follows the pass count (Note [exact resume]). :attr:`start` (set by
    :meth:`resume_pass`) makes the next pass begin at that position of this rank's shard.
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
        self.start = 0

    def resume_pass(self, pass_index: int, start: int) -> None:
        """Make the next iteration pass ``pass_index``, from position ``start`` of this shard."""
        if pass_index < 0 or not 0 <= start <= self.num_samples:
            raise ValueError(
                f"cannot resume pass {pass_index} at position {start}: a pass index is >= 0 and "
                f"a position in [0, {self.num_samples}]"
            )
        self.passes, self.start = pass_index, start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.passes))
        self.passes += 1
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (self.total_size,), generator=g)
        if self.total_size > n:
            order = order.repeat(math.ceil(self.total_size / n))[: self.total_size]
        shard = slice(
            self.rank + self.start * self.num_replicas, self.total_size, self.num_replicas
        )
        self.start = 0
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


class ResumableLoader(DataLoader):
    """A training DataLoader that tells Lightning it resumes mid-epoch (Note [exact resume]).

    Its ``state_dict`` / ``load_state_dict`` (Lightning's loader interface) are those of the
    object that owns the training order, the data module: ``state`` returns the next batch to
    train, ``load`` points the sampler there. Lightning saves the loader's state and loads it
    back when it resumes mid-epoch, except where ``configure_optimizers`` reads
    ``trainer.estimated_stepping_batches``, which builds the loader before the checkpoint's
    loops are restored; the data module's own state, restored earlier, covers that case.
    """

    def __init__(
        self,
        *args: Any,
        state: Callable[[], dict[str, int]],
        load: Callable[[dict[str, int]], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._state, self._load = state, load

    def state_dict(self) -> dict[str, int]:
        """The next training batch (see the data module's ``state_dict``)."""
        return self._state()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next iteration start at that batch."""
        self._load(state_dict)
