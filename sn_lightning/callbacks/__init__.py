from sn_lightning.callbacks.adversarial import AdversarialTraining as AdversarialTraining
from sn_lightning.callbacks.datagrad import DataGrad as DataGrad
from sn_lightning.callbacks.layerwise import LayerwiseTraining as LayerwiseTraining
from sn_lightning.callbacks.robust_eval import RobustEvaluation as RobustEvaluation
from sn_lightning.callbacks.robust_eval import attack_name as attack_name

__all__ = [
    "AdversarialTraining",
    "DataGrad",
    "LayerwiseTraining",
    "RobustEvaluation",
    "attack_name",
]
