"""CUDA behaviour: spectral normalization under bf16 autocast, attacks, LipLT and a GPU fit run.

Marked ``gpu``: deselected by default (``pytest -m gpu`` on a machine with CUDA). Each test
compares the GPU result with an independent CPU/float64 computation.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from sn_lightning.attacks import PGD
from sn_lightning.lipschitz import liplt_bound, naive_bound
from sn_lightning.models import create_backbone
from sn_lightning.spectral import apply_spectral_norm
from sn_lightning.spectral.ops import dense_operator_norm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
ROOT = Path(__file__).resolve().parents[1]


def _normalized_layers(model: nn.Module):
    for name, m in model.named_modules():
        p = getattr(m, "parametrizations", None)
        if p is not None and "weight" in p:
            yield name, m, p.weight[0]


def test_sn_under_bf16_autocast_keeps_float32_state_and_bounds_true_norms():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    apply_spectral_norm(model, beta=1.0, input_shape=(3, 16, 16))
    model = model.cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device="cuda")
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(20):  # training forwards without steps: u catches up with the weights
            model(x)
    model.eval()  # eval: reading a weight does not advance u
    checked = 0
    for name, layer, p in _normalized_layers(model):
        assert p.u.dtype == torch.float32 and p.u.is_cuda, name
        # the true operator norm of the normalized weight, dense SVD in float64 on the CPU
        W = layer.weight.detach().double().cpu()
        if isinstance(layer, nn.Linear):
            true = torch.linalg.matrix_norm(W, ord=2).item()
        else:
            plain = nn.Conv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
                bias=False,
            ).double()
            plain.weight.data.copy_(W)
            true = float(dense_operator_norm(plain, p.input_shape))
        assert true <= 1.0 * (1 + 1e-2), (name, true)
        checked += 1
    assert checked == 21  # 20 convolutions + fc


def test_eval_forward_on_gpu_changes_no_buffer():
    model = torchvision.models.resnet18(num_classes=10)
    apply_spectral_norm(model, beta=1.5, input_shape=(3, 32, 32))
    model = model.cuda().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randn(8, 3, 32, 32, device="cuda"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pgd_on_gpu_matches_the_same_attack_on_cpu():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    attack = PGD("linf", eps=8 / 255, steps=5, random_start=False)
    cpu = attack(model, x, y)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # IEEE float32 as on CPU
        gpu = attack(model.cuda(), x.cuda(), y.cuda()).cpu()
    # sign steps: a coordinate may flip where the gradient is ~0; nearly all must agree
    agree = (cpu - gpu).abs().le(1e-4).float().mean().item()
    assert agree > 0.95
    assert (gpu - x).abs().max() <= 8 / 255 + 1e-6
    model = model.cpu()
    with torch.no_grad():
        loss = nn.functional.cross_entropy
        adv_cpu, adv_gpu = loss(model(cpu), y), loss(model(gpu), y)
        assert adv_gpu > loss(model(x), y)
        assert float(adv_gpu) == pytest.approx(float(adv_cpu), rel=0.02)


def test_power_iteration_on_gpu_ignores_tf32_and_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    apply_spectral_norm(conv, beta=math.inf, input_shape=(64, 8, 8))
    p = conv.parametrizations.weight[0]
    W = conv.parametrizations.weight.original
    cpu = float(p.sigma(W.detach().double(), n_iter=50))
    conv = conv.cuda()
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = float(p.sigma(conv.parametrizations.weight.original, n_iter=50))
    assert torch.backends.cudnn.allow_tf32  # restored
    assert gpu == pytest.approx(cpu, rel=1e-5)


@pytest.mark.parametrize(
    ("name", "shape"), [("c4f3", (1, 28, 28)), ("digits_cnn", (1, 8, 8))]
)  # digits_cnn has max pooling (LipLT segments)
def test_liplt_and_naive_bounds_on_gpu_equal_cpu(name, shape):
    torch.manual_seed(0)
    model = create_backbone(
        f"sn_lightning:{name}", num_classes=10, in_chans=1, input_size=shape[1:]
    ).eval()
    cpu = liplt_bound(model, shape, pairwise=True, certify=True)
    naive_cpu = naive_bound(model, shape)
    model = model.cuda()
    gpu = liplt_bound(model, shape, pairwise=True, certify=True).cpu()
    naive_gpu = naive_bound(model, shape)
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-6)
    assert float(naive_gpu) == pytest.approx(float(naive_cpu), rel=1e-3)


def test_fit_on_gpu_with_bf16_sn_and_pgd(tmp_path, monkeypatch):
    from sn_lightning import fit

    devices = []
    real_evaluate = fit.evaluate

    def evaluate(model, *args, **kwargs):
        devices.append(next(model.parameters()).device.type)
        return real_evaluate(model, *args, **kwargs)

    # Lightning's teardown moves the module to the CPU; the final evaluation must move it back.
    monkeypatch.setattr(fit, "evaluate", evaluate)
    results = fit.main(
        [
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator=gpu",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_epochs=3",
            "--trainer.logger=false",
        ]
    )
    saved = json.loads(Path(results["path"]).read_text())
    assert saved["test"]["acc"] > 0.85
    assert saved["lipschitz_bound"] is not None and saved["lipschitz_bound"] > 0
    for entry in saved["adversarial"].values():
        assert 0 < entry["test"]["acc"] <= saved["test"]["acc"]
    assert len(devices) == 9 and set(devices) == {"cuda"}  # 3 clean + 2 attacks x 3 splits


@pytest.fixture
def exact_cuda():
    """Deterministic cuDNN and no TF32, so graph and eager runs can be compared closely."""
    flags = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    ) = flags


def _assert_same_state(a_model, b_model):
    for (name, a), b in zip(
        a_model.state_dict().items(), b_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _group_graphs(model):
    """The captured graphs of the model's SpectralGroup hooks (grouped.py), all of them."""
    from sn_lightning.spectral import grouped

    groups = [
        h.__self__
        for h in model._forward_pre_hooks.values()
        if isinstance(getattr(h, "__self__", None), grouped.SpectralGroup)
    ]
    return [g for group in groups for g in grouped._GRAPHS.get(group, {}).values()]


def _use_path(model, grouped_path):
    """Grouped graphs (the default) or, with the model's group hooks removed, per-layer graphs."""
    from sn_lightning.spectral import grouped

    if not grouped_path:
        grouped.uninstall(model)
    return model


def _twin_models(**kwargs):
    """Two copies of one SN ResNet-18 on CUDA: CUDA-graph power iteration and eager."""
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    apply_spectral_norm(base, beta=1.0, input_shape=(3, 16, 16), **kwargs)
    graphed = copy.deepcopy(base).cuda()
    eager = copy.deepcopy(base).cuda()
    for _, _, p in _normalized_layers(eager):
        p.cuda_graph = False
    return graphed, eager


def _sgd_steps(model, xs, y, two_forwards=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for x in xs:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if two_forwards:  # both graphs alive before one backward (e.g. clean + adversarial loss)
            loss = loss + nn.functional.cross_entropy(model(x.flip(-1)), y)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("grouped_path", [True, False], ids=["grouped", "per_layer"])
@pytest.mark.parametrize("two_forwards", [False, True])
def test_cuda_graph_power_iteration_matches_eager(two_forwards, grouped_path, exact_cuda):
    from sn_lightning.spectral.parametrization import _GRAPHS

    graphed, eager = _twin_models()
    _use_path(graphed, grouped_path)
    torch.manual_seed(1)
    xs = [torch.randn(8, 3, 16, 16, device="cuda") for _ in range(4)]
    y = torch.randint(0, 10, (8,), device="cuda")
    _sgd_steps(graphed, xs, y, two_forwards)
    _sgd_steps(eager, xs, y, two_forwards)
    norms = [p for _, _, p in _normalized_layers(graphed)]
    if grouped_path:  # one graph pair for all 21 layers, no per-layer graph
        graphs = _group_graphs(graphed)
        assert len(graphs) == 1 and graphs[0].n == 21 and graphs[0].backward_graph is not None
        assert not any(_GRAPHS.get(p) for p in norms)
    else:
        assert all(_GRAPHS.get(p) and all(_GRAPHS[p].values()) for p in norms)  # graphs ran
    _assert_same_state(graphed, eager)
    # eval forwards replay the no-update graph: no buffer changes
    before = {k: v.clone() for k, v in graphed.state_dict().items()}
    graphed.eval()
    with torch.no_grad():
        torch.testing.assert_close(graphed(xs[0]), eager.eval()(xs[0]), rtol=1e-4, atol=1e-5)
    for k, v in graphed.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cuda_graph_recaptures_after_moves_and_reloads(exact_cuda):
    graphed, eager = _twin_models()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    _sgd_steps(graphed, [x], y)
    _sgd_steps(eager, [x], y)
    moved = graphed.cpu().cuda()  # new storages: stale graphs must not be replayed
    _sgd_steps(moved, [x], y)
    _sgd_steps(eager, [x], y)
    _assert_same_state(moved, eager)
    clone = copy.deepcopy(moved)  # deepcopy carries no graphs
    clone.load_state_dict({k: v.clone() for k, v in eager.state_dict().items()}, assign=True)
    _sgd_steps(clone, [x], y)
    _sgd_steps(eager, [x], y)
    _assert_same_state(clone, eager)


@pytest.mark.parametrize(
    ("make", "shape", "kwargs"),
    [
        (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (8, 9, 9), {}),
        (lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), (8, 7, 7), {}),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (4, 6, 6), {}),
        (lambda: nn.Conv1d(4, 6, 5, padding="same"), (4, 11), {}),
        (lambda: nn.Conv3d(2, 4, 3, padding=1), (2, 4, 4, 4), {}),
        (lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1), (6, 5, 5), {}),
        (lambda: nn.Linear(12, 7), (12,), {}),
        (lambda: nn.Conv2d(6, 8, 3), (6, 8, 8), {"method": "matrix"}),
        (lambda: nn.Conv2d(6, 8, 3, padding=1).to(torch.bfloat16), (6, 8, 8), {}),
    ],
    ids=["stride", "depthwise", "reflect", "conv1d", "conv3d", "transpose", "linear", "matrix",
         "bf16"],
)  # fmt: skip
@pytest.mark.parametrize("grouped_path", [True, False], ids=["grouped", "per_layer"])
def test_cuda_graph_layer_gradients_match_eager(make, shape, kwargs, grouped_path, exact_cuda):
    from sn_lightning.spectral.parametrization import _GRAPHS

    torch.manual_seed(0)
    layer = make()
    apply_spectral_norm(layer, beta=0.2, input_shape=shape, **kwargs)
    graphed, eager = copy.deepcopy(layer).cuda(), copy.deepcopy(layer).cuda()
    _use_path(graphed, grouped_path)
    eager.parametrizations.weight[0].cuda_graph = False
    dtype = layer.parametrizations.weight.original.dtype
    x = torch.randn(3, *shape, device="cuda", dtype=dtype)
    for _ in range(2):  # capture, then replay
        grads = []
        for m in (graphed, eager):
            m.zero_grad(set_to_none=True)
            m(x).float().square().sum().backward()
            grads.append(m.parametrizations.weight.original.grad.float())
        assert grads[0].abs().max() > 0
        tol = {"rtol": 2e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(grads[0], grads[1], **tol)
        _assert_same_state(graphed, eager)
    if grouped_path:
        graphs = _group_graphs(graphed)
        assert len(graphs) == 1 and graphs[0].backward_graph is not None
    else:
        graphs = _GRAPHS[graphed.parametrizations.weight[0]]
        assert graphs and all(g.backward_graph is not None for g in graphs.values())


def test_cuda_graph_backward_under_double_backprop_matches_eager(exact_cuda):
    """Exact DataGrad differentiates through grad_x (create_graph): the weight gradient reaching
    the rescale's backward arrives from the double-backward graph."""
    from sn_lightning.attacks import datagrad_penalty

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ELU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip
    apply_spectral_norm(net, beta=0.5, input_shape=(3, 8, 8))
    graphed, eager = copy.deepcopy(net).cuda(), copy.deepcopy(net).cuda()
    for _, _, p in _normalized_layers(eager):
        p.cuda_graph = False
    x, y = torch.rand(6, 3, 8, 8, device="cuda"), torch.randint(0, 10, (6,), device="cuda")
    grads = []
    for m in (graphed, eager):
        for _ in range(2):  # capture, then replay
            m.zero_grad(set_to_none=True)
            loss, penalty, _ = datagrad_penalty(m, x, y, "l2")
            (loss + 10.0 * penalty).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture
def benchmark_cudnn():
    """cuDNN autotuning on (``Trainer(benchmark=True)``), TF32 off for close comparisons."""
    flags = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    ) = flags


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1), (5, 13, 11)),
        (lambda: nn.ConvTranspose2d(7, 5, 3, stride=2, padding=1), (7, 9, 5)),
    ],
    ids=["conv", "transpose"],
)
@pytest.mark.parametrize("grouped_path", [True, False], ids=["grouped", "per_layer"])
def test_cuda_graphs_capture_under_cudnn_benchmark(make, shape, grouped_path, benchmark_cudnn):
    """A training forward autotunes the adjoint convolution too: capture must not fail on it.

    Shapes no other test uses, so cuDNN has not tuned them yet in this process.
    """
    import warnings

    from sn_lightning.spectral.parametrization import _GRAPHS

    torch.manual_seed(0)
    # shapes no other test (or the other parametrization) uses: cuDNN tunes them here
    shape = (shape[0], shape[1] + grouped_path, shape[2])
    layer = make()
    apply_spectral_norm(layer, beta=0.2, input_shape=shape)
    graphed, eager = copy.deepcopy(layer).cuda(), copy.deepcopy(layer).cuda()
    _use_path(graphed, grouped_path)
    eager.parametrizations.weight[0].cuda_graph = False
    x = torch.randn(3, *shape, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "CUDA graph capture ... failed" would raise here
        for _ in range(2):  # capture, then replay
            grads = []
            for m in (graphed, eager):
                m.zero_grad(set_to_none=True)
                m(x).square().sum().backward()
                grads.append(m.parametrizations.weight.original.grad)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
            _assert_same_state(graphed, eager)
    norm = graphed.parametrizations.weight[0]
    if grouped_path:
        graphs = _group_graphs(graphed)
        assert len(graphs) == 1 and graphs[0] is not None and graphs[0].backward_graph is not None
    else:
        assert norm.cuda_graph and _GRAPHS[norm] and all(_GRAPHS[norm].values())


def test_reseed_global_rngs_seeds_the_initialized_gpu_like_manual_seed():
    from sn_lightning.data.sampling import derive_seed, reseed_global_rngs

    torch.zeros(1, device="cuda")  # CUDA initialized, as in a GPU training step
    seed = derive_seed(5, 1, 7, 0)
    reseed_global_rngs(seed)
    ours = (torch.rand(8, device="cuda").cpu(), torch.rand(8))
    torch.manual_seed(seed)
    theirs = (torch.rand(8, device="cuda").cpu(), torch.rand(8))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_ddp_sync_batchnorm_trains_bounded_timm_norm_act_layers(tmp_path):
    """``--trainer.sync_batchnorm=true`` with ``sn_batchnorm: bound`` on a timm RegNet
    (BatchNormAct2d): Lightning's own plugin raises a TypeError on the bounded scales and drops
    every activation after a BatchNorm; SNClassifier's trains SyncBatchNormAct layers within beta
    and hands back the original classes, whose network bound results.json reports."""
    import subprocess
    import sys

    record = {
        "class_path": "tests.ddp_helpers.RecordBatchNorms",
        "init_args": {"out": str(tmp_path)},
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sn_lightning.fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--model.backbone=timm:regnetx_002",
            "--model.beta=0.9",
            "--model.sn_batchnorm=bound",
            "--trainer.accelerator=gpu",
            "--trainer.devices=1",
            "--trainer.strategy=ddp",
            "--trainer.sync_batchnorm=true",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.logger=false",
            "--robust_eval.final_max_examples=32",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks={json.dumps([record])}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "batchnorms_rank0.json").read_text())
    assert seen["step"].keys() == seen["end"].keys() and len(seen["step"]) > 10
    assert {tuple(v[:2]) for v in seen["step"].values()} == {("SyncBatchNormAct", True)}
    assert {tuple(v[:2]) for v in seen["end"].values()} == {("BatchNormAct2d", True)}
    assert max(v[2] for v in seen["step"].values()) <= 0.9 * (1 + 1e-6)
    (path,) = tmp_path.rglob("results.json")
    bound = json.loads(path.read_text())["lipschitz_bound"]
    assert isinstance(bound, float) and bound > 0
