"""The grouped path (grouped.py: all layers' rescales in one step) against the per-layer path.

On CUDA the group replays captured graphs (tests/test_cuda.py); here ``_EAGER_FOR_TESTS`` runs
the same code eagerly on CPU, so its bookkeeping is checked on every machine: values, gradients
and ``u`` equal the per-layer path's, and the cases that must fall back to it do.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sn_lightning.spectral import (
    apply_spectral_norm,
    freeze_spectral_norm,
    grouped,
    remove_spectral_norm,
)
from sn_lightning.spectral.parametrization import BoundedSpectralNorm


class _Shared(nn.Module):
    """A small CNN whose ``conv2`` runs twice per forward and whose ``unused`` head never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6 * 16, 5)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = self.conv2(h)  # weight sharing: the second call runs its own parametrization
        return self.fc(nn.functional.avg_pool2d(h, 2).flatten(1))


def _twins(beta: float = 0.5) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = _Shared()
    apply_spectral_norm(net, beta=beta, input_shape=(3, 8, 8), batch_fold=False)
    return copy.deepcopy(net), copy.deepcopy(net)


@pytest.fixture
def eager_group(monkeypatch):
    monkeypatch.setattr(grouped, "_EAGER_FOR_TESTS", True)


def _norms(model: nn.Module) -> list[BoundedSpectralNorm]:
    return [m for m in model.modules() if isinstance(m, BoundedSpectralNorm)]


def _count_iterations(monkeypatch) -> list[int]:
    """Count ``BoundedSpectralNorm._iterate`` calls (one per layer estimate)."""
    calls = [0]
    original = BoundedSpectralNorm._iterate

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BoundedSpectralNorm, "_iterate", counting)
    return calls


def _train(model: nn.Module, group: bool, steps: int = 3, two_forwards: bool = False) -> list:
    """SGD steps with the grouped path on or off; returns each step's gradients."""
    grouped._EAGER_FOR_TESTS = group
    try:
        torch.manual_seed(1)
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        model.train()
        grads = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if two_forwards:  # clean + adversarial loss: two graphs alive before one backward
                loss = loss + nn.functional.cross_entropy(model(x.flip(-1)), y)
            loss.backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
            opt.step()
        return grads
    finally:
        grouped._EAGER_FOR_TESTS = False


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("two_forwards", [False, True])
def test_grouped_training_matches_per_layer(two_forwards):
    group, single = _twins()
    g_grads = _train(group, True, two_forwards=two_forwards)
    s_grads = _train(single, False, two_forwards=two_forwards)
    for step_g, step_s in zip(g_grads, s_grads, strict=True):
        for a, b in zip(step_g, step_s, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    _assert_same(group, single)
    # the rescale really shrank the weights and the unused head has no gradient
    assert any(p.grad is None for p in group.unused.parameters())
    assert all(n.__dict__["_pending"] is None for n in _norms(group))  # nothing left behind


def _hvp(model: nn.Module, group: bool) -> list[torch.Tensor]:
    """A Hessian-vector product of an eval-mode loss in the weights (second derivatives)."""
    grouped._EAGER_FOR_TESTS = group
    try:
        torch.manual_seed(2)
        x = torch.randn(2, 3, 8, 8)
        ws = [p for n, p in model.named_parameters() if n.endswith("original")]
        vec = [torch.randn_like(w) for w in ws]
        model.eval()
        loss = model(x).square().sum()
        grads = torch.autograd.grad(loss, ws, create_graph=True, allow_unused=True)
        dot = sum((g * e).sum() for g, e in zip(grads, vec, strict=True) if g is not None)
        hvp = torch.autograd.grad(dot, ws, allow_unused=True)
        return [torch.zeros_like(w) if h is None else h for h, w in zip(hvp, ws, strict=True)]
    finally:
        grouped._EAGER_FOR_TESTS = False


def test_grouped_second_derivatives_match_per_layer():
    """The group's backward builds each layer's gradient as a graph under ``create_graph`` (it
    was once-differentiable, and PyTorch then returned wrong second derivatives silently)."""
    group, single = _twins()
    hvps = _hvp(group, True), _hvp(single, False)
    assert sum(float(h.abs().max()) > 0 for h in hvps[0]) == 3  # all but the unused head
    for a, b in zip(*hvps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grouped_path_replaces_the_per_layer_estimates(eager_group, monkeypatch):
    group, _ = _twins()
    calls = _count_iterations(monkeypatch)
    group.train()
    group(torch.randn(2, 3, 8, 8))
    # one grouped estimate per layer (4, the unused head too) + conv2's second call on its own
    assert calls[0] == 5
    u = group.unused.parametrizations.weight[0].u
    u.copy_(torch.nn.functional.normalize(torch.randn_like(u)))  # not yet converged
    unused_u = u.clone()
    group(torch.randn(2, 3, 8, 8))
    assert not torch.allclose(unused_u, u)  # advanced although the head never ran


def test_grouped_eval_forward_matches_and_changes_no_buffer(eager_group):
    group, single = _twins()
    x = torch.randn(3, 3, 8, 8)
    before = {k: v.clone() for k, v in group.state_dict().items()}
    group.eval()
    single.eval()
    with torch.no_grad():
        out = group(x)
    grouped._EAGER_FOR_TESTS = False
    with torch.no_grad():
        torch.testing.assert_close(out, single(x), rtol=1e-5, atol=1e-6)
    for k, v in group.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mixed_modes_and_cached_forwards_fall_back(eager_group, monkeypatch):
    group, _ = _twins()
    group.train()
    calls = _count_iterations(monkeypatch)
    with freeze_spectral_norm(group.conv1):  # one layer frozen: modes differ, no grouping
        group(torch.randn(2, 3, 8, 8))
    assert calls[0] == 4  # conv1, conv2 twice, fc: per layer; the unused head not at all
    calls[0] = 0
    group.eval()
    with parametrize.cached():
        group(torch.randn(2, 3, 8, 8))
    assert calls[0] == 3  # the cache computes each used weight once, per layer


def test_deepcopy_state_dict_and_removal(eager_group):
    group, single = _twins()
    copied = copy.deepcopy(group)
    loaded = _twins(beta=0.5)[0]
    loaded.load_state_dict(group.state_dict())
    for model in (copied, loaded):
        _train(model, True, steps=1)
    _train(single, False, steps=1)
    _assert_same(copied, single)
    _assert_same(loaded, single)
    # the copy's hooks drive the copy's layers, never the original's
    _assert_same(group, _twins()[0])
    remove_spectral_norm(copied)
    hooks = [*copied._forward_pre_hooks.values(), *copied._forward_hooks.values()]
    assert not any(isinstance(getattr(h, "__self__", None), grouped.SpectralGroup) for h in hooks)
    assert not parametrize.is_parametrized(copied.conv1)
    copied(torch.randn(2, 3, 8, 8))  # a plain model again


def test_submodule_forward_and_replicas_use_the_per_layer_path(eager_group, monkeypatch):
    group, _ = _twins()
    group.train()
    calls = _count_iterations(monkeypatch)
    group.conv1(torch.randn(2, 3, 8, 8))  # the hook sits on the model, not on conv1
    assert calls[0] == 1
    calls[0] = 0
    group._is_replica = True  # what DataParallel's replicate() sets
    group(torch.randn(2, 3, 8, 8))
    assert calls[0] == 4


def test_group_hooks_do_not_block_bounds_or_the_attack_fold():
    from sn_lightning.attacks.fold import folded_view
    from sn_lightning.spectral import network_lipschitz_bound

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 3),
    )
    apply_spectral_norm(net, beta=0.5, input_shape=(3, 6, 6))
    assert any(grouped.is_group_hook(h) for h in net._forward_pre_hooks.values())
    net.eval()
    bound, why = network_lipschitz_bound(net, input_shape=(3, 6, 6))
    assert bound is not None and bound > 0, why
    with parametrize.cached():
        assert folded_view(net) is not net  # Conv -> BatchNorm folded despite the hooks
    net.register_forward_pre_hook(lambda m, args: None)  # a user's hook: refused, not folded
    assert network_lipschitz_bound(net, input_shape=(3, 6, 6))[0] is None
    with parametrize.cached():
        assert folded_view(net) is net
