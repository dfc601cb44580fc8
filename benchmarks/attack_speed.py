"""PGD-k (linf) time per batch: sn_lightning.attacks.PGD vs torchattacks.PGD, same model and batch.

Both attacks run the same algorithm with the same settings (eps, step size, steps, no random start,
eval mode, true labels) on torchvision's ResNet-18 (num_classes=10, random init) at 32x32. Calls
are interleaved round by round (the order alternates) so drift and noise from a shared machine hit
both; the reported figure is the median over rounds of the per-round time ratio ours / theirs.

    python benchmarks/attack_speed.py --rounds 5                # CPU, batch 128
    python benchmarks/attack_speed.py --device cuda --rounds 20

Needs ``torchattacks`` (``pip install --no-deps torchattacks``). Writes a JSON report
(``--out``, default benchmarks/results/attack_speed.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision

from benchmarks._machine import cpu_name
from sn_lightning.attacks import PGD


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, process CPU seconds, output) of one call."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each times both)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--step-size", type=float, default=2 / 255)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--labels",
        choices=["true", "predicted"],
        default="true",
        help="predicted: attack argmax f(x) (the reference's choice); torchattacks gets the "
        "argmax from an eval-mode no_grad forward first, as its users must",
    )
    parser.add_argument(
        "--spectral-norm",
        action="store_true",
        help="apply sn_lightning.spectral.apply_spectral_norm (beta=1) to every conv/linear first: "
        "its power iteration runs on every forward, which parametrize.cached() does once per call",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attack_speed.json"))
    args = parser.parse_args(argv)

    import torchattacks  # test/benchmark-only dependency

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = torchvision.models.resnet18(weights=None, num_classes=10).to(device)
    size = args.image_size
    if args.spectral_norm:
        from sn_lightning.spectral import apply_spectral_norm

        apply_spectral_norm(model, beta=1.0, input_shape=(3, size, size))
    model.train()  # as during adversarial training: both attacks switch to eval and back
    x = torch.rand(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    ours = PGD("linf", eps=args.eps, steps=args.steps, step_size=args.step_size, labels=args.labels)
    theirs = torchattacks.PGD(
        model, eps=args.eps, alpha=args.step_size, steps=args.steps, random_start=False
    )

    def run_theirs() -> torch.Tensor:
        if args.labels == "true":
            return theirs(x, y)
        y_hat = theirs.get_output_with_eval_nograd(x).argmax(dim=1)
        return theirs(x, y_hat)

    runners = {"sn_lightning": lambda: ours(model, x, y), "torchattacks": run_theirs}

    outputs = {name: run() for name, run in runners.items()}  # warm-up (allocator, oneDNN)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu_times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            seconds, cpu_seconds, outputs[name] = _timed(runners[name], device)
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
    assert model.training, "an attack left the model in eval mode"

    ratios = [a / b for a, b in zip(times["sn_lightning"], times["torchattacks"], strict=True)]
    cpu_ratios = [
        a / b for a, b in zip(cpu_times["sn_lightning"], cpu_times["torchattacks"], strict=True)
    ]
    diff = (outputs["sn_lightning"] - outputs["torchattacks"]).abs()
    report = {
        "benchmark": f"PGD-{args.steps} linf ({args.labels} labels), torchvision resnet18 "
        f"(num_classes=10{', spectral norm' if args.spectral_norm else ''}), {size}x{size}, "
        f"batch {args.batch_size}",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "torchattacks": torchattacks.__version__,
        "threads": torch.get_num_threads(),
        "settings": {
            "eps": args.eps,
            "step_size": args.step_size,
            "steps": args.steps,
            "random_start": False,
            "labels": args.labels,
        },
        "rounds": args.rounds,
        "seconds": times,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "cpu_seconds": cpu_times,
        "cpu_ratios": cpu_ratios,
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "outputs_max_abs_diff": diff.max().item(),
        "outputs_equal_fraction": (diff == 0).float().mean().item(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(report["benchmark"], f"on {device} ({report['threads']} threads), {args.rounds} rounds")
    print(f"{'implementation':<16}{'median s/batch':>16}{'min s/batch':>14}{'median CPU s':>14}")
    for name, t in times.items():
        cpu = statistics.median(cpu_times[name])
        print(f"{name:<16}{statistics.median(t):>16.4f}{min(t):>14.4f}{cpu:>14.4f}")
    print(
        f"median ratio sn_lightning / torchattacks: {report['median_ratio']:.3f} (wall), ", end=""
    )
    print(f"{report['median_cpu_ratio']:.3f} (process CPU time)")
    print(f"per-round wall ratios: {', '.join(f'{q:.3f}' for q in ratios)}")
    print(f"outputs: max |diff| {report['outputs_max_abs_diff']:.2e}, ", end="")
    print(f"{100 * report['outputs_equal_fraction']:.2f}% identical; report: {args.out}")
    return report


if __name__ == "__main__":
    main()
