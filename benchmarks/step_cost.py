"""Cost of one training step under each scheme, as a ratio to a plain step, measured in one run.

Schemes (each as its Lightning callback runs it, on the same model and batch): plain cross-entropy;
FGM; PGD-10; WRM-15 (the reference's 15 ascent steps); layerwise perturbation (hooks on ResNet
stages); DataGrad exact (double backprop) and finite-difference. Steps are interleaved round by
round (order rotated) so machine noise hits all schemes alike; the figure is the median ratio.

    python -m benchmarks.step_cost --rounds 5                     # ResNet-18, 32x32, batch 128, CPU
    python -m benchmarks.step_cost --device cuda --rounds 20

Writes JSON (``--out``, default benchmarks/results/step_cost.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from benchmarks._machine import cpu_name
from sn_lightning.attacks import (
    FGM,
    PGD,
    WRM,
    LayerwisePerturbation,
    datagrad_fd_loss,
    datagrad_penalty,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, Callable[[], None]]:
    """One SGD step per scheme, as the callbacks do it (attack in eval mode, then a train step)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    layerwise = LayerwisePerturbation(model, eps=0.01)

    def fwd_bwd(loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain() -> None:
        fwd_bwd(F.cross_entropy(model(x), y))

    def attacked(attack: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> Callable[[], None]:
        def step() -> None:
            x_adv = attack(model, x, y)
            fwd_bwd(F.cross_entropy(model(x_adv), y))

        return step

    def datagrad_exact() -> None:
        loss, penalty, _ = datagrad_penalty(model, x, y, "l1")
        fwd_bwd(loss + 0.01 * penalty)

    def datagrad_fd() -> None:
        fwd_bwd(datagrad_fd_loss(model, x, y, lam=0.01, phi=eps, norm="l1").loss)

    steps = {
        "plain": plain,
        "fgm": attacked(FGM("linf", eps=eps)),
        "pgd10": attacked(PGD("linf", eps=eps, steps=10)),
        "wrm15": attacked(WRM(gamma=1.0, steps=15)),
        "layerwise": plain,  # the same step; the hooks act only here (see toggled)
        "datagrad_exact": datagrad_exact,
        "datagrad_fd": datagrad_fd,
    }

    def toggled(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        # The layerwise hooks stay registered; they only act during the "layerwise" step.
        def step() -> None:
            if name == "layerwise":
                fn()
            else:
                with layerwise.paused():
                    fn()

        return step

    return {name: toggled(name, fn) for name, fn in steps.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--out", default="benchmarks/results/step_cost.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device).train()
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    steps = make_steps(model, x, y, args.eps)
    names = list(steps)
    for name in names:  # warm-up
        steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    ratios = {
        n: statistics.median(t / p for t, p in zip(times[n], times["plain"], strict=True))
        for n in names
    }
    report = {
        "benchmark": "step_cost",
        "model": "torchvision resnet18",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "median_seconds": {n: statistics.median(t) for n, t in times.items()},
        "ratio_to_plain": ratios,
    }
    print(f"{'scheme':<16}{'median s':>10}{'x plain':>10}")
    for n in names:
        print(f"{n:<16}{report['median_seconds'][n]:>10.3f}{ratios[n]:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
