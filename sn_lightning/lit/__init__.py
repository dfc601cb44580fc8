from sn_lightning.lit.classifier import SNClassifier as SNClassifier

__all__ = ["SNClassifier"]
