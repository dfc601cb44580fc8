from sn_lightning.data.datamodule import ImageDataModule as ImageDataModule
from sn_lightning.data.datamodule import TensorImages as TensorImages
from sn_lightning.data.datasets import DATASET_NAMES as DATASET_NAMES
from sn_lightning.data.datasets import DATASETS as DATASETS

__all__ = ["DATASETS", "DATASET_NAMES", "ImageDataModule", "TensorImages"]
