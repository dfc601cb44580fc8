"""Read what an offline W&B run wrote (its ``run-<id>.wandb`` transaction log), for tests."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32768  # the log is LevelDB-style: 32 KiB blocks of (crc32, length, type, data) chunks
_HEADER = 7  # ":W&B", a 2-byte magic, a 1-byte version


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, records, chunks = _HEADER, [], []
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def offline_run(root: Path, run_id: str) -> Path:
    """The ``.wandb`` file of the offline run ``run_id`` under ``root``."""
    (found,) = Path(root).rglob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    return found


def finished_records(path: Path, timeout: float = 60.0) -> list[Any]:
    """The records once the run's exit record is on disk (wandb writes the file asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.2)


def wandb_summary(path: Path) -> dict[str, Any]:
    """The run summary as the file records it (the last value of each key)."""
    summary: dict[str, Any] = {}
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return summary


def wandb_run_config(path: Path) -> dict[str, Any]:
    """The run's config at start (for a sweep run: the swept values, from the agent's file)."""
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            return {item.key: json.loads(item.value_json) for item in record.run.config.update}
    raise AssertionError(f"no run record in {path}")


def wandb_final_config(path: Path) -> dict[str, Any]:
    """The run's config at its end: the run record's, then every later config update."""
    config: dict[str, Any] = {}
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else None
        if kind == "config":
            items = record.config.update
        for item in items or []:
            config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return config


def isolate_wandb(monkeypatch: Any, tmp_path: Path) -> None:
    """Offline wandb with its state in ``tmp_path`` and no run, key or sweep from the host."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_RUN_ID", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.delenv(name, raising=False)
