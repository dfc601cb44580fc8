"""`ImageDataModule`: one LightningDataModule for every supported dataset, selected by name."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from sn_lightning.data.datasets import DATASET_NAMES, DATASETS, check_files
from sn_lightning.data.readers import check_image_headers, read_image
from sn_lightning.data.sampling import ResumableLoader, SeededVisits, VisitSampler
from sn_lightning.errors import ConfigError, ConfigWarning, MissingDataError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Class count an imagefolder data module assumes while its folder is missing (deferred checks).
STAND_IN_CLASSES = 2
_DEFERRED: ContextVar[list[MissingDataError] | None] = ContextVar(
    "sn_lightning_missing_data_deferred", default=None
)


@contextmanager
def missing_data_deferred() -> Iterator[list[MissingDataError]]:
    """Inside, a data module whose files are missing does not raise at construction.

    It appends its :class:`MissingDataError` to the yielded list and goes on with every other
    check; an imagefolder module without its folder takes ``STAND_IN_CLASSES`` classes. For
    checking a config on a machine without the data (``sweep validate``); the caller decides
    what the missing data means.
    """
    missing: list[MissingDataError] = []
    token = _DEFERRED.set(missing)
    try:
        yield missing
    finally:
        _DEFERRED.reset(token)


def _data_missing(err: MissingDataError) -> None:
    """Raise ``err``, or record it inside :func:`missing_data_deferred`."""
    deferred = _DEFERRED.get()
    if deferred is None:
        raise err
    deferred.append(err)


class TensorImages(Dataset):
    """In-memory images (N, C, H, W), uint8 (scaled to [0, 1]) or float in [0, 1], and labels (N,)."""

    def __init__(self, x: Tensor, y: Tensor, transform: torch.nn.Module | None = None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[i]


def _same_classes(split: Any, train: Any, name: str) -> Any:
    """``split`` (an ImageFolder) with train/'s class indices: each folder numbers its own classes.

    A split that lacks a class of train/ keeps the others' indices; a class train/ does not
    have is an error (its images would be scored against another class).
    """
    unknown = sorted(set(split.classes) - set(train.classes))
    if unknown:
        raise ConfigError(
            f"imagefolder {name}/ has class folders that train/ lacks: {unknown}; train/ has "
            f"{train.classes}"
        )
    if split.classes != train.classes:
        index = [train.class_to_idx[c] for c in split.classes]
        split.samples = [(path, index[target]) for path, target in split.samples]
        split.imgs, split.targets = split.samples, [t for _, t in split.samples]
        split.classes, split.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return split


def _augmentation(input_shape: tuple[int, int, int], hflip: bool) -> torch.nn.Module:
    from torchvision.transforms import v2

    size = input_shape[1:]
    pad = max(1, size[0] // 8)  # 4 px at 32x32, 3 at 28x28, 1 at 8x8
    steps: list[torch.nn.Module] = [v2.RandomCrop(size, padding=pad)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def _next_training_batch(trainer: L.Trainer) -> tuple[int, int]:
    """(epoch, batch) of the next training batch, as Lightning resumes from a checkpoint now.

    Lightning's counts, not the loader's (it runs one batch ahead of training to spot the last
    batch): ``processed`` batches have run their training step. Between epochs (from
    ``on_train_epoch_end`` on) the next batch is the next epoch's first. Saved in the last
    batch's ``on_train_batch_end``, Lightning closes that epoch on resume: also the next
    epoch's first. Otherwise (mid-epoch, or a validation run after the last batch) the
    epoch goes on at batch ``processed``, possibly an empty rest. tests/test_fit.py checks
    every save point of ``ModelCheckpoint``.
    """
    fit = trainer.fit_loop
    epochs, batches = fit.epoch_progress.current, fit.epoch_loop.batch_progress.current
    if epochs.processed == epochs.ready:  # between epochs
        return epochs.processed, 0
    closed_on_resume = (
        batches.processed >= trainer.num_training_batches and batches.completed < batches.processed
    )
    if closed_on_resume:
        return epochs.processed + 1, 0
    return epochs.processed, batches.processed


class ImageDataModule(L.LightningDataModule):
    """Image classification data in [0, 1] pixel space (normalization lives in the model).

    Args:
        dataset: one of digits (scikit-learn's bundled 8x8 digits, no download), mnist, fashion_mnist,
            cifar10, cifar100, svhn, imagefolder.
        data_dir: folder with the dataset's files in the standard layout (IDX .gz files for
            MNIST/Fashion-MNIST; torchvision's layout for CIFAR and SVHN; ``train/``, ``test/`` and
            optionally ``val/`` class folders for imagefolder). None: the dataset's default
            (``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST, ``./data`` otherwise).
        download: download missing files into `data_dir` (needs network; torchvision checks checksums).
        batch_size: training batch size (> 0); the last incomplete batch is dropped.
        eval_batch_size: batch size for validation/test; None: 2 * batch_size.
        val_size: validation examples, a count (>= 1) or a fraction in (0, 1); 0: no validation.
        val_source: take the validation split from the end of a seeded shuffle of the training set
            ("train") or as the first `val_size` test images ("test", the reference's choice: the
            test set is then the rest).
        train_subset: use only the first N examples of the (shuffled) training split; None: all.
        augment: random crops (and horizontal flips where label-preserving); off by default.
        image_size: imagefolder only: resize images to this square size.
        verify_images: imagefolder only: open every image's header at setup (about 0.1 ms an
            image), so that a file that is not an image is named before training rather than
            where it is first read (for the test split, after training).
        mean: per-channel mean for the model's input normalization; None: the dataset's.
        std: per-channel std for the model's input normalization; None: the dataset's.
        num_workers: DataLoader workers.
        seed: seed of the split, the training shuffle and the augmentation.
    """

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int | float = 0.1,
        val_source: Literal["train", "test"] = "train",
        train_subset: int | None = None,
        augment: bool = False,
        image_size: int | None = None,
        verify_images: bool = True,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASET_NAMES:
            raise ConfigError(
                f"unknown dataset {dataset!r}; valid choices: {', '.join(DATASET_NAMES)}"
            )
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if image_size is not None and dataset != "imagefolder":
            raise ConfigError(
                f"image_size applies to dataset 'imagefolder' only; {dataset!r} has a fixed "
                f"input shape (got image_size={image_size!r}; leave it null)"
            )
        if not val_size >= 0 or (val_size >= 1 and val_size != int(val_size)):
            raise ConfigError(
                f"val_size must be a count >= 0 or a fraction in (0, 1), got {val_size!r}"
            )
        if isinstance(val_size, float) and val_size == 1.0:
            raise ConfigError(
                "val_size 1.0 is ambiguous: a fraction must be in (0, 1) (1.0 would leave nothing "
                "to train on), a count is an integer (1 for one example)"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"data seed must be an integer in [0, 2^63 - 1], got {seed!r}")
        if val_source not in ("train", "test"):
            raise ConfigError(f"unknown val_source {val_source!r}; valid choices: train, test")
        if train_subset is not None and train_subset < 1:
            raise ConfigError(
                f"train_subset must be a positive integer or null, got {train_subset!r}"
            )
        # mean/std reach the model's hparams resolved (linked); None here would clash when merged.
        self.save_hyperparameters(ignore=["mean", "std"])
        self.dataset, self.download, self.batch_size = dataset, download, batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_size, self.val_source, self.train_subset = val_size, val_source, train_subset
        self.augment, self.num_workers, self.seed = augment, num_workers, seed
        self.verify_images = verify_images
        if dataset == "imagefolder":
            self._init_imagefolder(data_dir, image_size)
            default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
        else:
            spec = DATASETS[dataset]
            self.spec = spec
            self.num_classes, self.input_shape = spec.num_classes, spec.input_shape
            default_mean, default_std = spec.mean, spec.std
            self.data_dir = Path(data_dir or spec.default_dir or ".").expanduser()
            if data_dir is not None and dataset == "digits":
                rank_zero_warn(
                    f"data.data_dir={data_dir!r} is not used: dataset 'digits' is bundled with "
                    "scikit-learn (no files)",
                    category=ConfigWarning,
                )
            if not verify_images:
                rank_zero_warn(
                    f"data.verify_images=false is not used: it applies to dataset 'imagefolder' "
                    f"only, not {dataset!r}",
                    category=ConfigWarning,
                )
            if not download:
                try:
                    check_files(spec, self.data_dir)
                except MissingDataError as err:
                    _data_missing(err)
        self.mean = list(mean if mean is not None else default_mean)
        self.std = list(std if std is not None else default_std)
        if len(self.mean) != self.input_shape[0] or len(self.std) != self.input_shape[0]:
            raise ConfigError(
                f"data.mean/data.std need {self.input_shape[0]} value(s), one per channel of "
                f"{dataset}, got mean={self.mean} and std={self.std}"
            )
        if not all(math.isfinite(m) for m in self.mean) or not all(
            0 < s < math.inf for s in self.std
        ):
            raise ConfigError(
                f"mean must be finite and std positive and finite, got {self.mean} and {self.std}"
            )
        self.train_set: Dataset | None = None
        self._sampler: VisitSampler | None = None
        # the next training batch, restored from a checkpoint: batch k of pass p (Note [exact
        # resume] in ``sampling``), with the batch size and ranks that k counts in
        self._resume: dict[str, int] = {"train_pass": 0, "train_batch": 0}
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None

    # -- imagefolder ---------------------------------------------------------------------------
    # Note [imagefolder order]
    #   ImageFolder lists images class by class. The held-out splits (test, val/ or the val draw
    #   from test) are therefore read in a seeded shuffled order: whatever reads only their first
    #   examples (evaluate's eval.max_examples, robust_eval's max_batches and final_max_examples)
    #   sees every class, not the first one or two. Which images each split holds is unchanged.
    def _init_imagefolder(self, data_dir: str | None, image_size: int | None) -> None:
        if data_dir is None:
            raise ConfigError(
                "dataset 'imagefolder' needs --data.data_dir (a folder with train/ and test/)"
            )
        if image_size is None or image_size < 1:
            raise ConfigError(
                f"dataset 'imagefolder' needs --data.image_size > 0, got {image_size!r}"
            )
        self.data_dir = Path(data_dir).expanduser()
        train = self.data_dir / "train"
        classes = [p for p in train.iterdir() if p.is_dir()] if train.is_dir() else []
        n_classes = len(classes)
        absent = next((s for s in ("train", "test") if not (self.data_dir / s).is_dir()), None)
        err = None
        if absent is not None:
            err = MissingDataError(
                f"imagefolder data_dir {self.data_dir} has no {absent}/ class folder"
            )
        elif not classes:
            err = MissingDataError(f"imagefolder {train} has no class folders")
        if err is not None:
            if not n_classes:  # the class count comes from train/: a stand-in while it is missing
                n_classes = STAND_IN_CLASSES
                err.assumed = f"{STAND_IN_CLASSES} classes stood in for the class folders of train/"
            _data_missing(err)
        self.num_classes, self.input_shape = n_classes, (3, image_size, image_size)
        self.spec = None

    def _imagefolder(self, split: str, augment: bool) -> Dataset:
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2

        steps = [v2.PILToTensor(), v2.Resize(self.input_shape[1:], antialias=True)]
        steps += [v2.ToDtype(torch.float32, scale=True)]
        if augment:
            steps.append(_augmentation(self.input_shape, hflip=True))
        try:
            return ImageFolder(
                str(self.data_dir / split), transform=v2.Compose(steps), loader=read_image
            )
        except (FileNotFoundError, OSError) as err:
            raise ConfigError(f"cannot read imagefolder {self.data_dir / split}: {err}") from err

    # -- Lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download missing files (rank 0 only, as Lightning calls it)."""
        if self.download and self.spec is not None and self.spec.download is not None:
            try:
                check_files(self.spec, self.data_dir)
            except ConfigError:
                try:
                    self.data_dir.mkdir(parents=True, exist_ok=True)
                except OSError as err:  # a file on the path, no permission, a read-only disk
                    raise ConfigError(
                        f"cannot create data_dir {self.data_dir} to download {self.dataset!r} "
                        f"into ({type(err).__name__}: {err.strerror or err}); set --data.data_dir "
                        "to a folder you can write"
                    ) from err
                try:
                    self.spec.download(self.data_dir)
                except (OSError, RuntimeError) as err:  # no network, a proxy, a bad checksum
                    raise ConfigError(
                        f"download of {self.dataset!r} into {self.data_dir} failed "
                        f"({first_line(err)}); put the files there (or set --data.data_dir to "
                        "the folder holding them) and run again"
                    ) from err

    def _n_val(self, n: int) -> int:
        k = round(self.val_size * n) if 0 < self.val_size < 1 else int(self.val_size)
        if k == 0:
            raise ConfigError(
                f"val_size {self.val_size} of {n} {self.val_source} examples rounds to no "
                "validation example; use a larger fraction or count, or 0 (no validation)"
            )
        if k >= n:
            raise ConfigError(
                f"val_size {self.val_size:g} leaves no {self.val_source} examples (of {n})"
            )
        return k

    def setup(self, stage: str | None = None) -> None:
        """Load the files and build the splits (seeded, identical on every rank)."""
        if self.train_set is not None:
            return
        if self.spec is None:
            self._setup_imagefolder()
            return
        if self.download:
            check_files(self.spec, self.data_dir)
        (x_tr, y_tr), (x_te, y_te) = self.spec.load(self.data_dir)
        shape = tuple(x_tr.shape[1:])
        if shape != self.input_shape or tuple(x_te.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"corrupt data in {self.data_dir}: images {shape}, expected {self.input_shape}"
            )
        for y, split in ((y_tr, "train"), (y_te, "test")):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ConfigError(
                    f"corrupt data in {self.data_dir}: {split} labels outside 0..{self.num_classes - 1}"
                )
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(y_tr), generator=g)
        x_tr, y_tr = x_tr[perm], y_tr[perm]
        x_va = y_va = None
        if self.val_size:
            if self.val_source == "train":
                k = self._n_val(len(y_tr))
                x_tr, x_va, y_tr, y_va = x_tr[:-k], x_tr[-k:], y_tr[:-k], y_tr[-k:]
            else:
                k = self._n_val(len(y_te))
                x_va, y_va, x_te, y_te = x_te[:k], y_te[:k], x_te[k:], y_te[k:]
        if self.train_subset is not None:
            self._check_subset(len(y_tr))
            x_tr, y_tr = x_tr[: self.train_subset], y_tr[: self.train_subset]
        aug = _augmentation(self.input_shape, self.spec.hflip) if self.augment else None
        self.train_set = TensorImages(x_tr, y_tr, aug)
        self.train_eval_set = TensorImages(x_tr, y_tr)
        self.val_set = TensorImages(x_va, y_va) if x_va is not None else None
        self.test_set = TensorImages(x_te, y_te)

    def _setup_imagefolder(self) -> None:
        """Splits of an imagefolder; the held-out ones in a seeded order (Note [imagefolder order])."""
        train, train_eval = (
            self._imagefolder("train", self.augment),
            self._imagefolder("train", False),
        )
        test = _same_classes(self._imagefolder("test", False), train, "test")
        idx, order = self._seeded_order(len(train)), self._seeded_order(len(test))
        self.test_set = Subset(test, order)
        val = None
        if (self.data_dir / "val").is_dir():
            if self.val_source != "train":
                raise ConfigError(
                    f"imagefolder {self.data_dir} has a val/ folder, which is the validation "
                    f"split; val_source {self.val_source!r} would take another (remove one)"
                )
            if self.val_size:  # val_size 0: no validation, as for the other datasets
                val = _same_classes(self._imagefolder("val", False), train, "val")
                self.val_set = Subset(val, self._seeded_order(len(val)))
        elif self.val_size and self.val_source == "test":
            k = self._n_val(len(test))
            self.val_set, self.test_set = Subset(test, order[:k]), Subset(test, order[k:])
        elif self.val_size:
            k = self._n_val(len(idx))
            self.val_set = Subset(train_eval, idx[-k:])
            idx = idx[:-k]
        if self.train_subset is not None:
            self._check_subset(len(idx))
            idx = idx[: self.train_subset]
        self.train_set, self.train_eval_set = Subset(train, idx), Subset(train_eval, idx)
        if self.verify_images:
            folders = (train, test) if val is None else (train, test, val)
            check_image_headers([path for f in folders for path, _ in f.samples])

    def _seeded_order(self, n: int) -> list[int]:
        """A permutation of ``range(n)`` drawn from ``seed`` (the same on every rank)."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def _check_subset(self, n: int) -> None:
        """A ``train_subset`` larger than the training split is an error, not silently all of it."""
        assert self.train_subset is not None
        if self.train_subset > n:
            raise ConfigError(
                f"train_subset {self.train_subset} exceeds the {n} training examples of "
                f"{self.dataset} (after the validation split); use at most {n}, or null (all)"
            )

    def _loader(self, dataset: Dataset | None, *, shard: bool = False) -> DataLoader:
        """Batches of ``dataset`` in order; ``shard``: this rank's share when fitting on several.

        The share is unpadded (Lightning's own ``DistributedSampler`` repeats examples to even the
        ranks out, which counts them twice in ``val/acc`` when the split does not divide).
        """
        assert dataset is not None, "call setup() first"
        trainer = self.trainer
        sampler = None
        if shard and trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _train_sampler(self) -> VisitSampler:
        """The one training sampler of this module, sharded for the trainer's ranks."""
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # trainer.overfit_batches: the same first batches every epoch, as Lightning's own
        shuffle = trainer is None or not trainer.overfit_batches
        sampler = self._sampler
        if sampler is not None and (sampler.num_replicas, sampler.rank, sampler.shuffle) == (
            world,
            rank,
            shuffle,
        ):
            return sampler
        new = VisitSampler(
            self.train_set, seed=self.seed, num_replicas=world, rank=rank, shuffle=shuffle
        )
        self._sampler = new
        if sampler is None or sampler.start > 0:  # new, or a restored position still unused
            self._apply_resume()
        else:  # the same place in the training order
            new.resume_pass(sampler.passes, 0)
        return new

    def _apply_resume(self) -> None:
        """Point the sampler at the restored next batch (a no-op before it exists)."""
        sampler, state = self._sampler, self._resume
        if sampler is None:
            return
        self._check_resume(state, sampler.num_replicas)
        sampler.resume_pass(state["train_pass"], state["train_batch"] * self.batch_size)

    def _check_resume(self, state: dict[str, int], ranks: int) -> None:
        """A mid-epoch position counts batches of its batch size and ranks: they must be ours."""
        batch = state["train_batch"]
        if batch == 0:
            return
        then = (state.get("train_batch_size"), state.get("train_ranks"))
        if then != (self.batch_size, ranks):
            raise ConfigError(
                f"the checkpoint resumes mid-epoch at training batch {batch} of batch_size "
                f"{then[0]} on {then[1]} rank(s); this run has batch_size {self.batch_size} "
                f"on {ranks}: resume with the checkpoint's, or from an end-of-epoch checkpoint"
            )

    def _check_batch_size(self, per_rank: int, ranks: int) -> None:
        if per_rank < self.batch_size:
            where = f" per rank ({ranks} ranks)" if ranks > 1 else ""
            raise ConfigError(
                f"batch_size {self.batch_size} exceeds the {per_rank} training examples{where} "
                f"(drop_last); use at most {per_rank}"
            )

    def files_present(self) -> bool:
        """Whether :meth:`setup` can run now, without the download ``prepare_data`` does."""
        if self.spec is None:
            return True  # an image folder, checked when the module was built
        try:
            check_files(self.spec, self.data_dir)
        except MissingDataError:
            return False
        return True

    def check_fit(self, ranks: int = 1, checkpoint_state: dict[str, Any] | None = None) -> None:
        """Checks before fitting, on the loaded splits.

        ``batch_size`` must be within each rank's share of the training split, and a
        checkpoint's mid-epoch position (this module's ``checkpoint_state``) resumable with this
        ``batch_size`` and number of ``ranks``.

        Raises:
            ConfigError: naming the value and the limit.
        """
        self.setup("fit")
        assert self.train_set is not None
        self._check_batch_size(math.ceil(len(self.train_set) / ranks), ranks)
        n_val = len(self.val_set) if self.val_set is not None else None  # type: ignore[arg-type]
        if n_val is not None and n_val < ranks:
            raise ConfigError(
                f"the {n_val} validation examples (val_size {self.val_size!r}) do not give each "
                f"of the {ranks} ranks one; use val_size >= {ranks} or 0"
            )
        if checkpoint_state:
            self._check_resume(self._normalized(checkpoint_state), ranks)

    def state_dict(self) -> dict[str, Any]:
        """The next training batch: batch ``train_batch`` of pass ``train_pass``.

        Pass e is epoch e's. Read off the trainer's counts as Lightning will resume from them
        (Note [exact resume] in ``sampling``); without a trainer, batch 0 of the next pass.
        """
        sampler, trainer = self._sampler, self.trainer
        if sampler is None:
            return dict(self._resume)
        if trainer is None:
            return {"train_pass": sampler.passes, "train_batch": 0}
        pass_index, batch = _next_training_batch(trainer)
        if batch == 0:
            return {"train_pass": pass_index, "train_batch": 0}
        return {
            "train_pass": pass_index,
            "train_batch": batch,
            "train_batch_size": self.batch_size,
            "train_ranks": sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training order of a checkpoint (a checkpoint without it: from pass 0)."""
        self._resume = self._normalized(state_dict)
        self._apply_resume()

    @staticmethod
    def _normalized(state_dict: dict[str, Any]) -> dict[str, int]:
        state = {key: int(value) for key, value in state_dict.items()}
        if "train_pass" not in state:  # a checkpoint of an earlier version: passes started
            state = {"train_pass": state.get("train_passes", 0), "train_batch": 0}
        return state

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, last incomplete batch dropped.

        Seeded and resumable, so that a run resumed from a checkpoint, mid-epoch included,
        repeats the order and augmentation (Note [exact resume] in ``sampling``).
        """
        sampler = self._train_sampler()
        self._check_batch_size(sampler.num_samples, sampler.num_replicas)
        return ResumableLoader(
            SeededVisits(self.train_set),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            state=self.state_dict,
            load=self.load_state_dict,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order; [] when val_size is 0; under DDP this rank's share."""
        return self._loader(self.val_set, shard=True) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in order; under DDP this rank's share."""
        return self._loader(self.test_set, shard=True)

    def split_dataloader(self, split: Literal["train", "val", "test"]) -> DataLoader:
        """The whole split in order on any rank ("train": unaugmented), for final evaluations."""
        sets = {"train": self.train_eval_set, "val": self.val_set, "test": self.test_set}
        return self._loader(sets[split])

    def train_eval_dataloader(self) -> DataLoader:
        """The full training split, unaugmented and in order: for the generalization gap."""
        return self.split_dataloader("train")

    def mean_input_norm(self) -> float:
        """Mean l2 norm of the (unaugmented) training inputs in [0, 1] space (PAPERS 1.5's C2)."""
        from sn_lightning.attacks import mean_input_norm

        self.setup("fit")
        return mean_input_norm(self._loader(self.train_eval_set))
