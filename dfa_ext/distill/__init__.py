"""Stage 2: distil a student towards the teacher (DFA and the baselines users compare it with)."""

from .config import FEATURE_METHODS, METHODS, PAIR_METHODS, DistillConfig
from .distillers import (ATDistiller, Distiller, DKDDistiller, FeatureDistiller, FeatureLossDistiller, FitNetDistiller,
                         KDDistiller, SPDistiller, VanillaDistiller)
from .loss import DFALoss
from .pair_losses import AttentionLoss, GroupPairLoss, HintLoss, SimilarityLoss, group_weights
from .targets import GroupTarget, group_targets, stage_weights
from .trainer import run_distill

__all__ = ["ATDistiller", "AttentionLoss", "DFALoss", "DKDDistiller", "Distiller", "DistillConfig", "FEATURE_METHODS",
           "FeatureDistiller", "FeatureLossDistiller", "FitNetDistiller", "GroupPairLoss", "GroupTarget", "HintLoss",
           "KDDistiller", "METHODS", "PAIR_METHODS", "SPDistiller", "SimilarityLoss", "VanillaDistiller",
           "group_targets", "group_weights", "run_distill", "stage_weights"]
