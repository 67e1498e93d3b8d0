"""Stage 2: distil a student towards the teacher (DFA and the baselines users compare it with)."""

from .config import FEATURE_METHODS, METHODS, DistillConfig
from .distillers import Distiller, FeatureDistiller, KDDistiller, VanillaDistiller
from .loss import DFALoss
from .targets import GroupTarget, group_targets, stage_weights
from .trainer import run_distill

__all__ = ["DFALoss", "Distiller", "DistillConfig", "FEATURE_METHODS", "FeatureDistiller", "GroupTarget", "KDDistiller",
           "METHODS", "VanillaDistiller", "group_targets", "run_distill", "stage_weights"]
