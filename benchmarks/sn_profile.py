"""Where operator SN's time goes: per-op self CPU time of a training step, SN minus plain.

ResNet-18 at 32x32, batch 128 (as ``benchmarks.sn_overhead``), SGD steps profiled with
``torch.profiler`` (CPU activity): the ops SN adds or makes slower, sorted by added time. Profiler
overhead inflates small ops; use ``benchmarks.sn_overhead`` for the ratio itself.

    python -m benchmarks.sn_profile --steps 5

Writes JSON (``--out``, default benchmarks/results/sn_profile.json) and prints the top rows.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

from benchmarks.sn_overhead import make_step
from sn_lightning.spectral import apply_spectral_norm


def op_times(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    """``{op: (self CPU ms per step, calls per step)}`` over ``steps`` profiled SGD steps."""
    step = make_step(model, x, y)  # the step benchmarks.sn_overhead times
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {
        e.key: (e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in prof.key_averages()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sn_profile.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    x = torch.rand(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    sn = copy.deepcopy(base)
    apply_spectral_norm(sn, beta=args.beta, input_shape=(3, 32, 32))
    plain_t, sn_t = op_times(copy.deepcopy(base), x, y, args.steps), op_times(sn, x, y, args.steps)
    rows = sorted(
        (
            {
                "op": k,
                "added_ms": sn_t.get(k, (0.0, 0))[0] - plain_t.get(k, (0.0, 0))[0],
                "sn_ms": sn_t.get(k, (0.0, 0))[0],
                "sn_calls": sn_t.get(k, (0.0, 0))[1],
                "plain_ms": plain_t.get(k, (0.0, 0))[0],
                "plain_calls": plain_t.get(k, (0.0, 0))[1],
            }
            for k in set(sn_t) | set(plain_t)
        ),
        key=lambda r: -r["added_ms"],
    )
    report = {
        "benchmark": "sn_profile",
        "model": "torchvision resnet18, 32x32",
        "batch_size": args.batch_size,
        "beta": args.beta,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "total_ms_per_step": {
            "plain": sum(v[0] for v in plain_t.values()),
            "operator_sn": sum(v[0] for v in sn_t.values()),
        },
        "rows": rows,
    }
    t = report["total_ms_per_step"]
    print(f"self CPU ms per step: plain {t['plain']:.1f}, operator SN {t['operator_sn']:.1f}")
    print(f"{'op':<48}{'added ms':>10}{'SN ms':>9}{'calls':>7}")
    for r in rows[: args.top]:
        print(f"{r['op'][:47]:<48}{r['added_ms']:>10.2f}{r['sn_ms']:>9.2f}{r['sn_calls']:>7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
