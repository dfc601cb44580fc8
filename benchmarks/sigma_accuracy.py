"""Per-layer sigma accuracy: operator power iteration vs the reshaped-kernel norm vs the truth.

For every Conv/Linear layer of a real backbone (torchvision ResNet-18, num_classes=10, at its
real input resolution inside the network), prints and saves:

- ``reshaped``: ``||W.reshape(C_out, -1)||_2`` (exact SVD), what PyTorch's built-in
  spectral_norm converges to;
- ``op@k``: the operator-norm power-iteration estimate after k rounds from a random start
  (k = 1, 5, 20 by default), what the training steps take, one round each;
- ``kr@k``: ``||A u||`` for the Golub-Kahan-Lanczos vector after k steps (as many products) from
  the same start (ops Note [Krylov refresh]): the warm-up of ``apply_spectral_norm`` (20 steps)
  and ``refresh_spectral_norm``;
- ``truth``: the exact operator norm (dense Jacobian SVD, float64) where the operator is small
  enough, else the best of 1000 power rounds and 300 Krylov steps in float64 (a lower bound) with ``upper`` the
  guaranteed upper bound (FFT), so the truth lies in ``[truth, upper]``;
- ``fft``: the FFT (circular-embedding) upper bound, to measure its tightness.

    python -m benchmarks.sigma_accuracy --image-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from sn_lightning.spectral import OperatorSpec, dense_operator_norm, power_iteration
from sn_lightning.spectral.ops import _krylov_top, _top_sigma
from sn_lightning.spectral.surgery import _record_input_shapes

DENSE_LIMIT = 2048  # exact SVD when min(n_in, n_out) is at most this


def layer_rows(model: nn.Module, image_size: int, iters: list[int], seed: int) -> list[dict]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    shapes = _record_input_shapes(model, layers, (3, image_size, image_size))
    rows = []
    for name, layer in layers.items():
        shape = None if isinstance(layer, nn.Linear) else shapes[name]
        spec = OperatorSpec.from_layer(layer, shape)
        W = layer.weight.detach().double()
        op, adjoint = spec.operator(W)
        out_shape = spec.output_shape(W)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        u0 = u = torch.randn(spec.u_shape, generator=gen, dtype=torch.float64)
        estimates, done = {}, 0
        for k in sorted(iters):
            u, sigma = power_iteration(op, adjoint, u, k - done)
            done = k
            estimates[f"op@{k}"] = float(sigma)
        for k in sorted(iters):
            estimates[f"kr@{k}"] = float(_top_sigma(op, _krylov_top(op, adjoint, u0, k)))
        n_in, n_out = math.prod(spec.input_shape), math.prod(out_shape)
        if spec.kind == "linear" or min(n_in, n_out) <= DENSE_LIMIT:
            truth = float(
                torch.linalg.matrix_norm(W, ord=2)
                if spec.kind == "linear"
                else dense_operator_norm(op, spec.input_shape)
                if n_in <= n_out
                else dense_operator_norm(adjoint, out_shape)
            )
            upper, exact = truth, True
        else:
            _, sigma = power_iteration(op, adjoint, u, 1000 - done)
            krylov = _top_sigma(op, _krylov_top(op, adjoint, u0, 300, rtol=0.0))
            truth, upper, exact = max(float(sigma), float(krylov)), spec.fft_bound(W), False
        fft = spec.fft_bound(W) if spec.kind != "linear" else truth
        reshaped = float(torch.linalg.matrix_norm(W.flatten(1), ord=2))
        rows.append(
            {
                "layer": name,
                "type": type(layer).__name__,
                "input_shape": list(spec.input_shape),
                "kernel": list(W.shape[2:]),
                "stride": list(spec.stride),
                "reshaped": reshaped,
                **estimates,
                "truth": truth,
                "truth_exact": exact,
                "upper": upper,
                "reshaped/truth": reshaped / truth,
                **{f"{k}/truth": v / truth for k, v in estimates.items()},
                "upper/truth": upper / truth,
                "fft/truth": fft / truth,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sigma_accuracy.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=10)
    rows = layer_rows(model, args.image_size, args.iters, args.seed)

    keys = [f"{m}@{k}" for m in ("op", "kr") for k in sorted(args.iters)]
    header = f"{'layer':<26} {'input':>10} {'k/s':>5} {'truth':>8} {'exact':>5} {'reshaped/t':>10} "
    header += " ".join(f"{k + '/t':>9}" for k in keys) + f" {'upper/t':>8} {'fft/t':>7}"
    print(header)
    for r in rows:
        shape = "x".join(map(str, r["input_shape"]))
        ks = f"{r['kernel'][0]}/{r['stride'][0]}" if r["kernel"] else "fc"
        line = f"{r['layer']:<26} {shape:>10} {ks:>5} {r['truth']:>8.3f} {r['truth_exact']!s:>5} "
        line += f"{r['reshaped/truth']:>10.3f} "
        line += " ".join(f"{r[k + '/truth']:>9.3f}" for k in keys)
        line += f" {r['upper/truth']:>8.4f} {r['fft/truth']:>7.4f}"
        print(line)
    convs = [r for r in rows if r["type"] == "Conv2d"]
    summary = {
        "mean reshaped/truth (convs)": sum(r["reshaped/truth"] for r in convs) / len(convs),
        "min reshaped/truth (convs)": min(r["reshaped/truth"] for r in convs),
        **{
            f"mean {k}/truth (convs)": sum(r[f"{k}/truth"] for r in convs) / len(convs)
            for k in keys
        },
        "max upper/truth": max(r["upper/truth"] for r in rows),
        "fft/truth range (convs, exact truth)": [
            min(r["fft/truth"] for r in convs if r["truth_exact"]),
            max(r["fft/truth"] for r in convs if r["truth_exact"]),
        ],
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    result = {
        "config": {
            "model": "torchvision resnet18 (num_classes=10), default init",
            "image_size": args.image_size,
            "iters": sorted(args.iters),
            "seed": args.seed,
            "torch": torch.__version__,
        },
        "summary": summary,
        "layers": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
