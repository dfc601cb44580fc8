import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sn_lightning.attacks import PGD, LayerwisePerturbation, default_layerwise_layers, in_attack
from sn_lightning.errors import ConfigError
from sn_lightning.models.normalize import InputNormalize

from .conftest import tiny_cnn


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        InputNormalize([0.3], [0.4]),
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        ),
    )


def _steps(model, batches, optimizer):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.fixture
def batches(digits):
    x, y = digits[0], digits[1]
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]


def test_default_layers_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    net = nn.Sequential(InputNormalize([0.5] * 3, [0.25] * 3), torchvision.models.resnet18())
    assert default_layerwise_layers(net) == ["1.layer1", "1.layer2", "1.layer3", "1.layer4"]
    assert default_layerwise_layers(torchvision.models.resnet18()) == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]


def test_default_layers_timm_vit():
    timm = pytest.importorskip("timm")
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, num_classes=10
    )
    assert default_layerwise_layers(vit) == ["blocks.0", "blocks.1", "blocks.2"]


def test_default_layers_plain_network_skips_wrappers_and_head():
    assert default_layerwise_layers(_mlp()) == ["1.1", "1.3"]


def test_patterns_select_modules_and_bad_pattern_raises():
    model = _mlp()
    assert LayerwisePerturbation(model, layers="1.[13]", eps=0.1).layers == ["1.1", "1.3"]
    with pytest.raises(ConfigError, match=r"'\*conv\*' matches no module"):
        LayerwisePerturbation(model, layers=["*conv*"], eps=0.1)
    with pytest.raises(ConfigError, match="mode must be one of"):
        LayerwisePerturbation(model, eps=0.1, mode="linf")
    with pytest.raises(ConfigError, match="eps must be a number > 0"):
        LayerwisePerturbation(model, eps=0.0)
    with pytest.raises(ConfigError, match="no eps pattern"):
        LayerwisePerturbation(model, eps={"1.1": 0.1})
    per_layer = LayerwisePerturbation(_mlp(), eps={"1.1": 0.1, "*": 0.2})
    assert per_layer.eps == {"1.1": 0.1, "1.3": 0.2}


def test_one_forward_and_one_backward_per_step(batches):
    model = tiny_cnn()
    layerwise = LayerwisePerturbation(model, layers=["1", "4"], eps=0.05)
    forwards = {"model": 0, "1": 0, "4": 0, "conv": 0}
    backwards = []
    model.register_forward_pre_hook(
        lambda m, a: forwards.__setitem__("model", forwards["model"] + 1)
    )
    for name in ("1", "4"):
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, n=name: forwards.__setitem__(n, forwards[n] + 1)
        )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(
                lambda m, a: forwards.__setitem__("conv", forwards["conv"] + 1)
            )
    model.register_full_backward_hook(lambda m, gi, go: backwards.append(1))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        x = x.requires_grad_(True)  # so the root's full backward hook fires once per backward
        _steps(model, [(x, y)], optimizer)
    assert forwards == {"model": 4, "1": 4, "4": 4, "conv": 8}
    assert len(backwards) == 4
    assert set(layerwise.deltas) == {"1", "4"}


def test_perturbation_is_the_previous_steps_gradient_sign(batches):
    model = _mlp()
    reference = _mlp()  # same init: an unhooked twin
    layerwise = LayerwisePerturbation(model, eps=0.05)
    layer = model.get_submodule("1.3")
    (x1, y1), (x2, _) = batches[0], batches[1]

    # step 1: no perturbation; keep dLoss/dh at layer 1.3
    model.train()
    torch.testing.assert_close(model(x1), reference(x1))
    captured = {}

    def capture(module, args, output):
        output.register_hook(lambda g: captured.__setitem__("g", g))

    handle = layer.register_forward_hook(capture)
    F.cross_entropy(model(x1), y1).backward()
    handle.remove()
    expected = 0.05 * captured["g"].sign()
    torch.testing.assert_close(layerwise.deltas["1.3"], expected)
    assert not layerwise.deltas["1.3"].requires_grad

    # step 2: h + delta at both layers
    with torch.no_grad():
        h1 = reference[1][:2](reference[0](x2)) + layerwise.deltas["1.1"]
        h3 = reference[1][2:4](h1) + layerwise.deltas["1.3"]
        out = reference[1][4:](h3)
        torch.testing.assert_close(model(x2), out)


def test_no_perturbation_in_eval_mode_and_after_remove(batches):
    model, reference = _mlp(), _mlp()
    layerwise = LayerwisePerturbation(model, eps=0.5)
    x, y = batches[0]
    model.train()
    F.cross_entropy(model(x), y).backward()
    assert layerwise.deltas
    model.eval()
    torch.testing.assert_close(model(x), reference(x))
    model.train()
    assert not torch.allclose(model(x), reference(x))
    with layerwise.paused():
        torch.testing.assert_close(model(x), reference(x))
    layerwise.remove()
    assert not layerwise.deltas
    torch.testing.assert_close(model(x), reference(x))


def test_train_mode_attack_neither_perturbs_nor_records(batches):
    # An input attack with eval_mode=False runs the model in training mode; its forwards must not
    # be perturbed and its input gradients must not replace the training step's perturbations.
    model, reference = _mlp(), _mlp()
    layerwise = LayerwisePerturbation(model, eps=0.5)
    (x, y), (x2, _) = batches[0], batches[1]
    model.train()
    reference.train()
    F.cross_entropy(model(x), y).backward()
    kept = {k: v.clone() for k, v in layerwise.deltas.items()}
    assert kept
    attack = PGD("linf", eps=0.1, steps=3, eval_mode=False)
    torch.testing.assert_close(attack(model, x2, y), attack(reference, x2, y))
    assert not in_attack()
    assert kept.keys() == layerwise.deltas.keys()
    for name, delta in kept.items():
        assert torch.equal(layerwise.deltas[name], delta)
    assert not torch.allclose(model(x), reference(x))  # still perturbed after the attack


def test_nonfinite_gradients_give_no_perturbation(batches):
    model, reference = _mlp(), _mlp()
    layerwise = LayerwisePerturbation(model, eps=0.5)
    x, y = batches[0]
    model.train()
    (F.cross_entropy(model(x), y) * float("nan")).backward()  # e.g. a GradScaler-skipped step
    assert all(torch.equal(d, torch.zeros_like(d)) for d in layerwise.deltas.values())
    torch.testing.assert_close(model(x), reference(x))


def test_batch_shape_mismatch_is_skipped(batches):
    model, reference = _mlp(), _mlp()
    LayerwisePerturbation(model, eps=0.5)
    x, y = batches[0]
    model.train()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(model(x[:7]), reference(x[:7]))


def test_l2_mode_has_per_example_norm_eps(batches):
    model = _mlp()
    layerwise = LayerwisePerturbation(model, eps=0.3, mode="l2")
    x, y = batches[0]
    model.train()
    F.cross_entropy(model(x), y).backward()
    for delta in layerwise.deltas.values():
        torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((32,), 0.3))


def test_inplace_relu_after_hooked_layer(batches):
    """The hook returns h + delta out of place, so an in-place ReLU does not break autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Linear(32, 10))
    layerwise = LayerwisePerturbation(model, layers=["1"], eps=0.1)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _steps(model, batches, optimizer)
    assert torch.isfinite(layerwise.deltas["1"]).all()


def test_repr():
    layerwise = LayerwisePerturbation(_mlp(), eps=0.1)
    assert repr(layerwise) == "LayerwisePerturbation(layers=['1.1', '1.3'], eps=0.1, mode='sign')"


def test_l2_mode_keeps_eps_for_tiny_gradients(batches):
    """Gradients of ~1e-25 (confident examples) have a float32 norm of 0 unless rescaled first."""
    model = _mlp()
    layerwise = LayerwisePerturbation(model, eps=0.01, mode="l2")
    x, y = batches[0]
    model.train()
    (F.cross_entropy(model(x), y) * 1e-25).backward()
    for delta in layerwise.deltas.values():
        torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((32,), 0.01))
