"""convert_sync_batchnorm / revert_sync_batchnorm: synchronized BatchNorm that keeps bounds.

``nn.SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True``) cannot assign a
bounded scale to its new module and turns timm's BatchNormAct2d into a SyncBatchNorm without its
activation; these check that the class swap keeps both, and that SyncBatchNorm is a BatchNorm for
``apply_spectral_norm`` and the network bound.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from sn_lightning.spectral import (
    BoundedBatchNormScale,
    apply_spectral_norm,
    convert_sync_batchnorm,
    network_lipschitz_bound,
    normalized_layers,
    plain_state_dict,
    revert_sync_batchnorm,
    spectral_norms,
)

SHAPE = (3, 16, 16)


def _norm_types(model: nn.Module) -> set[str]:
    """Class names of the BatchNorms, under parametrize's injected subclass."""
    out = set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            cls = type(m)
            out.add(
                cls.__bases__[0].__name__
                if cls.__name__.startswith("Parametrized")
                else cls.__name__
            )
    return out


def _bounded_resnet(beta: float = 0.7) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    apply_spectral_norm(model, beta=beta, input_shape=SHAPE, batchnorm="bound")
    model.train()
    with torch.no_grad():
        for _ in range(2):  # running statistics away from their init
            model(torch.randn(8, *SHAPE))
    return model


def test_convert_keeps_bounds_parameters_and_the_function():
    model = _bounded_resnet()
    bns = {
        n for n, (_, p) in normalized_layers(model).items() if isinstance(p, BoundedBatchNormScale)
    }
    assert len(bns) == 20  # resnet18's BatchNorms, all bounded
    twin = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    x = torch.randn(6, *SHAPE)
    assert convert_sync_batchnorm(model) is model
    assert _norm_types(model) == {"SyncBatchNorm"}
    assert [id(p) for p in model.parameters()] == params  # the optimizer's references hold
    assert list(model.state_dict()) == keys
    after = {
        n for n, (_, p) in normalized_layers(model).items() if isinstance(p, BoundedBatchNormScale)
    }
    assert after == bns
    # Without a process group, SyncBatchNorm is BatchNorm: same training and eval forwards.
    for mode in ("train", "eval", "train"):
        getattr(model, mode)()
        getattr(twin, mode)()
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), twin.state_dict(), rtol=0, atol=0)
    scales = spectral_norms(model, normalized=True)
    assert all(scales[n] <= 0.7 * (1 + 1e-6) for n in bns)
    # The network bound sees SyncBatchNorm as BatchNorm.
    bound, reason = network_lipschitz_bound(model, input_shape=SHAPE)
    assert reason == ""
    assert bound == pytest.approx(network_lipschitz_bound(twin, input_shape=SHAPE)[0], rel=1e-12)
    # Back to the original classes, with everything kept; export loads into the plain backbone.
    assert revert_sync_batchnorm(model) is model
    assert _norm_types(model) == {"BatchNorm2d"}
    assert not any(hasattr(m, "process_group") for m in model.modules())
    assert [id(p) for p in model.parameters()] == params
    model.eval()
    twin.eval()
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(plain_state_dict(model), strict=True)
    torch.testing.assert_close(fresh(x), model(x))


def test_convert_turns_timm_batchnorm_act_into_sync_batchnorm_act_with_its_activation():
    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", num_classes=10).eval()
    x = torch.randn(2, *SHAPE)
    expected = model(x)
    bound, _ = network_lipschitz_bound(model, input_shape=SHAPE)
    assert bound is not None
    # nn.SyncBatchNorm's converter drops the activation: the function changes (why this exists).
    lost = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert not torch.allclose(lost(x), expected, atol=1e-3)
    assert all(
        type(m) is nn.SyncBatchNorm for m in lost.modules() if isinstance(m, nn.SyncBatchNorm)
    )
    convert_sync_batchnorm(model)
    acts = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert acts and all(type(m) is SyncBatchNormAct for m in acts)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # SyncBatchNormAct is a leaf with BatchNormAct2d's rule: the same bound
    assert network_lipschitz_bound(model, input_shape=SHAPE) == (bound, "")
    revert_sync_batchnorm(model)
    assert all(type(m) is BatchNormAct2d for m in acts)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_bounded_timm_model_survives_deepcopy_and_training_after_convert():
    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", num_classes=10)
    apply_spectral_norm(model, beta=0.8, input_shape=SHAPE, batchnorm="bound")
    convert_sync_batchnorm(model)
    clone = copy.deepcopy(model)
    assert _norm_types(clone) == {"SyncBatchNormAct"}
    model.train()
    loss = model(torch.randn(4, *SHAPE)).square().mean()
    loss.backward()
    bn = model.stem.bn
    assert bn.parametrizations.weight.original.grad is not None  # the bounded scale trains
    assert spectral_norms(model, normalized=True)["stem.bn"] <= 0.8 * (1 + 1e-6)
    # The copy's class is its own: reverting the original leaves the copy synchronized.
    revert_sync_batchnorm(model)
    assert _norm_types(model) == {"BatchNormAct2d"}
    assert _norm_types(clone) == {"SyncBatchNormAct"}


def test_batchnorm_with_its_own_forward_is_left_with_one_warning():
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Shifted(4), nn.BatchNorm2d(4), Shifted(4))
    with pytest.warns(UserWarning, match=r"not synchronizing 2 BatchNorm.*'1' \(Shifted\)"):
        convert_sync_batchnorm(model)
    assert [type(m).__name__ for m in model] == ["Conv2d", "Shifted", "SyncBatchNorm", "Shifted"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revert_sync_batchnorm(model)
    assert [type(m).__name__ for m in model] == ["Conv2d", "Shifted", "BatchNorm2d", "Shifted"]


def test_apply_spectral_norm_bounds_sync_batchnorm_layers():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping" warning: SyncBatchNorm is a BatchNorm
        torch.manual_seed(1)  # the same power-iteration vectors as the plain model's
        apply_spectral_norm(synced, beta=0.5, input_shape=SHAPE, batchnorm="bound")
    bounded = [
        n for n, (m, p) in normalized_layers(synced).items() if isinstance(p, BoundedBatchNormScale)
    ]
    assert len(bounded) == 20
    torch.manual_seed(1)
    apply_spectral_norm(plain, beta=0.5, input_shape=SHAPE, batchnorm="bound")
    scales = spectral_norms(synced, normalized=True)
    assert max(scales[n] for n in bounded) <= 0.5 * (1 + 1e-6)
    bound, reason = network_lipschitz_bound(synced, input_shape=SHAPE)
    assert reason == ""
    assert bound == pytest.approx(network_lipschitz_bound(plain, input_shape=SHAPE)[0], rel=1e-9)
