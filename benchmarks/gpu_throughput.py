"""PGD-10 adversarial training of ResNet-18 at 32x32 on a GPU: images/s and fraction of peak FLOP/s.

One training step = PGD-10 (linf, 8/255, model in eval mode, as the adversarial callback runs it)
followed by one SGD step on the adversarial batch. Variants, interleaved round by round in one run:

- precision: ``fp32`` (TF32 off), ``tf32`` (TF32 matmuls/convolutions), ``bf16`` (autocast);
- memory format: NCHW or ``cl`` (channels_last model and inputs);
- ``sn``: operator spectral normalization (beta 1.0) on every Conv/Linear.

The FLOPs of one step are counted by ``torch.utils.flop_counter`` (matmuls and convolutions, forward
and backward); the ceiling of each precision is measured in the same run with an 8192^3 matrix
product (random data), so "fraction of peak" is achieved FLOP/s over the measured dense-matmul
rate of that precision on this GPU.

    python -m benchmarks.gpu_throughput --batch-sizes 128,512 --rounds 20

Writes JSON (``--out``, default benchmarks/results/gpu/gpu_throughput.json) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from sn_lightning.attacks import PGD
from sn_lightning.spectral import apply_spectral_norm


@dataclass(frozen=True)
class Variant:
    """One configuration of the training step."""

    precision: str  # fp32 | tf32 | bf16
    channels_last: bool
    sn: bool
    compiled: bool = False  # torch.compile(model): fused kernels, fewer launches

    @property
    def name(self) -> str:
        flags = [("cl", self.channels_last), ("sn", self.sn), ("compile", self.compiled)]
        return "+".join([self.precision, *(f for f, on in flags if on)])

    @property
    def eager(self) -> Variant:
        """The same variant without compilation (whose FLOP count it shares)."""
        return Variant(self.precision, self.channels_last, self.sn)


VARIANTS = tuple(
    Variant(p, cl, sn)
    for sn in (False, True)
    for p, cl in (("fp32", False), ("tf32", False), ("bf16", False), ("bf16", True))
)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN convolutions and CUDA matmuls on or off; restores the global switches."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(kind: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast for the forward passes of the ``bf16`` variants."""
    if kind == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_peak(kind: str, n: int = 8192, reps: int = 10) -> float:
    """Measured dense matmul rate (FLOP/s) of ``kind`` on random data: median of ``reps``."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    times = []
    with tf32(kind == "tf32"):
        for i in range(reps + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times)


def make_step(
    base: nn.Module, v: Variant, x: torch.Tensor, y: torch.Tensor
) -> tuple[Callable[[], None], nn.Module]:
    """The variant's PGD-10 adversarial training step on a fixed batch (its own model copy)."""
    model = copy.deepcopy(base)
    if v.sn:
        apply_spectral_norm(model, beta=1.0, input_shape=tuple(x.shape[1:]))
    model = model.cuda().train()
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if v.compiled:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    attack = PGD("linf", eps=8 / 255, steps=10)

    def step() -> None:
        # TF32 switches cover the whole step (the backward too); autocast only the forwards
        with tf32(v.precision != "fp32"):
            with autocast(v.precision):
                x_adv = attack(model, x, y)
                loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step, model


class _FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s per-op formulas (matmuls, convolutions, their grads).

    ``FlopCounterMode`` itself cannot be used: its module tracker hooks break
    ``torch.autograd.grad`` with respect to a leaf input, which every attack step calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(step: Callable[[], None]) -> int:
    """Matmul and convolution FLOPs of one call of ``step`` (forward and backward)."""
    with _FlopCount() as counter:
        step()
    return counter.total


def run_batch(
    batch_size: int, rounds: int, peaks: dict[str, float], variants: tuple[Variant, ...]
) -> list[dict]:
    """Time every variant at one batch size; rows with images/s and fraction of peak."""
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    x = torch.rand(batch_size, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (batch_size,), device="cuda")
    steps = {v: make_step(base, v, x, y)[0] for v in variants}
    flops = {}
    for v, step in steps.items():
        for _ in range(3):  # warm-up: cuDNN autotuning, the folded attack view, compilation
            step()
        if not v.compiled:
            flops[v] = count_flops(step)
    torch.cuda.synchronize()
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(rounds):
        for v in order[r % len(order) :] + order[: r % len(order)]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            steps[v]()
            torch.cuda.synchronize()
            times[v].append(time.perf_counter() - start)
    plain = statistics.median(times[variants[0]])
    rows = []
    for v in variants:
        sec = statistics.median(times[v])
        rate = flops[v.eager] / sec
        rows.append(
            {
                "variant": v.name,
                "batch_size": batch_size,
                "median_step_s": sec,
                "images_per_s": batch_size / sec,
                "gflop_per_step": flops[v.eager] / 1e9,
                "tflop_per_s": rate / 1e12,
                "fraction_of_peak": rate / peaks[v.precision],
                "x_fp32": sec / plain,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--compile", action="store_true", help="also bf16+cl(+sn) under torch.compile(model)"
    )
    parser.add_argument("--out", default="benchmarks/results/gpu/gpu_throughput.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    peaks = {k: matmul_peak(k) for k in ("fp32", "tf32", "bf16")}
    variants = VARIANTS
    if args.compile:
        variants += tuple(Variant("bf16", True, sn, compiled=True) for sn in (False, True))
    rows = []
    for b in (int(s) for s in args.batch_sizes.split(",")):
        rows += run_batch(b, args.rounds, peaks, variants)
    report = {
        "benchmark": "gpu_throughput",
        "task": "PGD-10 (linf 8/255) adversarial training step, torchvision resnet18, 32x32",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rounds": args.rounds,
        "measured_peak_tflop_per_s": {k: p / 1e12 for k, p in peaks.items()},
        "rows": rows,
    }
    print(report["gpu"], "torch", report["torch"], "| measured matmul peak TFLOP/s:", end=" ")
    print(", ".join(f"{k} {p / 1e12:.0f}" for k, p in peaks.items()))
    print(
        f"{'variant':<22}{'batch':>6}{'step ms':>9}{'img/s':>9}{'GFLOP':>8}{'TFLOP/s':>9}"
        f"{'% peak':>8}{'x fp32':>8}"
    )
    for r in rows:
        print(
            f"{r['variant']:<22}{r['batch_size']:>6}{r['median_step_s'] * 1e3:>9.1f}"
            f"{r['images_per_s']:>9.0f}{r['gflop_per_step']:>8.1f}{r['tflop_per_s']:>9.1f}"
            f"{100 * r['fraction_of_peak']:>8.1f}{r['x_fp32']:>8.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
