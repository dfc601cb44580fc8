import pytest
import torch
import torch.nn.functional as F

from sn_lightning.attacks import FGM, datagrad_fd_loss, datagrad_penalty
from sn_lightning.errors import ConfigError

from .conftest import smooth_mlp


@pytest.fixture
def smooth(digits):
    torch.manual_seed(0)
    model = smooth_mlp().double()
    x, y = digits[0][:8].double(), digits[1][:8]
    return model, x, y


def _param_grads(model, loss, retain_graph=False):
    return torch.autograd.grad(loss, list(model.parameters()), retain_graph=retain_graph)


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_exact_penalty_matches_finite_differences_of_the_loss(smooth, norm):
    model, x, y = smooth
    loss, penalty, _ = datagrad_penalty(model, x, y, norm)
    with torch.no_grad():
        assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-12)
        # J_i by central differences of example i's own loss, all coordinates in one batch.
        h, (n, d) = 1e-5, x.flatten(1).shape
        shifts = h * torch.eye(d, dtype=x.dtype)  # (D, D)
        points = x.flatten(1)[None] + torch.stack([shifts, -shifts])[:, :, None]  # (2, D, N, D)
        losses = F.cross_entropy(
            model(points.reshape(-1, *x.shape[1:])), y.repeat(2 * d), reduction="none"
        ).view(2, d, n)
        jac = ((losses[0] - losses[1]) / (2 * h)).T  # (N, D)
        expected = jac.abs().sum(1).mean() if norm == "l1" else jac.pow(2).sum(1).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_penalty_is_differentiable_and_leaves_grad_alone(smooth, norm):
    model, x, y = smooth
    loss, penalty, _ = datagrad_penalty(model, x, y, norm)
    assert all(p.grad is None for p in model.parameters())
    grads = _param_grads(model, loss + 0.1 * penalty, retain_graph=True)  # double backprop
    assert all(torch.isfinite(g).all() for g in grads)
    assert _flat(_param_grads(model, penalty)).norm() > 0


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_penalty_does_not_depend_on_batch_size(smooth, norm):
    model, x, y = smooth
    full = datagrad_penalty(model, x, y, norm).penalty
    halves = [datagrad_penalty(model, x[s], y[s], norm)[1] for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)


def test_grad_scale_is_undone(smooth):
    model, x, y = smooth
    for norm in ("l1", "l2"):
        plain = datagrad_penalty(model, x, y, norm)[1]
        scaled = datagrad_penalty(model, x, y, norm, grad_scale=1024.0)[1]
        torch.testing.assert_close(plain, scaled)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_finite_difference_form_approaches_exact_gradient(smooth, norm):
    """(grad FD - grad L) / lam -> grad penalty as phi -> 0 (smooth network)."""
    model, x, y = smooth
    phi = 1e-4
    lam = phi / 2
    loss, penalty, _ = datagrad_penalty(model, x, y, norm)
    clean = _flat(_param_grads(model, loss, retain_graph=True))
    exact = _flat(_param_grads(model, penalty))
    fd = _flat(_param_grads(model, datagrad_fd_loss(model, x, y, lam=lam, phi=phi, norm=norm).loss))
    torch.testing.assert_close((fd - clean) / lam, exact, rtol=1e-3, atol=1e-3 * exact.abs().max())


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_finite_difference_logs_the_same_penalty_as_the_exact_form(smooth, norm):
    """For l2, L(x + phi 2J) - L(x) ~ 2 phi ||J||^2: the logged estimate divides by the degree."""
    model, x, y = smooth
    exact = datagrad_penalty(model, x, y, norm).penalty
    fd = datagrad_fd_loss(model, x, y, lam=1e-6, phi=1e-5, norm=norm).penalty
    assert fd.item() == pytest.approx(exact.item(), rel=1e-3)


def test_l1_finite_difference_update_is_fgsm_training(model, batch):
    """alpha L(x) + (1 - alpha) L(x + phi sign(g)), alpha = 1 - lam/phi (PAPERS.md section 4)."""
    x, y = batch
    model.eval()  # BatchNorm with running stats: both forms see the same function
    lam, phi = 0.02, 0.05
    alpha = 1.0 - lam / phi
    x_adv = FGM("linf", eps=phi, clip=False)(model, x, y)
    fgsm = alpha * F.cross_entropy(model(x), y) + (1.0 - alpha) * F.cross_entropy(model(x_adv), y)
    fd = datagrad_fd_loss(model, x, y, lam=lam, phi=phi, norm="l1").loss
    torch.testing.assert_close(fd, fgsm, rtol=0, atol=1e-6)
    g_fgsm = _flat(_param_grads(model, fgsm))
    g_fd = _flat(_param_grads(model, fd))
    torch.testing.assert_close(g_fd, g_fgsm, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_fd_clip_keeps_box(smooth):
    model, x, y = smooth
    loss = datagrad_fd_loss(model, x, y, lam=0.1, phi=0.5, clip=True).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": 0.2, "phi": 0.1}, r"lam must be in \[0, phi=0.1\], got 0.2"),
        ({"lam": 0.0, "phi": 0.0}, "phi must be > 0, got 0.0"),
        ({"lam": 0.1, "phi": 0.2, "norm": "linf"}, r"norm must be one of \['l1', 'l2'\]"),
    ],
)
def test_bad_arguments_raise(smooth, kwargs, match):
    model, x, y = smooth
    with pytest.raises(ConfigError, match=match):
        datagrad_fd_loss(model, x, y, **kwargs)


def test_penalty_bad_norm(smooth):
    with pytest.raises(ConfigError, match="'l3'"):
        datagrad_penalty(*smooth, norm="l3")


def test_exact_penalty_backpropagates_through_spectral_norm_convs():
    """Double backward hands SN conv layers permuted weight gradients ((in, out) strides); the
    bounded (sigma > beta) backward must treat them as the contiguous tensors they equal."""
    from torch import nn

    from sn_lightning.spectral import apply_spectral_norm

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    apply_spectral_norm(net, beta=0.1, input_shape=(1, 8, 8))  # every sigma > beta
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss, penalty, _ = datagrad_penalty(net, x, y, "l1")
    (loss + 0.1 * penalty).backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    sn = net[2].parametrizations.weight[0]
    W = net[2].parametrizations.weight.original.detach()
    g = torch.randn(W.shape[1], W.shape[0], *W.shape[2:]).transpose(0, 1)  # permuted layout
    assert not g.is_contiguous()
    u, v = torch.randn(sn.spec.u_shape), sn.spec.operator(W)[0](torch.randn(sn.spec.u_shape))
    torch.testing.assert_close(
        sn.spec.scaled_sigma_grad(W, g, 0.5, -0.3, u, v),
        sn.spec.scaled_sigma_grad(W, g.contiguous(), 0.5, -0.3, u, v),
    )


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_label_smoothing_enters_both_forms(smooth, norm):
    """The training loss is the model's: smoothed cross-entropy, its data gradient penalized."""
    model, x, y = smooth
    loss, penalty, _ = datagrad_penalty(model, x, y, norm, label_smoothing=0.2)
    xr = x.clone().requires_grad_(True)
    per_example = F.cross_entropy(model(xr), y, label_smoothing=0.2, reduction="none")
    (J,) = torch.autograd.grad(per_example.sum(), xr)
    R = J.flatten(1).abs().sum(1) if norm == "l1" else J.flatten(1).pow(2).sum(1)
    assert loss.item() == pytest.approx(per_example.mean().item(), rel=1e-12)
    assert penalty.item() == pytest.approx(R.mean().item(), rel=1e-10)
    plain = datagrad_penalty(model, x, y, norm).penalty
    assert abs(penalty.item() - plain.item()) > 1e-3 * plain.item()  # smoothing changes it
    fd = datagrad_fd_loss(model, x, y, lam=1e-6, phi=1e-5, norm=norm, label_smoothing=0.2)
    assert fd.penalty.item() == pytest.approx(penalty.item(), rel=1e-3)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_finite_difference_form_takes_the_gradient_scale(smooth, norm):
    """fp16 AMP passes the GradScaler's scale: same loss, same penalty (float64 here)."""
    model, x, y = smooth
    plain = datagrad_fd_loss(model, x, y, lam=0.01, phi=0.05, norm=norm)
    scaled = datagrad_fd_loss(model, x, y, lam=0.01, phi=0.05, norm=norm, grad_scale=1024.0)
    assert scaled.loss.item() == pytest.approx(plain.loss.item(), rel=1e-12)
    assert scaled.penalty.item() == pytest.approx(plain.penalty.item(), rel=1e-9)


def test_the_callback_uses_the_models_label_smoothing(digits, monkeypatch):
    from sn_lightning.callbacks import DataGrad
    from sn_lightning.lit import SNClassifier

    torch.manual_seed(0)
    module = SNClassifier(backbone="mlp2", label_smoothing=0.2)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    x, y = digits[0][:8], digits[1][:8]
    loss, _ = DataGrad(lam=0.05, form="fd", phi=0.1)._objective(module, x, y)
    want = datagrad_fd_loss(module, x, y, 0.05, 0.1, label_smoothing=0.2).loss
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.item() != pytest.approx(datagrad_fd_loss(module, x, y, 0.05, 0.1).loss.item())
