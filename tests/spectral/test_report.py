"""spectral_norm_report and the network Lipschitz bound against measured Jacobian norms."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import timm
import torch
from torch import nn

from sn_lightning.models.normalize import InputNormalize
from sn_lightning.spectral import (
    apply_spectral_norm,
    network_lipschitz_bound,
    normalized_layers,
    spectral_norm_report,
)
from sn_lightning.spectral.report import _pool_bound

SHAPE = (3, 12, 12)


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """Spectral norm of the Jacobian of the model at one input (float64)."""
    J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0))[0], x)
    return float(torch.linalg.svdvals(J.reshape(J.shape[0], -1))[0])


def chain() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            normalize=InputNormalize([0.5, 0.5, 0.5], [0.3, 0.2, 0.25]),
            conv1=nn.Conv2d(3, 6, 3, padding=1),
            act1=nn.LeakyReLU(0.1),
            pool1=nn.MaxPool2d(3, stride=2, padding=1),
            conv2=nn.Conv2d(6, 8, 3, stride=1, padding=1),
            act2=nn.ELU(),
            pool2=nn.AvgPool2d(3, stride=2),
            flatten=nn.Flatten(),
            drop=nn.Dropout(0.5),
            fc1=nn.Linear(8 * 2 * 2, 16),
            act3=nn.Tanh(),
            fc2=nn.Linear(16, 5),
        )
    )


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + x)


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.normalize = InputNormalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = Block(4)
        self.side = nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.block(self.stem(self.normalize(x)))
        x = torch.cat([x, self.side(x)], dim=1)  # sqrt(L^2 + L'^2)
        x = x.mean((2, 3))
        return self.head(x * 0.5)


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-1, 1)
            m.weight.data.uniform_(-1.5, 1.5)


@pytest.mark.parametrize("make", [chain, ResNetLike], ids=["chain", "residual"])
@pytest.mark.parametrize("sn", [False, True], ids=["plain", "sn"])
def test_bound_is_above_the_measured_jacobian_norm(make, sn):
    torch.manual_seed(0)
    model = make().double()
    _randomize_bn(model)
    if sn:
        apply_spectral_norm(model, beta=1.0, input_shape=SHAPE, init_iterations=50)
    model.eval()
    bound, reason = network_lipschitz_bound(model, input_shape=SHAPE)
    assert reason == ""
    assert bound is not None
    measured = [jacobian_norm(model, torch.rand(*SHAPE, dtype=torch.float64)) for _ in range(5)]
    assert max(measured) <= bound
    assert max(measured) > 0.0
    if sn:  # without the input shape the recorded layer shapes are used
        bound_no_shape, _ = network_lipschitz_bound(model)
        assert bound_no_shape is not None
        assert bound_no_shape >= max(measured)


def test_chain_bound_is_the_product_of_the_rules():
    torch.manual_seed(1)
    layers = [nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Sigmoid(), nn.Linear(4, 2)]
    model = nn.Sequential(*layers).double()
    bound, reason = network_lipschitz_bound(model, input_shape=(6,))
    norms = [float(torch.linalg.svdvals(m.weight.detach())[0]) for m in layers[::2]]
    assert reason == ""
    assert bound == pytest.approx(norms[0] * norms[1] * 0.25 * norms[2], rel=1e-10)


def test_residual_rule_is_one_plus_branch():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return x + self.fc(x)

    model = Res().double()
    bound, _ = network_lipschitz_bound(model, input_shape=(4,))
    sigma = float(torch.linalg.svdvals(model.fc.weight.detach())[0])
    assert bound == pytest.approx(1.0 + sigma, rel=1e-10)


def test_vit_has_no_bound_and_says_why():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, pretrained=False, img_size=32)
    apply_spectral_norm(model, beta=1.0, input_shape=(3, 32, 32), init_iterations=2)
    report = spectral_norm_report(model, n_iter=2, input_shape=(3, 32, 32))
    assert report.lipschitz_bound is None
    assert "layer_norm" in report.reason or "LayerNorm" in report.reason
    assert "\n" not in report.reason
    assert len(report.layers) == 50


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1)), "Softmax"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "LayerNorm"),
    ],
)
def test_unknown_modules_give_none_with_the_op_named(model, needle):
    bound, reason = network_lipschitz_bound(model, input_shape=(4,))
    assert bound is None
    assert needle in reason


def test_products_and_failed_traces_give_none():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x))

    bound, reason = network_lipschitz_bound(Gate(), input_shape=(4,))
    assert bound is None
    assert "product" in reason

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    bound, reason = network_lipschitz_bound(Branchy(), input_shape=(4,))
    assert bound is None
    assert reason.startswith("torch.fx could not trace Branchy")


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=1, ceil_mode=True),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
        nn.AdaptiveAvgPool2d((3, 2)),
        nn.AdaptiveMaxPool2d(4),
    ],
    ids=str,
)
def test_pool_bounds_are_sound(pool):
    torch.manual_seed(2)
    spatial = (7, 6)
    bound = _pool_bound(pool, spatial)
    if isinstance(pool, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):  # linear: exact norm
        n = math.prod(spatial)
        J = pool(torch.eye(n, dtype=torch.float64).reshape(n, 1, *spatial)).reshape(n, -1)
        assert float(torch.linalg.svdvals(J)[0]) <= bound * (1 + 1e-12)
    else:  # ratios of differences
        x = torch.randn(4000, 1, *spatial, dtype=torch.float64)
        y = x + 1e-3 * torch.randn_like(x)
        ratio = (pool(x) - pool(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        assert float(ratio.max()) <= bound
    if isinstance(pool, nn.MaxPool2d) and pool.padding == 1:
        assert bound == pytest.approx(2.0)  # 3x3 windows, stride 2: 2x2 windows per pixel
        assert _pool_bound(pool, None) == pytest.approx(2.0)


def test_report_rows_table_json_and_no_side_effects():
    torch.manual_seed(3)
    model = apply_spectral_norm(chain(), beta=0.9, input_shape=SHAPE, init_iterations=50)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(2, *SHAPE))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = spectral_norm_report(model, n_iter=50)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training
    assert [r.name for r in report.layers] == ["conv1", "conv2", "fc1", "fc2"]
    for row in report.layers:
        assert row.beta == 0.9
        assert row.upper_bound is not None
        assert row.sigma <= row.upper_bound * (1 + 1e-6)
        assert row.upper_bound <= 0.9 * 1.02  # normalized: close to beta at most
    assert report.layers[0].input_shape == (3, 12, 12)
    assert report.layers[1].input_shape == (6, 6, 6)
    assert report.layers[0].type == "Conv2d"
    assert report.layers[2].type == "Linear"
    assert report.lipschitz_bound is not None
    text = str(report)
    assert "layer" in text.splitlines()[0]
    assert "conv2" in text
    assert "network Lipschitz bound" in text
    data = json.loads(json.dumps(report.as_dict()))
    assert data["lipschitz_bound"] == pytest.approx(report.lipschitz_bound)
    assert len(data["layers"]) == 4


def test_report_handles_infinite_beta_and_matrix_method_in_json():
    model = apply_spectral_norm(chain(), beta=math.inf, input_shape=SHAPE, method="matrix")
    report = spectral_norm_report(model, n_iter=5)
    assert json.loads(json.dumps(report.as_dict()))["layers"][0]["beta"] == "inf"
    assert {r.method for r in report.layers} == {"matrix"}
    assert len(normalized_layers(model)) == 4


def test_batchnorm_rows():
    torch.manual_seed(4)
    model = ResNetLike()
    _randomize_bn(model)
    apply_spectral_norm(model, beta=0.7, input_shape=SHAPE, batchnorm="bound")
    report = spectral_norm_report(model, n_iter=5, input_shape=SHAPE)
    rows = {r.name: r for r in report.layers}
    assert rows["block.bn1"].method == "batchnorm"
    assert rows["block.bn1"].sigma == pytest.approx(0.7, rel=1e-6)
    assert report.lipschitz_bound is not None


def test_subclasses_with_their_own_forward_have_no_rule():
    class BatchNormAct(nn.BatchNorm1d):
        def forward(self, x):
            return torch.nn.functional.silu(super().forward(x)) * 3

    model = nn.Sequential(nn.Linear(4, 4), BatchNormAct(4)).eval()
    bound, reason = network_lipschitz_bound(model, input_shape=(4,))
    assert bound is None
    assert "BatchNormAct" in reason
    assert "overrides forward" in reason
