"""sn-lightning: exact spectral normalization, adversarial and certified training for image classifiers.

The framework-free core (models, spectral, attacks, evaluation) is imported eagerly; the Lightning
shell (``SNClassifier``, ``ImageDataModule``) on first access, so ``import sn_lightning`` stays light.
"""

from __future__ import annotations

from typing import Any

from sn_lightning.errors import ConfigError as ConfigError
from sn_lightning.errors import ConfigWarning as ConfigWarning
from sn_lightning.evaluation import evaluate as evaluate
from sn_lightning.models import InputNormalize as InputNormalize
from sn_lightning.models import create_backbone as create_backbone
from sn_lightning.models import list_backbones as list_backbones
from sn_lightning.spectral import apply_spectral_norm as apply_spectral_norm
from sn_lightning.spectral import freeze_spectral_norm as freeze_spectral_norm
from sn_lightning.spectral import operator_norm as operator_norm
from sn_lightning.spectral import plain_state_dict as plain_state_dict
from sn_lightning.spectral import refresh_spectral_norm as refresh_spectral_norm
from sn_lightning.spectral import remove_spectral_norm as remove_spectral_norm
from sn_lightning.spectral import spectral_norm_report as spectral_norm_report
from sn_lightning.spectral import spectral_norms as spectral_norms

__version__ = "0.1.0"

_LAZY = {"SNClassifier": "sn_lightning.lit", "ImageDataModule": "sn_lightning.data"}

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "ImageDataModule",
    "InputNormalize",
    "SNClassifier",
    "__version__",
    "apply_spectral_norm",
    "create_backbone",
    "evaluate",
    "freeze_spectral_norm",
    "list_backbones",
    "operator_norm",
    "plain_state_dict",
    "refresh_spectral_norm",
    "remove_spectral_norm",
    "spectral_norm_report",
    "spectral_norms",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sn_lightning' has no attribute {name!r}")
