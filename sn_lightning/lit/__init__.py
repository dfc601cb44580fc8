from sn_lightning.lit.classifier import SNClassifier as SNClassifier
from sn_lightning.lit.classifier import SyncBatchNormKeepingBounds as SyncBatchNormKeepingBounds

__all__ = ["SNClassifier", "SyncBatchNormKeepingBounds"]
