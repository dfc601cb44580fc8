"""The resumable training order and per-visit augmentation seeds (Note [exact resume])."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from sn_lightning.data import TensorImages
from sn_lightning.data.sampling import SeededVisits, VisitSampler, derive_seed, reseed_global_rngs


def test_derive_seed_is_a_pure_function_of_its_parts():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    seeds = {derive_seed(s, e) for s in range(10) for e in range(10)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 1) != derive_seed(1, 0)  # order matters
    assert derive_seed(-1) == derive_seed(2**64 - 1)  # negatives modulo 2**64


def test_each_pass_is_a_permutation_and_the_count_decides_it():
    sampler = VisitSampler(range(50), seed=7)
    first, second = list(sampler), list(sampler)
    assert sampler.passes == 2
    for visits in (first, second):
        assert sorted(i for i, _ in visits) == list(range(50))
        assert len({s for _, s in visits}) == 50  # one seed per visit
    assert [i for i, _ in first] != [i for i, _ in second]
    sampler.set_epoch(0)  # Lightning calls it; the pass count decides, not the epoch
    third = list(sampler)
    assert third != first
    assert list(VisitSampler(range(50), seed=7, passes=1)) == second
    assert list(VisitSampler(range(50), seed=8)) != first


@pytest.mark.parametrize(("n", "world"), [(10, 3), (12, 4), (5, 2), (2, 3)])
def test_ranks_take_disjoint_shards_of_one_padded_permutation(n, world):
    shards = [
        list(VisitSampler(range(n), seed=1, num_replicas=world, rank=r)) for r in range(world)
    ]
    per_rank = -(-n // world)
    assert all(len(shard) == per_rank for shard in shards)
    visits = [v for shard in shards for v in shard]
    assert {i for i, _ in visits} == set(range(n))  # every example, padding repeats some
    assert len({s for _, s in visits}) == per_rank * world  # a padded repeat gets its own seed
    order = [i for i, _ in list(VisitSampler(range(n), seed=1))]
    interleaved = [shards[k % world][k // world][0] for k in range(per_rank * world)]
    assert interleaved[:n] == order  # rank r holds positions r, r + world, ... of one order


@pytest.mark.parametrize("world", [1, 3])
def test_a_resumed_pass_is_the_tail_of_that_pass_on_every_rank(world):
    for rank in range(world):
        whole = VisitSampler(range(20), seed=4, num_replicas=world, rank=rank, passes=2)
        full = list(whole)
        resumed = VisitSampler(range(20), seed=4, num_replicas=world, rank=rank)
        resumed.resume_pass(2, 3)
        assert list(resumed) == full[3:] and resumed.passes == 3
        assert list(resumed) == list(whole)  # the start applies once: pass 3, whole
    with pytest.raises(ValueError, match="cannot resume pass 0 at position 21"):
        VisitSampler(range(20), seed=4).resume_pass(0, 21)
    with pytest.raises(ValueError, match="cannot resume pass -1"):
        VisitSampler(range(20), seed=4).resume_pass(-1, 0)


def _random_crops() -> TensorImages:
    x = torch.arange(20 * 3 * 8 * 8, dtype=torch.float32).reshape(20, 3, 8, 8) / 3840
    return TensorImages(x, torch.arange(20) % 10, v2.RandomCrop(8, padding=2))


def test_a_visit_seed_fixes_the_augmentation_and_leaves_the_global_rng_alone():
    data = SeededVisits(_random_crops())
    torch.manual_seed(0)
    a = data[(3, 123)][0]
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    torch.rand(100)  # another global state
    b = data[(3, 123)][0]
    assert torch.equal(a, b)
    assert not all(torch.equal(a, data[(3, s)][0]) for s in range(124, 130))
    torch.manual_seed(0)
    data[(3, 123)]
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is restored


def test_workers_load_the_same_augmented_batches_as_the_main_process():
    def batches(workers):
        loader = DataLoader(
            SeededVisits(_random_crops()),
            batch_size=4,
            sampler=VisitSampler(range(20), seed=5),
            num_workers=workers,
        )
        return [b[0] for b in loader]

    main, workers = batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))


def test_reseed_global_rngs_seeds_python_numpy_and_torch():
    reseed_global_rngs(derive_seed(3, 4))
    draws = (random.random(), np.random.rand(), torch.rand(()).item())
    reseed_global_rngs(derive_seed(3, 4))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == draws
    torch.manual_seed(derive_seed(3, 4))  # torch's own seeding: the same CPU stream
    assert torch.rand(()).item() == draws[2]
