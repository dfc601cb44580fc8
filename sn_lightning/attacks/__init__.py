"""Adversarial attacks and regularizers, framework-free (plain PyTorch, no Lightning).

Every attack is called as ``attack(model, x, y) -> x_adv`` with inputs in [0, 1] pixel space and
a model that returns logits; radii are absolute in [0, 1] pixel units or relative to the mean
input norm (``eps_rel``, resolved once with ``attack.resolve_eps(mean_input_norm(loader))``).
"""

# Attack base class and helpers
from sn_lightning.attacks.base import Attack as Attack
from sn_lightning.attacks.base import LabelMode as LabelMode
from sn_lightning.attacks.base import in_attack as in_attack
from sn_lightning.attacks.base import input_gradient as input_gradient
from sn_lightning.attacks.base import mean_input_norm as mean_input_norm

# Data-gradient regularization (DataGrad)
from sn_lightning.attacks.datagrad import DataGradTerms as DataGradTerms
from sn_lightning.attacks.datagrad import datagrad_fd_loss as datagrad_fd_loss
from sn_lightning.attacks.datagrad import datagrad_penalty as datagrad_penalty

# Linf / L2 ball attacks: single step
from sn_lightning.attacks.fgm import FGM as FGM

# Hidden-layer perturbation (layerwise adversarial training)
from sn_lightning.attacks.layerwise import LayerwisePerturbation as LayerwisePerturbation
from sn_lightning.attacks.layerwise import default_layerwise_layers as default_layerwise_layers
from sn_lightning.attacks.layerwise import layerwise_layers as layerwise_layers

# Linf / L2 ball attacks: multi-step
from sn_lightning.attacks.pgd import PGD as PGD

# Threat models: norm balls ∩ [0, 1]^d
from sn_lightning.attacks.threat import THREAT_MODELS as THREAT_MODELS
from sn_lightning.attacks.threat import L2Ball as L2Ball
from sn_lightning.attacks.threat import LinfBall as LinfBall
from sn_lightning.attacks.threat import ThreatModel as ThreatModel
from sn_lightning.attacks.threat import create_threat_model as create_threat_model

# L2 Lagrangian-penalty attack
from sn_lightning.attacks.wrm import WRM as WRM

__all__ = [
    "FGM",
    "PGD",
    "THREAT_MODELS",
    "WRM",
    "Attack",
    "DataGradTerms",
    "L2Ball",
    "LabelMode",
    "LayerwisePerturbation",
    "LinfBall",
    "ThreatModel",
    "create_threat_model",
    "datagrad_fd_loss",
    "datagrad_penalty",
    "default_layerwise_layers",
    "in_attack",
    "input_gradient",
    "layerwise_layers",
    "mean_input_norm",
]
