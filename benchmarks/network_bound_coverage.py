"""Which backbones get a sound network Lipschitz bound, and why the others get none.

``python -m benchmarks.network_bound_coverage --out benchmarks/results/network_bound_coverage.json``:
``network_lipschitz_bound`` of 35 timm and torchvision backbones (random init, eval mode, 10
classes; 64 px, 224 px for the transformers), each with its bound or reason and the seconds it
took. No spectral normalization: the bound is the unnormalized network's (it covers the same
graph rules; the values are large).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import timm
import torch
import torchvision

from sn_lightning.spectral import network_lipschitz_bound

TORCHVISION = (
    "resnet18",
    "vgg11_bn",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "convnext_tiny",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "googlenet",
    "mnasnet0_5",
    "swin_t",
    "vit_b_16",
)
TIMM = (
    "resnet18",
    "regnetx_002",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "res2net50_26w_4s",
    "cspresnet50",
    "xception41",
    "resnext50_32x4d",
    "convnext_atto",
    "vit_tiny_patch16_224",
    "dla34",
    "levit_128s",
    "resnetv2_50x1_bit",
    "densenet121",
    "dpn68",
    "rexnet_100",
    "ghostnet_100",
    "hrnet_w18_small",
    "selecsls42b",
    "tresnet_m",
    "nf_resnet26",
)
AT_224 = {"swin_t", "vit_b_16", "vit_tiny_patch16_224", "levit_128s"}


def build(source: str, name: str) -> torch.nn.Module:
    """A randomly initialized backbone with 10 classes, in eval mode."""
    if source == "torchvision":
        extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        return getattr(torchvision.models, name)(num_classes=10, **extra).eval()
    return timm.create_model(name, num_classes=10, pretrained=False).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/network_bound_coverage.json")
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    out: dict[str, list] = {}
    for source, names in (("torchvision", TORCHVISION), ("timm", TIMM)):
        for name in names:
            torch.manual_seed(0)
            model = build(source, name)
            size = 224 if name in AT_224 else 64
            start = time.perf_counter()
            bound, reason = network_lipschitz_bound(model, input_shape=(3, size, size))
            key = f"{'tv' if source == 'torchvision' else 'timm'}:{name}"
            out[key] = [bound, reason, round(time.perf_counter() - start, 1)]
            print(key, out[key], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    bounded = sum(v[0] is not None for v in out.values())
    print(f"{bounded} of {len(out)} backbones bounded; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
