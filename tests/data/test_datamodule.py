from pathlib import Path

import numpy as np
import pytest
import torch

from sn_lightning.data import DATASETS, ImageDataModule
from sn_lightning.data.datamodule import STAND_IN_CLASSES, missing_data_deferred
from sn_lightning.errors import ConfigError, ConfigWarning, MissingDataError
from tests.data.fixtures import make_cifar, make_idx_dataset, make_image_folder, make_svhn

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _all(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_digits_split_is_fixed_stratified_and_in_unit_range():
    dm = ImageDataModule("digits", batch_size=32, val_size=0.1)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1293, 144, 360)
    x, y = _all(dm.test_dataloader())
    assert x.shape == (360, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    assert torch.bincount(y, minlength=10).min() >= 35  # stratified: 36 per class (+-1)
    dm2 = ImageDataModule("digits", batch_size=32, val_size=0.1)
    dm2.setup("fit")
    assert torch.equal(_all(dm2.test_dataloader())[0], x)
    assert torch.equal(_all(dm2.val_dataloader())[0], _all(dm.val_dataloader())[0])
    assert (dm.num_classes, dm.input_shape) == (10, (1, 8, 8))


def test_train_loader_drops_last_and_is_seeded():
    dm = ImageDataModule("digits", batch_size=100, val_size=0.1, seed=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert all(len(b[1]) == 100 for b in batches) and len(batches) == 1293 // 100
    second_pass = list(dm.train_dataloader())  # the next epoch: another order
    assert not torch.equal(batches[0][1], second_pass[0][1])
    assert dm.state_dict() == {"train_pass": 2, "train_batch": 0}  # next: batch 0 of pass 2
    twin = ImageDataModule("digits", batch_size=100, val_size=0.1, seed=3)
    twin.setup("fit")
    for a, b in zip(batches, twin.train_dataloader(), strict=True):  # same seed, same pass
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    resumed = ImageDataModule("digits", batch_size=100, val_size=0.1, seed=3)
    resumed.load_state_dict({"train_passes": 1})  # an earlier version's checkpoint, epoch 1
    resumed.setup("fit")
    for a, b in zip(second_pass, resumed.train_dataloader(), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # mid-epoch: batch 3 of pass 1 comes next; the batches before it are not loaded again
    mid = ImageDataModule("digits", batch_size=100, val_size=0.1, seed=3)
    mid.setup("fit")
    mid.load_state_dict(
        {"train_pass": 1, "train_batch": 3, "train_batch_size": 100, "train_ranks": 1}
    )
    rest = list(mid.train_dataloader())
    assert len(rest) == len(second_pass) - 3
    for a, b in zip(second_pass[3:], rest, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(list(mid.train_dataloader())) == len(batches)  # the next pass is whole
    assert len(_all(dm.train_eval_dataloader())[1]) == 1293  # full split for the gap
    other = ImageDataModule("digits", batch_size=50, val_size=0.1, seed=3)
    other.load_state_dict(
        {"train_pass": 1, "train_batch": 3, "train_batch_size": 100, "train_ranks": 1}
    )
    other.setup("fit")
    with pytest.raises(ConfigError, match="training batch 3 of batch_size 100 on 1 rank"):
        other.train_dataloader()


def test_check_fit_takes_each_ranks_share_and_the_checkpoints_position():
    dm = ImageDataModule("digits", batch_size=700, val_size=0.1)
    dm.check_fit(ranks=1)  # 1293 examples: one batch
    with pytest.raises(ConfigError, match=r"the 647 training examples per rank \(2 ranks\)"):
        dm.check_fit(ranks=2)
    mid = {"train_pass": 3, "train_batch": 1, "train_batch_size": 700, "train_ranks": 1}
    dm.check_fit(ranks=1, checkpoint_state=mid)
    dm.check_fit(ranks=1, checkpoint_state={"train_passes": 4})  # an earlier version's
    small = ImageDataModule("digits", batch_size=300, val_size=0.1)
    small.check_fit(ranks=3)  # 431 a rank
    saved_on_one = {**mid, "train_batch_size": 300}
    with pytest.raises(ConfigError, match=r"batch_size 300 on 1 rank.*has batch_size 300 on 3"):
        small.check_fit(ranks=3, checkpoint_state=saved_on_one)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_folder_and_val_from_test(tmp_path, compress):
    arrays = make_idx_dataset(tmp_path / "MNIST" / "raw", compress=compress)  # torchvision's layout
    dm = ImageDataModule(
        "mnist", data_dir=str(tmp_path), batch_size=8, val_size=10, val_source="test"
    )
    dm.setup("fit")
    x_val, _ = _all(dm.val_dataloader())
    expected = arrays["t10k-images-idx3-ubyte"][:10].astype(np.float32) / 255
    np.testing.assert_allclose(x_val[:, 0].numpy(), expected, rtol=0, atol=1e-7)
    assert len(dm.test_set) == 30 and len(dm.train_set) == 60


def test_fashion_mnist_default_folder_and_fraction(tmp_path):
    make_idx_dataset(tmp_path)
    dm = ImageDataModule("fashion_mnist", data_dir=str(tmp_path), batch_size=8, val_size=0.25)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (45, 15)
    assert DATASETS["fashion_mnist"].default_dir == str(FMNIST_DIR)


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    dm = ImageDataModule("fashion_mnist", batch_size=128, val_size=500, val_source="test")
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (60000, 500, 9500)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (1, 28, 28) and set(y.tolist()) <= set(range(10))
    assert 11.0 < dm.mean_input_norm() < 13.5


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_datamodule(tmp_path, classes):
    make_cifar(tmp_path, classes=classes)
    name = "cifar10" if classes == 10 else "cifar100"
    dm = ImageDataModule(name, data_dir=str(tmp_path), batch_size=4, val_size=2)
    dm.setup("fit")
    n_train = 60 if classes == 10 else 12
    assert len(dm.train_set) == n_train - 2 and len(dm.test_set) == 12
    assert dm.num_classes == classes and dm.input_shape == (3, 32, 32) and len(dm.mean) == 3


def test_a_partial_cifar_folder_names_the_missing_batch_and_downloads_again(tmp_path, monkeypatch):
    import torchvision

    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=r"has no cifar-10-batches-py/data_batch_3 for dataset"):
        ImageDataModule("cifar10", data_dir=str(tmp_path))
    calls = []
    monkeypatch.setattr(
        torchvision.datasets,
        "CIFAR10",
        lambda root, train, download: calls.append(train) or make_cifar(Path(root)),
    )
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path), download=True, batch_size=4)
    dm.prepare_data()  # the folder is incomplete: torchvision fetches (and checks) it again
    dm.setup("fit")
    assert calls and len(dm.train_set) == 54


def test_svhn_datamodule(tmp_path):
    make_svhn(tmp_path)
    dm = ImageDataModule("svhn", data_dir=str(tmp_path), batch_size=4, val_size=5)
    dm.setup("fit")
    x, y = _all(dm.test_dataloader())
    assert x.shape == (20, 3, 32, 32) and int(y.max()) <= 9


def test_imagefolder(tmp_path):
    make_image_folder(tmp_path)
    dm = ImageDataModule(
        "imagefolder", data_dir=str(tmp_path), image_size=16, batch_size=4, val_size=3
    )
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.input_shape == (3, 16, 16)
    x, _ = _all(dm.test_dataloader())
    assert x.shape == (18, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert len(dm.train_set) == 15 and len(dm.val_set) == 3


def test_imagefolder_splits_use_train_class_indices(tmp_path):
    # ImageFolder numbers each split's own folders: a test/ without "dog" gave "emu" index 1
    # (train's "dog") and its images were scored against the wrong class.
    import shutil

    make_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "test" / "dog")
    dm = ImageDataModule("imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=4)
    dm.setup("fit")
    assert dm.test_set.dataset.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    _, y = _all(dm.test_dataloader())
    assert sorted(set(y.tolist())) == [0, 2] and int((y == 2).sum()) == 6
    (tmp_path / "test" / "yak").mkdir()
    (tmp_path / "test" / "emu" / "0.png").rename(tmp_path / "test" / "yak" / "0.png")
    dm = ImageDataModule("imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=4)
    with pytest.raises(ConfigError, match=r"test/ has class folders that train/ lacks: \['yak'\]"):
        dm.setup("fit")


def test_val_size_that_rounds_to_no_example_is_refused():
    dm = ImageDataModule("digits", batch_size=8, val_size=0.0001)
    with pytest.raises(ConfigError, match=r"val_size 0\.0001 of 1437 train examples rounds to no"):
        dm.setup("fit")


def test_val_size_one_is_one_example():
    dm = ImageDataModule("digits", batch_size=8, val_size=1)
    dm.setup("fit")
    assert len(dm.val_set) == 1 and len(dm.train_set) == 1436


def test_val_size_that_takes_every_example_is_refused():
    dm = ImageDataModule("digits", batch_size=8, val_size=5000.0)
    with pytest.raises(ConfigError, match=r"^val_size 5000 leaves no train examples \(of 1437\)"):
        dm.setup("fit")


def test_augmentation_off_by_default_on_when_asked():
    dm = ImageDataModule("digits", batch_size=16)
    dm.setup("fit")
    x0, _ = dm.train_set[0]
    assert torch.equal(x0, dm.train_eval_set[0][0])
    aug = ImageDataModule("digits", batch_size=16, augment=True)
    aug.setup("fit")
    torch.manual_seed(0)
    views = torch.stack([aug.train_set[0][0] for _ in range(20)])
    assert (views - x0).abs().amax() > 0  # random crops move the digit
    assert views.shape == (20, 1, 8, 8)


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            make_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path / "new"), download=True, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert calls and all(c[2] for c in calls)
    assert len(dm.test_set) == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "cifar"}, "unknown dataset 'cifar'; valid choices: digits"),
        ({"dataset": "digits", "batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"dataset": "digits", "batch_size": -3}, "got -3"),
        ({"dataset": "mnist", "data_dir": "/nonexistent/x"}, r"/nonexistent/x .* does not exist"),
        ({"dataset": "digits", "val_size": -1}, "val_size"),
        ({"dataset": "imagefolder"}, "needs --data.data_dir"),
        ({"dataset": "digits", "mean": [0.1, 0.2]}, r"data.mean/data.std need 1 value\(s\)"),
        (
            {"dataset": "digits", "std": [float("nan")]},
            "std positive and finite, got .* and \\[nan\\]",
        ),
        ({"dataset": "digits", "mean": [float("inf")]}, "mean must be finite"),
        (
            {"dataset": "digits", "eval_batch_size": 0},
            "eval_batch_size must be a positive integer, got 0",
        ),
        ({"dataset": "digits", "num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
        (
            {"dataset": "digits", "image_size": 0},
            "image_size applies to dataset 'imagefolder' only",
        ),
        ({"dataset": "digits", "val_size": float("nan")}, "val_size"),
        ({"dataset": "digits", "val_size": 1.0}, r"val_size 1\.0 is ambiguous: a fraction"),
        ({"dataset": "digits", "seed": -1}, r"data seed must be an integer in \[0, 2\^63 - 1\]"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ImageDataModule(**kwargs)


def test_a_data_dir_for_the_bundled_digits_warns(tmp_path, recwarn):
    dm = ImageDataModule("digits", data_dir=str(tmp_path / "nowhere"))
    messages = [str(w.message) for w in recwarn if w.category is ConfigWarning]
    assert any(
        "data.data_dir=" in m and "is not used: dataset 'digits' is bundled" in m for m in messages
    )
    dm.setup("fit")  # still the bundled data; nothing is created at data_dir
    assert dm.input_shape == (1, 8, 8) and not (tmp_path / "nowhere").exists()
    recwarn.clear()
    ImageDataModule("digits")
    assert not any("is not used" in str(w.message) for w in recwarn)


def test_verify_images_off_for_a_dataset_that_is_not_imagefolder_warns(recwarn):
    ImageDataModule("digits", verify_images=False)
    messages = [str(w.message) for w in recwarn if w.category is ConfigWarning]
    assert messages == [
        "data.verify_images=false is not used: it applies to dataset 'imagefolder' only, "
        "not 'digits'"
    ]
    recwarn.clear()
    ImageDataModule("digits", verify_images=True)
    assert not [w for w in recwarn if w.category is ConfigWarning]


def test_missing_file_in_existing_folder(tmp_path):
    make_idx_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte"):
        ImageDataModule("mnist", data_dir=str(tmp_path))


def test_missing_data_deferred_records_the_error_and_goes_on_checking(tmp_path):
    """Checking a config without its data (sweep validate): missing files are recorded, not raised."""
    with missing_data_deferred() as missing:
        dm = ImageDataModule("imagefolder", data_dir=str(tmp_path / "no"), image_size=8)
        cifar = ImageDataModule("cifar10", data_dir=str(tmp_path / "no"))
        with pytest.raises(ConfigError, match=r"std positive and finite, got .* and \[0.0\]"):
            ImageDataModule("mnist", data_dir=str(tmp_path / "no"), std=[0.0])
    assert [type(e) for e in missing] == [MissingDataError] * 3
    assert str(missing[0]) == f"imagefolder data_dir {tmp_path / 'no'} has no train/ class folder"
    assert "for dataset 'cifar10' does not exist" in str(missing[1])
    assert (dm.num_classes, dm.input_shape) == (STAND_IN_CLASSES, (3, 8, 8))
    assert missing[0].assumed == "2 classes stood in for the class folders of train/"
    assert missing[1].assumed is None
    assert (cifar.num_classes, cifar.input_shape) == (10, (3, 32, 32))
    # outside the context the same construction raises again, and the data is read when present
    with pytest.raises(MissingDataError, match="has no train/ class folder"):
        ImageDataModule("imagefolder", data_dir=str(tmp_path / "no"), image_size=8)
    make_image_folder(tmp_path / "here")
    with missing_data_deferred() as missing:
        dm = ImageDataModule("imagefolder", data_dir=str(tmp_path / "here"), image_size=8)
    assert missing == [] and dm.num_classes == 3  # the three class folders, not the stand-in
    # train/ present, test/ missing: the class count comes from train/, no stand-in
    make_image_folder(tmp_path / "half", classes=("a", "b", "c", "d"))
    for f in (tmp_path / "half" / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "half" / "test").iterdir()):
        d.rmdir()
    (tmp_path / "half" / "test").rmdir()
    with missing_data_deferred() as missing:
        dm = ImageDataModule("imagefolder", data_dir=str(tmp_path / "half"), image_size=8)
    assert dm.num_classes == 4 and len(missing) == 1 and missing[0].assumed is None
    assert str(missing[0]) == f"imagefolder data_dir {tmp_path / 'half'} has no test/ class folder"


def test_corrupt_file_found_at_setup(tmp_path):
    make_idx_dataset(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    dm = ImageDataModule("mnist", data_dir=str(tmp_path), batch_size=4)
    with pytest.raises(ConfigError, match=r"corrupt data file .*train-images"):
        dm.setup("fit")


def test_batch_larger_than_train_set(tmp_path):
    make_svhn(tmp_path)
    dm = ImageDataModule("svhn", data_dir=str(tmp_path), batch_size=64, val_size=5)
    dm.setup("fit")
    with pytest.raises(
        ConfigError, match=r"batch_size 64 exceeds the 25 training examples .*use at most 25"
    ):
        dm.train_dataloader()


def test_a_failed_download_is_one_config_error(monkeypatch, tmp_path):
    """download=true without network: one line saying where the files go, not a socket trace."""
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path / "c"), download=True)
    with pytest.raises(ConfigError) as info:
        dm.prepare_data()
    assert str(info.value) == (
        f"download of 'cifar10' into {tmp_path / 'c'} failed (<urlopen error [Errno -2] Name or "
        "service not known>); put the files there (or set --data.data_dir to the folder holding "
        "them) and run again"
    )


def test_a_data_dir_that_cannot_be_created_for_a_download_is_one_config_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    target = tmp_path / "a_file" / "mnist"  # a file on the path: NotADirectoryError
    dm = ImageDataModule("mnist", data_dir=str(target), download=True)
    with pytest.raises(ConfigError) as info:
        dm.prepare_data()
    assert str(info.value) == (
        f"cannot create data_dir {target} to download 'mnist' into (NotADirectoryError: Not a "
        "directory); set --data.data_dir to a folder you can write"
    )


def test_imagefolder_honours_val_source_and_a_val_folder(tmp_path):
    import shutil

    make_image_folder(tmp_path)  # 18 train, 18 test images

    def data(**kw):
        dm = ImageDataModule("imagefolder", data_dir=str(tmp_path), image_size=8, **kw)
        dm.setup("fit")
        return dm

    dm = data(val_size=9, val_source="test")  # a seeded draw from the test images
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 9, 9)
    (x_val, y_val), (x_test, _) = _all(dm.val_dataloader()), _all(dm.test_dataloader())
    whole, whole_y = _all(data(val_size=0).test_dataloader())
    assert torch.equal(torch.sort(torch.cat([x_val, x_test]).flatten(1), 0)[0],
                       torch.sort(whole.flatten(1), 0)[0])  # fmt: skip
    # ImageFolder lists test images class by class (6 each): the first 9 were mostly class 0
    assert sorted(whole_y.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert set(y_val.tolist()) == {0, 1, 2}
    again = data(val_size=9, val_source="test")
    assert torch.equal(_all(again.val_dataloader())[0], x_val)  # same seed, same split
    shutil.copytree(tmp_path / "test", tmp_path / "val")  # a val/ folder is the split
    assert len(data(val_size=3).val_set) == 18
    assert data(val_size=0).val_set is None  # 0: no validation
    with pytest.raises(ConfigError, match=r"has a val/ folder, .* val_source 'test' would take"):
        data(val_source="test")


def test_imagefolder_held_out_splits_are_read_in_a_seeded_mixed_order(tmp_path):
    """Note [imagefolder order]: the first examples of test and val/ mix the classes (the
    first 6 of the class-by-class listing were all class 0: capped evaluations saw one class)."""
    import shutil

    make_image_folder(tmp_path)  # 3 classes x 6 images
    shutil.copytree(tmp_path / "test", tmp_path / "val")

    def first_labels(dm, split, n=6):
        return [int(dm.split_dataloader(split).dataset[i][1]) for i in range(n)]

    dm = ImageDataModule("imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=4)
    dm.setup("fit")
    for split in ("test", "val"):
        labels = [int(t) for _, t in getattr(dm, f"{split}_set")]
        assert sorted(labels) == [0] * 6 + [1] * 6 + [2] * 6  # the same images
        assert len(set(first_labels(dm, split))) > 1, split  # 1 in class-by-class order
    again = ImageDataModule("imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=4)
    again.setup("fit")
    assert first_labels(again, "test", 18) == first_labels(dm, "test", 18)  # seeded
    other = ImageDataModule(
        "imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=4, seed=1
    )
    other.setup("fit")
    assert first_labels(other, "test", 18) != first_labels(dm, "test", 18)


def test_imagefolder_names_a_file_that_is_not_an_image_at_setup(tmp_path):
    make_image_folder(tmp_path)
    bad = tmp_path / "test" / "dog" / "3.png"
    bad.write_bytes(b"notapng")
    dm = ImageDataModule("imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=4)
    with pytest.raises(ConfigError) as info:
        dm.setup("fit")
    assert str(info.value) == (
        f"1 of 36 images cannot be read: {bad} (UnidentifiedImageError); remove or replace them "
        "(data.verify_images=false skips this check)"
    )
    # without the check, reading it names it too (one line, not PIL's traceback)
    dm = ImageDataModule(
        "imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=4, verify_images=False
    )
    dm.setup("fit")
    with pytest.raises(ConfigError, match=rf"^cannot read image {bad}: UnidentifiedImageError"):
        _all(dm.test_dataloader())


def test_ranks_share_validation_and_test_splits_without_repeats():
    """Under DDP each rank takes every R-th example of val/test, none twice (Lightning's own
    sampler pads 143 examples to 144, counting one twice in val/acc); the final evaluation's
    split_dataloader gives the whole split on any rank."""
    from types import SimpleNamespace

    dm = ImageDataModule("digits", batch_size=32, val_size=143)
    dm.setup("fit")
    whole_val, whole_test = _all(dm.val_dataloader()), _all(dm.test_dataloader())
    shares = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what Lightning attaches
        shares.append((_all(dm.val_dataloader()), _all(dm.test_dataloader())))
        for split, whole in (("val", whole_val), ("test", whole_test)):
            assert torch.equal(_all(dm.split_dataloader(split))[0], whole[0])
    (v0, t0), (v1, t1) = shares
    assert (len(v0[1]), len(v1[1]), len(t0[1]), len(t1[1])) == (72, 71, 180, 180)
    assert torch.equal(v0[0], whole_val[0][0::2]) and torch.equal(v1[0], whole_val[0][1::2])
    assert torch.equal(t1[1], whole_test[1][1::2])


def test_check_fit_refuses_fewer_validation_examples_than_ranks():
    dm = ImageDataModule("digits", batch_size=32, val_size=1)
    dm.check_fit(ranks=1)
    with pytest.raises(ConfigError, match=r"the 1 validation examples \(val_size 1\) do not give"):
        dm.check_fit(ranks=2)


def test_missing_data_messages_name_what_is_wrong_and_how_to_get_the_files(tmp_path):
    from sn_lightning.data.datasets import check_files

    (tmp_path / "a_file").write_text("")
    with pytest.raises(MissingDataError) as info:
        check_files(DATASETS["mnist"], tmp_path / "a_file")
    assert str(info.value) == (
        f"data folder {tmp_path / 'a_file'} for dataset 'mnist' is not a folder; set "
        "--data.data_dir to the folder holding the files or pass --data.download=true"
    )
    debian = Path("/usr/share/datasets/fashion-mnist")
    if debian.is_dir():
        pytest.skip("the Debian Fashion-MNIST package is installed here")
    with pytest.raises(MissingDataError) as info:
        check_files(DATASETS["fashion_mnist"], debian)
    assert str(info.value).endswith(
        "does not exist; set --data.data_dir to the folder holding the files or pass "
        "--data.download=true (this folder is Debian/Ubuntu's: apt-get install "
        "dataset-fashion-mnist fills it)"
    )
    with pytest.raises(MissingDataError) as info:  # elsewhere: no apt hint
        check_files(DATASETS["fashion_mnist"], tmp_path / "fm")
    assert "apt-get" not in str(info.value)
