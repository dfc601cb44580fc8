"""LipLT vs naive: tightness at initialization and the cost of a CRM training step, in one run.

For 4C3F (1x28x28) and 6C2F (3x32x32) at default init: the naive product of per-layer bounds and the
LipLT bound, both on the sound path (certify) and from power iteration (the reference's numbers are of
the latter kind), and the time of each. Then the median time of a training step with CE only vs
CE + CRM (pairwise LipLT with `--n-iter` power iterations, differentiable), interleaved.

    python -m benchmarks.liplt --steps 5
    python -m benchmarks.liplt --device cuda --steps 20

Writes JSON (``--out``, default benchmarks/results/liplt.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sn_lightning.lipschitz import crm_penalty, liplt_bound, naive_bound
from sn_lightning.models import create_backbone

NETS = {"c4f3": (1, 28, 28), "c6f2": (3, 32, 32)}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def tightness(name: str, shape: tuple[int, int, int], device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_backbone(
        f"sn_lightning:{name}", num_classes=10, in_chans=shape[0], input_size=shape[1:]
    )
    model = model.to(device).eval()
    naive_sound, t_naive = _timed(lambda: naive_bound(model, shape))
    with torch.no_grad():
        liplt_sound, t_sound = _timed(lambda: float(liplt_bound(model, shape, certify=True)))
        naive_pi = naive_bound(model, shape, certify=False, n_iter=100)
        liplt_pi, t_pi = _timed(lambda: float(liplt_bound(model, shape, n_iter=100)))
    return {
        "naive_sound": naive_sound,
        "liplt_sound": liplt_sound,
        "ratio_sound": naive_sound / liplt_sound,
        "naive_power_iteration": naive_pi,
        "liplt_power_iteration": liplt_pi,
        "ratio_power_iteration": naive_pi / liplt_pi,
        "seconds": {
            "naive_sound": t_naive,
            "liplt_sound": t_sound,
            "liplt_power_iteration_100": t_pi,
        },
    }


def step_cost(
    name: str,
    shape: tuple[int, int, int],
    device: torch.device,
    batch: int,
    steps: int,
    n_iter: int,
) -> dict:
    torch.manual_seed(0)
    model = create_backbone(
        f"sn_lightning:{name}", num_classes=10, in_chans=shape[0], input_size=shape[1:]
    )
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.rand(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)
    state: dict = {}

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def crm() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        L = liplt_bound(model, shape, pairwise=True, n_iter=n_iter, state=state)
        (F.cross_entropy(logits, y) + 15.0 * crm_penalty(logits, y, L, R0=1e9, t=5.0)).backward()
        opt.step()

    plain(), crm()  # warm-up
    times = {"plain": [], "crm": []}
    for r in range(steps):
        for label, fn in (
            (("plain", plain), ("crm", crm)) if r % 2 == 0 else (("crm", crm), ("plain", plain))
        ):
            _, t = _timed(fn)
            times[label].append(t)
    ratio = statistics.median(c / p for c, p in zip(times["crm"], times["plain"], strict=True))
    return {
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "crm_over_plain": ratio,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-iter", type=int, default=5, help="power iterations per CRM step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/liplt.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {"device": str(device), "threads": torch.get_num_threads(), "nets": {}}
    for name, shape in NETS.items():
        entry = tightness(name, shape, device)
        entry["step"] = step_cost(name, shape, device, args.batch_size, args.steps, args.n_iter)
        report["nets"][name] = entry
        print(
            f"{name}: naive/LipLT sound {entry['ratio_sound']:.2f}x, power iteration "
            f"{entry['ratio_power_iteration']:.2f}x; CRM step {entry['step']['crm_over_plain']:.2f}x plain "
            f"(LipLT sound {entry['seconds']['liplt_sound']:.1f} s)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
