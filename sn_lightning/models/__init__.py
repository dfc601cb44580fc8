from sn_lightning.models.backbones import (
    SOURCES as SOURCES,
)
from sn_lightning.models.backbones import (
    create_backbone as create_backbone,
)
from sn_lightning.models.backbones import (
    list_backbones as list_backbones,
)
from sn_lightning.models.backbones import (
    parse_backbone as parse_backbone,
)
from sn_lightning.models.normalize import InputNormalize as InputNormalize

__all__ = ["SOURCES", "InputNormalize", "create_backbone", "list_backbones", "parse_backbone"]
