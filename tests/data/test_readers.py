import gzip

import numpy as np
import pytest
import torch

from sn_lightning.data import readers
from sn_lightning.errors import ConfigError
from tests.data.fixtures import make_cifar, make_idx_dataset, make_svhn, write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip_values(tmp_path, compress):
    arrays = make_idx_dataset(tmp_path, compress=compress)
    (x_tr, y_tr), (_, y_te) = (readers.read_idx_split([tmp_path], s) for s in ("train", "test"))
    assert x_tr.shape == (60, 1, 28, 28) and x_tr.dtype == torch.uint8
    np.testing.assert_array_equal(x_tr[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_te.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert y_tr.dtype == torch.int64


def test_idx_bad_magic_truncated_and_gzip(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(ConfigError, match="bad magic"):
        readers.read_idx(bad)
    path = write_idx(tmp_path / "x", np.zeros((4, 5, 5), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ConfigError, match="header says"):
        readers.read_idx(path)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    with pytest.raises(ConfigError, match="corrupt data file"):
        readers.read_idx(broken)


def test_idx_missing_file_names_it(tmp_path):
    make_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte"):
        readers.read_idx_split([tmp_path], "test")


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_values(tmp_path, classes):
    batches = make_cifar(tmp_path, classes=classes)
    sub = tmp_path / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    key = "labels" if classes == 10 else "fine_labels"
    name = "test_batch" if classes == 10 else "test"
    x, y = readers.read_cifar(sub, [name], key)
    assert x.shape == (12, 3, 32, 32)
    # CIFAR rows are channel-major: 1024 red, 1024 green, 1024 blue
    np.testing.assert_array_equal(x[3, 1].numpy().ravel(), batches[name]["data"][3, 1024:2048])
    assert y.tolist() == batches[name][key]


def test_cifar_corrupt(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    (sub / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="corrupt data file"):
        readers.read_cifar(sub, ["test_batch"], "labels")


def test_svhn_values_and_label_10_is_zero(tmp_path):
    raw = make_svhn(tmp_path)
    x, y = readers.read_svhn(tmp_path / "train_32x32.mat")
    xr, yr = raw["train"]
    assert x.shape == (30, 3, 32, 32)
    np.testing.assert_array_equal(x[5].permute(1, 2, 0).numpy(), xr[:, :, :, 5])
    expected = yr.ravel().astype(np.int64) % 10
    np.testing.assert_array_equal(y.numpy(), expected)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="corrupt data file"):
        readers.read_svhn(tmp_path / "test_32x32.mat")
