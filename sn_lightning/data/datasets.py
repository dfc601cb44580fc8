"""The dataset registry: shape, classes, pixel statistics, where files live and how to fetch them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sn_lightning.data import readers
from sn_lightning.errors import MissingDataError

Split = tuple[Tensor, Tensor]  # uint8 or float images (N, C, H, W), int64 labels (N,)


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset; `load(folder)` returns (train, test) in memory."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_dir: str | None
    load: Callable[[Path], tuple[Split, Split]]
    download: Callable[[Path], None] | None = None
    hflip: bool = False  # horizontal flips are label-preserving (not for digits or text)


def _load_digits(_: Path) -> tuple[Split, Split]:
    """scikit-learn's bundled 8x8 digits, values 0..16 -> [0, 1]; fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr)), (
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )


def _idx_folders(folder: Path, torchvision_name: str) -> list[Path]:
    return [folder, folder / torchvision_name / "raw", folder / "raw"]


def _idx_loader(torchvision_name: str) -> Callable[[Path], tuple[Split, Split]]:
    def load(folder: Path) -> tuple[Split, Split]:
        folders = _idx_folders(folder, torchvision_name)
        return readers.read_idx_split(folders, "train"), readers.read_idx_split(folders, "test")

    return load


_DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


def _torchvision_download(cls_name: str, **kwargs: object) -> Callable[[Path], None]:
    def download(folder: Path) -> None:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        if "split" in kwargs:
            for split in ("train", "test"):
                cls(str(folder), split=split, download=True)
        else:
            cls(str(folder), train=True, download=True)
            cls(str(folder), train=False, download=True)

    return download


def _load_cifar10(folder: Path) -> tuple[Split, Split]:
    sub = folder / "cifar-10-batches-py"
    train = readers.read_cifar(sub, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    return train, readers.read_cifar(sub, ["test_batch"], "labels")


def _load_cifar100(folder: Path) -> tuple[Split, Split]:
    sub = folder / "cifar-100-python"
    return readers.read_cifar(sub, ["train"], "fine_labels"), readers.read_cifar(
        sub, ["test"], "fine_labels"
    )


def _load_svhn(folder: Path) -> tuple[Split, Split]:
    return readers.read_svhn(folder / "train_32x32.mat"), readers.read_svhn(
        folder / "test_32x32.mat"
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("digits", 10, (1, 8, 8), (0.3053,), (0.3760,), None, _load_digits),
        DatasetSpec(
            "mnist",
            10,
            (1, 28, 28),
            (0.1307,),
            (0.3081,),
            "./data",
            _idx_loader("MNIST"),
            _torchvision_download("MNIST"),
        ),
        DatasetSpec(
            "fashion_mnist",
            10,
            (1, 28, 28),
            (0.2860,),
            (0.3530,),
            _DEBIAN_FASHION_MNIST,
            _idx_loader("FashionMNIST"),
            _torchvision_download("FashionMNIST"),
        ),
        DatasetSpec(
            "cifar10",
            10,
            (3, 32, 32),
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            "./data",
            _load_cifar10,
            _torchvision_download("CIFAR10"),
            hflip=True,
        ),
        DatasetSpec(
            "cifar100",
            100,
            (3, 32, 32),
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            "./data",
            _load_cifar100,
            _torchvision_download("CIFAR100"),
            hflip=True,
        ),
        DatasetSpec(
            "svhn",
            10,
            (3, 32, 32),
            (0.4377, 0.4438, 0.4728),
            (0.1980, 0.2010, 0.1970),
            "./data",
            _load_svhn,
            _torchvision_download("SVHN", split=True),
        ),
    ]
}
DATASET_NAMES = (*DATASETS, "imagefolder")


def _or_download(spec: DatasetSpec, folder: Path) -> str:
    """How to get the files: download, and for Debian's Fashion-MNIST folder its package."""
    ways = " or pass --data.download=true" if spec.download else ""
    if spec.name == "fashion_mnist" and folder.absolute() == Path(_DEBIAN_FASHION_MNIST):
        ways += " (this folder is Debian/Ubuntu's: apt-get install dataset-fashion-mnist fills it)"
    return ways


def check_files(spec: DatasetSpec, folder: Path) -> None:
    """Cheap existence check of a dataset's files (no parsing), so a wrong folder fails at once."""
    if spec.name == "digits":
        return
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise MissingDataError(
            f"data folder {folder.absolute()} for dataset {spec.name!r} {what}; set "
            f"--data.data_dir to the folder holding the files{_or_download(spec, folder)}"
        )
    expected = {
        "mnist": [n for pair in readers.IDX_FILES.values() for n in pair],
        "fashion_mnist": [n for pair in readers.IDX_FILES.values() for n in pair],
        "cifar10": [
            *(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
            "cifar-10-batches-py/test_batch",
        ],
        "cifar100": ["cifar-100-python/train", "cifar-100-python/test"],
        "svhn": ["train_32x32.mat", "test_32x32.mat"],
    }[spec.name]
    for name in expected:
        if spec.name in ("mnist", "fashion_mnist"):
            sub = "MNIST" if spec.name == "mnist" else "FashionMNIST"
            found = readers.find_file(_idx_folders(folder, sub), name) is not None
        else:
            found = (folder / name).is_file()
        if not found:
            raise MissingDataError(
                f"data folder {folder.absolute()} has no {name} for dataset {spec.name!r}; set "
                f"--data.data_dir to the folder holding the files{_or_download(spec, folder)}"
            )
