"""Trainers: the shared epoch loop, checkpoints, metrics, and stage 0 (teacher training)."""

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .evaluate import evaluate
from .interrupt import TrainingInterrupted
from .loop import FitResult, LoopConfig, TrainingTask, fit
from .teacher import TeacherConfig, train_teacher

__all__ = ["FitResult", "LoopConfig", "TeacherConfig", "TrainingInterrupted", "TrainingTask", "evaluate", "fit",
           "load_checkpoint", "model_from_checkpoint", "save_checkpoint", "train_teacher"]
