import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    """SN + PGD adversarial training on 2 CPU processes (gloo): ranks end with identical state."""
    callbacks = json.dumps(
        [{"class_path": "tests.ddp_helpers.DumpState", "init_args": {"out": str(tmp_path)}}]
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sn_lightning.fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_epochs=2",
            "--model.backbone=torchvision:resnet18",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks={callbacks}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    u_keys = [k for k in states[0] if "parametrizations" in k and k.endswith(".u")]
    bn_keys = [k for k in states[0] if k.endswith("running_mean")]
    assert u_keys and bn_keys
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)
    (results,) = tmp_path.rglob("results.json")  # written once, by rank 0
    saved = json.loads(results.read_text())
    assert str(saved["settings"]["trainer"]["devices"]) == "2"
    assert "train_attack/pgd5_linf_0.1" in saved["adversarial"]
