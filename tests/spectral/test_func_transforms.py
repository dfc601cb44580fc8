"""torch.func transforms (jvp, jacrev, vmap, per-sample grad) on spectrally normalized models.

Oracles: the exported model (``remove_spectral_norm``: plain layers holding the normalized
weights) for input derivatives, and per-example ``torch.autograd.grad`` on the normalized model
itself (its custom-Function gradient, sigma term included) for parameter gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

from sn_lightning.spectral import (
    apply_spectral_norm,
    freeze_spectral_norm,
    grouped,
    remove_spectral_norm,
)


def _model(batchnorm: str = "leave") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    with torch.no_grad():  # norms well above beta: every layer is rescaled
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4.0)
    apply_spectral_norm(model, beta=0.7, input_shape=(3, 8, 8), batchnorm=batchnorm)
    model.train()
    for _ in range(3):  # move the BatchNorm statistics away from their init
        model(torch.randn(16, 3, 8, 8))
    return model.eval()


def _states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("batchnorm", "group"), [("leave", False), ("bound", False), ("leave", True)]
)
def test_input_transforms_match_the_exported_model(batchnorm, group, monkeypatch):
    """``group``: the CUDA path that rescales every layer in one model pre-hook, run eagerly."""
    monkeypatch.setattr(grouped, "_EAGER_FOR_TESTS", group)
    model = _model(batchnorm)
    plain = remove_spectral_norm(copy.deepcopy(model)).eval()
    before = _states(model)
    x = torch.randn(3, 3, 8, 8)
    t = torch.randn_like(x)

    out, tangent = jvp(model, (x,), (t,))
    ref_out, ref_tangent = jvp(plain, (x,), (t,))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-5, atol=1e-6)

    jac = jacrev(model)(x[:1])
    ref = torch.autograd.functional.jacobian(plain, x[:1])
    assert jac.shape == (1, 5, 1, 3, 8, 8)
    torch.testing.assert_close(jac, ref, rtol=1e-5, atol=1e-6)

    rows = vmap(lambda xi: model(xi[None])[0])(x)
    torch.testing.assert_close(rows, plain(x), rtol=1e-5, atol=1e-6)

    after = _states(model)  # eval forwards under transforms change no buffer
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_per_sample_gradients_match_autograd_through_the_normalization():
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))

    def loss(p, xi, yi):
        logits = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(logits, yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    weight = "0.parametrizations.weight.original"
    assert weight in per_sample
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6)
    # the sigma term is in there: holding the scale constant gives another gradient
    s = model[0].weight.detach().norm() / params[weight].norm()
    w = params[weight].clone().requires_grad_()
    conv = nn.functional.conv2d(x[:1], w * s, model[0].bias, padding=1)
    rest = nn.Sequential(*list(model.children())[1:])
    constant = torch.autograd.grad(nn.functional.cross_entropy(rest(conv), y[:1]), w)[0]
    assert not torch.allclose(constant, per_sample[weight][0], rtol=1e-3, atol=1e-6)


def test_training_forward_under_a_transform_raises_and_frozen_runs():
    model = _model().train()
    before = _states(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        RuntimeError, match=r"updates its power-iteration vector u.*model\.eval\(\)"
    ):
        jvp(model, (x,), (x,))
    u = "0.parametrizations.weight.0.u"
    assert torch.equal(model.state_dict()[u], before[u])
    model.eval()
    for m in model.modules():  # train-mode BatchNorm writes running stats: keep it in eval
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.train()
    with freeze_spectral_norm(model):
        out, _ = jvp(model, (x,), (x,))
    torch.testing.assert_close(out, remove_spectral_norm(copy.deepcopy(model)).eval()(x))
    assert torch.equal(model.state_dict()[u], before[u])


@pytest.mark.parametrize("batchnorm", ["leave", "bound"])
def test_vmap_over_an_ensemble_of_normalized_models(batchnorm):
    """``stack_module_state`` + ``vmap``: sigma and the BatchNorm statistics are batched, so
    nothing may be read on the host or written into the module's buffers."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh())
        model.append(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)))
        with torch.no_grad():
            model[0].weight.mul_(4)
            model[1].running_var.uniform_(0.05, 0.2)  # the BatchNorm bound binds
        apply_spectral_norm(model, beta=0.7, input_shape=(3, 4, 4), batchnorm=batchnorm)
        models.append(model.eval())
    x = torch.randn(2, 3, 4, 4)
    ref = torch.stack([remove_spectral_norm(copy.deepcopy(m)).eval()(x) for m in models])
    params, buffers = stack_module_state(models)
    before = _states(models[0])
    out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    after = _states(models[0])
    assert all(torch.equal(after[k], before[k]) for k in before)
    copy.deepcopy(models[0])  # nothing batched left behind on the modules


def test_batched_backward_through_the_rescale():
    """``torch.autograd.grad(..., is_grads_batched=True)``: the custom backward runs vmapped."""
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    W = model[0].parametrizations.weight.original
    basis = torch.eye(10).reshape(10, 2, 5)
    batched = torch.autograd.grad(model(x), W, basis, is_grads_batched=True)[0]
    rows = torch.stack([torch.autograd.grad(model(x), W, e)[0] for e in basis])
    torch.testing.assert_close(batched, rows, rtol=1e-5, atol=1e-7)


def test_batched_backward_through_the_cpu_fold(monkeypatch):
    """``is_grads_batched`` in training mode, where CPU layers fold ``A u`` into their batch.

    Oracle: one ordinary backward per basis row, each from the same state; ``u`` advances once,
    as after one ordinary backward.
    """
    from sn_lightning.spectral import fused

    model = _model().train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)  # the registration resolution: the fold runs
    folded = []
    apply = fused._FoldedLayer.apply
    monkeypatch.setattr(fused._FoldedLayer, "apply", lambda *a: folded.append(1) or apply(*a))
    W = model[3].parametrizations.weight.original
    start = copy.deepcopy(model.state_dict())
    basis = torch.eye(10).reshape(10, 2, 5)
    rows = []
    for e in basis:
        model.load_state_dict(start)
        rows.append(torch.autograd.grad(model(x), (x, W), e))
    after_one = _states(model)
    model.load_state_dict(start)
    folded.clear()
    gx, gw = torch.autograd.grad(model(x), (x, W), basis, is_grads_batched=True)
    assert len(folded) == 2  # conv 2 and the linear layer fold; conv 1 (output 4.7x its
    # weight, over FOLD_RATIO) rescales its weight through the parametrization
    torch.testing.assert_close(gx, torch.stack([r[0] for r in rows]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, torch.stack([r[1] for r in rows]), rtol=1e-5, atol=1e-6)
    after = _states(model)
    for k in after:
        torch.testing.assert_close(after[k], after_one[k], rtol=1e-5, atol=1e-7)
