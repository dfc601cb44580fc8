"""Readers for the standard on-disk formats, returning uint8 images (N, C, H, W) and int64 labels (N,).

Each reader raises :class:`ConfigError` naming the file when a file is missing or corrupt. Downloads
are torchvision's (with its checksums); reading is ours so that any folder in the standard layout works,
including Debian's ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sn_lightning.errors import ConfigError

Arrays = tuple[Tensor, Tensor]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPE = {0x08: np.uint8}


def find_file(folders: list[Path], name: str) -> Path | None:
    """First existing ``folder/name`` or ``folder/name.gz``."""
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw): magic 0x0000TTDD, DD dims of big-endian uint32, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ConfigError(f"corrupt data file {path}: {err}") from err
    if (
        len(raw) < 4
        or raw[0] != 0
        or raw[1] != 0
        or raw[2] not in _IDX_DTYPE
        or not 1 <= raw[3] <= 4
    ):
        raise ConfigError(f"corrupt data file {path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"corrupt data file {path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise ConfigError(
            f"corrupt data file {path}: header says {dims} = {count} bytes, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(folders: list[Path], split: str) -> Arrays:
    """MNIST-format split ('train' or 't10k' files) from the first folder that holds it."""
    image_name, label_name = IDX_FILES[split]
    image_path, label_path = find_file(folders, image_name), find_file(folders, label_name)
    if image_path is None or label_path is None:
        missing = image_name if image_path is None else label_name
        raise ConfigError(f"missing data file {missing}[.gz] in {', '.join(map(str, folders))}")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(
            f"corrupt data files {image_path} / {label_path}: shapes {images.shape} and {labels.shape}"
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as err:
        raise ConfigError(f"corrupt data file {path}: {err}") from err


def read_cifar(folder: Path, files: list[str], label_key: str) -> Arrays:
    """CIFAR python-format batches: dicts with 'data' (N, 3072) uint8 and labels."""
    xs, ys = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"missing data file {path}")
        batch = _unpickle(path)
        if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
            raise ConfigError(f"corrupt data file {path}: expected keys 'data' and {label_key!r}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch[label_key]):
            raise ConfigError(f"corrupt data file {path}: data shape {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def read_svhn(path: Path) -> Arrays:
    """SVHN cropped-digits .mat: X (32, 32, 3, N) uint8, y (N, 1) with label 10 meaning digit 0."""
    import scipy.io

    if not path.is_file():
        raise ConfigError(f"missing data file {path}")
    try:
        mat = scipy.io.loadmat(str(path))
        x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    except Exception as err:
        raise ConfigError(f"corrupt data file {path}: {err}") from err
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ConfigError(f"corrupt data file {path}: X shape {x.shape}, y length {len(y)}")
    y[y == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)


# PIL's errors for a file it cannot decode: UnidentifiedImageError and truncated data are OSErrors,
# a corrupt PNG chunk is a SyntaxError, a bad mode or size a ValueError.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


def read_image(path: str) -> Any:
    """One image file as an RGB PIL image (torchvision ImageFolder's loader); names the file it cannot read.

    Raises:
        ConfigError: ``cannot read image <path>: <why>``, one line, also from a DataLoader worker.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except _IMAGE_ERRORS as err:
        raise ConfigError(
            f"cannot read image {path}: {type(err).__name__} (remove or replace the file)"
        ) from err


def check_image_headers(paths: Sequence[str], *, threads: int = 8) -> None:
    """Open the header of every image (not its pixels, about 0.1 ms a file); names those PIL cannot identify.

    A file that is not an image would otherwise stop the run where it is first read, which for
    the test split is after training.

    Raises:
        ConfigError: the count of unreadable files and the first three paths.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(path: str) -> str | None:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018  (parsed from the header)
        except _IMAGE_ERRORS as err:
            return f"{path} ({type(err).__name__})"
        return None

    with ThreadPoolExecutor(threads) as pool:
        bad = [p for p in pool.map(problem, paths, chunksize=256) if p is not None]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ConfigError(
            f"{len(bad)} of {len(paths)} images cannot be read: {', '.join(bad[:3])}{more}; remove "
            "or replace them (data.verify_images=false skips this check)"
        )
