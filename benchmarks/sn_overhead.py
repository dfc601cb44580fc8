"""Training-step overhead of spectral normalization: plain vs operator SN vs PyTorch's built-in.

torchvision ResNet-18 (num_classes=10), 32x32 inputs, one SGD step (forward, backward, update)
per measurement. The variants run in interleaved rounds (the order rotates every round) so
that machine load drifts hit all of them alike; the table reports median step times, the
median of per-round ratios to plain with a bootstrap 95% interval (rounds resampled), and the
minor page faults per step. On small VMs glibc's allocator returns freed activation memory to
the kernel and takes it back with page faults, thousands per step, in bursts that hit whichever
variant runs then; ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` in the
environment keeps the memory and narrows the interval (the faults column then reads ~0).

Variants: ``plain``; ``operator_sn`` (``apply_spectral_norm``, beta 1: 17 of 21 layers are
rescaled at init); ``torch_sn`` (``torch.nn.utils.parametrizations.spectral_norm`` on every
Conv2d/Linear); ``mul_floor`` (a parametrization ``W -> 1.0 * W`` on every Conv2d/Linear: the
cost of materializing a new weight and its gradient each step, which any parametrization pays);
on CPU ``operator_sn_param`` (``batch_fold=False``: every layer rescales its weight through the
parametrization instead of folding the power iteration into its batch); on CUDA
``operator_sn_layer_graphs`` (a CUDA graph pair per layer instead of one for the model: Note
[one graph per model] in ``spectral/grouped.py``) and ``operator_sn_eager`` (``cuda_graph=False``).

    python -m benchmarks.sn_overhead --steps 30 --batch-size 128 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from benchmarks._machine import cpu_name
from sn_lightning.spectral import apply_spectral_norm, grouped

try:  # Unix: page faults per step (allocator churn is the main noise source on small VMs)
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

VARIANTS = ("plain", "operator_sn", "torch_sn", "mul_floor")
CPU_VARIANTS = (*VARIANTS, "operator_sn_param")
CUDA_VARIANTS = (*VARIANTS, "operator_sn_layer_graphs", "operator_sn_eager")


class _Scale(nn.Module):
    """The cheapest parametrization that returns a new weight: ``W -> c W`` (c = 1)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 1.0


def build(variant: str, base: nn.Module, image_size: int, beta: float) -> nn.Module:
    """A copy of ``base`` with the variant's normalization on every Conv/Linear."""
    model = copy.deepcopy(base)
    if variant.startswith("operator_sn"):
        apply_spectral_norm(
            model,
            beta=beta,
            input_shape=(3, image_size, image_size),
            cuda_graph=variant != "operator_sn_eager",
            batch_fold=variant != "operator_sn_param",
        )
        if variant == "operator_sn_layer_graphs":  # per-layer graphs, not one for the model
            grouped.uninstall(model)
    elif variant == "torch_sn":
        for m in list(model.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                torch.nn.utils.parametrizations.spectral_norm(m)
    elif variant == "mul_floor":
        for m in list(model.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                torch.nn.utils.parametrize.register_parametrization(m, "weight", _Scale())
    return model


def make_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bf16: bool = False
) -> Callable[[], None]:
    """One SGD training step on a fixed batch (``bf16``: the forward under bf16 autocast)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def median_ci(ratios: list[float], *, level: float = 0.95, resamples: int = 2000) -> list[float]:
    """Percentile-bootstrap interval of the median of per-round ratios (rounds resampled)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    lo = int((1 - level) / 2 * resamples)
    return [meds[lo], meds[resamples - 1 - lo]]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed rounds (one step per variant)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--beta", type=float, default=1.0, help="operator SN bound")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast forwards")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last model and inputs"
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sn_overhead.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    variants = CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    steps = {
        v: make_step(
            build(v, base, args.image_size, args.beta).to(device, memory_format=fmt),
            x,
            y,
            bf16=args.bf16,
        )
        for v in variants
    }

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {v: [] for v in variants}
    faults = dict.fromkeys(variants, 0)
    for r in range(args.warmup + args.steps):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            sync()
            f0, t0 = _minor_faults(), time.perf_counter()
            steps[v]()
            sync()
            if r >= args.warmup:
                times[v].append(time.perf_counter() - t0)
                faults[v] += _minor_faults() - f0

    plain = times["plain"]
    round_ratios = {v: [a / b for a, b in zip(t, plain, strict=True)] for v, t in times.items()}
    result = {
        "config": {
            "model": "torchvision resnet18 (num_classes=10)",
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "beta": args.beta,
            "device": str(device),
            "bf16": args.bf16,
            "channels_last": args.channels_last,
            "cudnn_benchmark": args.cudnn_benchmark,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "processor": cpu_name(),
        },
        "median_step_s": {v: statistics.median(t) for v, t in times.items()},
        "ratio_of_medians": {
            v: statistics.median(t) / statistics.median(plain) for v, t in times.items()
        },
        "median_round_ratio": {v: statistics.median(r) for v, r in round_ratios.items()},
        "round_ratio_ci95": {v: median_ci(r) for v, r in round_ratios.items()},
        "minor_page_faults_per_step": {v: faults[v] / args.steps for v in variants},
        "times_s": times,
    }
    print(
        f"{'variant':<24} {'median step (s)':>16} {'ratio of medians':>17} "
        f"{'median round ratio':>19} {'95% CI':>14} {'faults/step':>12}"
    )
    for v in variants:
        lo, hi = result["round_ratio_ci95"][v]
        print(
            f"{v:<24} {result['median_step_s'][v]:>16.4f} {result['ratio_of_medians'][v]:>17.3f} "
            f"{result['median_round_ratio'][v]:>19.3f} {f'[{lo:.3f}, {hi:.3f}]':>14} "
            f"{result['minor_page_faults_per_step'][v]:>12.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
