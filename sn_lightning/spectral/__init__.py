"""Exact spectral normalization with a bound beta (Farnia, Zhang, Tse, ICLR 2019).

Layered like deel-torchlip: pure math (``ops``), the parametrization and its registrars
(``parametrization``), model surgery and export (``surgery``), reports (``report``).
"""

# pure math
from sn_lightning.spectral.ops import LinearOp as LinearOp
from sn_lightning.spectral.ops import OperatorSpec as OperatorSpec
from sn_lightning.spectral.ops import conv_operator as conv_operator
from sn_lightning.spectral.ops import conv_transpose_operator as conv_transpose_operator
from sn_lightning.spectral.ops import dense_operator_norm as dense_operator_norm
from sn_lightning.spectral.ops import linear_operator as linear_operator
from sn_lightning.spectral.ops import operator_norm as operator_norm
from sn_lightning.spectral.ops import operator_norm_upper_bound as operator_norm_upper_bound
from sn_lightning.spectral.ops import power_iteration as power_iteration
from sn_lightning.spectral.ops import rescale as rescale

# parametrization + registrars
from sn_lightning.spectral.parametrization import BoundedBatchNormScale as BoundedBatchNormScale
from sn_lightning.spectral.parametrization import BoundedSpectralNorm as BoundedSpectralNorm
from sn_lightning.spectral.parametrization import bounded_spectral_norm as bounded_spectral_norm
from sn_lightning.spectral.parametrization import freeze_spectral_norm as freeze_spectral_norm
from sn_lightning.spectral.parametrization import refresh_spectral_norm as refresh_spectral_norm
from sn_lightning.spectral.parametrization import (
    remove_bounded_spectral_norm as remove_bounded_spectral_norm,
)

# reports
from sn_lightning.spectral.report import LayerReport as LayerReport
from sn_lightning.spectral.report import SpectralNormReport as SpectralNormReport
from sn_lightning.spectral.report import network_lipschitz_bound as network_lipschitz_bound
from sn_lightning.spectral.report import spectral_norm_report as spectral_norm_report

# surgery + export
from sn_lightning.spectral.surgery import apply_spectral_norm as apply_spectral_norm
from sn_lightning.spectral.surgery import convert_sync_batchnorm as convert_sync_batchnorm
from sn_lightning.spectral.surgery import normalized_layers as normalized_layers
from sn_lightning.spectral.surgery import plain_state_dict as plain_state_dict
from sn_lightning.spectral.surgery import remove_spectral_norm as remove_spectral_norm
from sn_lightning.spectral.surgery import revert_sync_batchnorm as revert_sync_batchnorm
from sn_lightning.spectral.surgery import spectral_norms as spectral_norms

__all__ = [
    "BoundedBatchNormScale",
    "BoundedSpectralNorm",
    "LayerReport",
    "LinearOp",
    "OperatorSpec",
    "SpectralNormReport",
    "apply_spectral_norm",
    "bounded_spectral_norm",
    "conv_operator",
    "conv_transpose_operator",
    "convert_sync_batchnorm",
    "dense_operator_norm",
    "freeze_spectral_norm",
    "linear_operator",
    "network_lipschitz_bound",
    "normalized_layers",
    "operator_norm",
    "operator_norm_upper_bound",
    "plain_state_dict",
    "power_iteration",
    "refresh_spectral_norm",
    "remove_bounded_spectral_norm",
    "remove_spectral_norm",
    "rescale",
    "revert_sync_batchnorm",
    "spectral_norm_report",
    "spectral_norms",
]
