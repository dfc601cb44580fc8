"""Write tiny datasets in the real on-disk formats (IDX .gz, CIFAR pickles, SVHN .mat, image folders)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx_dataset(
    folder: Path, n_train: int = 60, n_test: int = 40, *, compress: bool = True, seed: int = 0
):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, compress=compress)
    return arrays


def make_cifar(folder: Path, *, classes: int = 10, per_batch: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    if classes == 10:
        sub, label_key = folder / "cifar-10-batches-py", "labels"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        sub, label_key = folder / "cifar-100-python", "fine_labels"
        names = ["train", "test"]
    sub.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, per_batch).tolist(),
        }
        with (sub / name).open("wb") as f:
            pickle.dump(batch, f)
        out[name] = batch
    return out


def make_svhn(folder: Path, n_train: int = 30, n_test: int = 20, seed: int = 0):
    import scipy.io

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # SVHN stores digit 0 as label 10
        scipy.io.savemat(str(folder / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return out


def make_image_folder(
    folder: Path, classes=("cat", "dog", "emu"), per_class: int = 6, size: int = 12
):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = folder / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )
