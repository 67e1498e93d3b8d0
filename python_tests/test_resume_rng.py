"""Resuming restores the random-number state: networks with dropout draw from torch's RNG at every
training step, so a run interrupted mid-epoch and resumed must continue the same stream of draws
and end with bit-identical weights (teacher training and distillation).

The other resume tests train networks without dropout: nothing draws from the RNG after the
resume there, so they cannot see a resume that forgets to restore it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from dfa_ext import models
from dfa_ext.distill import DistillConfig, run_distill
from dfa_ext.training import TeacherConfig, TrainingInterrupted, load_checkpoint, model_from_checkpoint, train_teacher
from dfa_ext.training.checkpoint import model_record, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

DROPOUT = {"dropout": 0.3}  # wrn_{d}_{k}: dropout between the two convs of every block
STOP_STEP = 7  # mid-epoch: the digits' 1437 training images make 11 steps of 128


def _interrupt_at(stop: int) -> Callable[[int], None]:
    def on_step(step: int) -> None:
        if step == stop:  # a real Ctrl-C, delivered to this process
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differing = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differing, (f"{what}: {len(differing)} of {len(a)} tensors differ from the uninterrupted run's: "
                           f"{differing[:3]}")


def _interrupt_and_resume(train: Callable[..., object], out: Path) -> dict:
    """Runs ``train`` until step STOP_STEP, checks where it stopped, runs it again to the end;
    returns the final checkpoint."""
    with pytest.raises(TrainingInterrupted):
        train(on_step=_interrupt_at(STOP_STEP))
    assert load_checkpoint(out / "last.pt")["step"] == STOP_STEP
    train()
    return load_checkpoint(out / "last.pt")


def _assert_has_dropout(checkpoint: Path) -> None:
    """The option reached the network: the run drew dropout masks (the check can fail)."""
    rates = [m.p for m in model_from_checkpoint(checkpoint).modules() if isinstance(m, nn.Dropout)]
    assert rates and all(rate == DROPOUT["dropout"] for rate in rates)


def _teacher_config(tmp_path: Path, name: str) -> TeacherConfig:
    return TeacherConfig(model="wrn_10_1", model_options=dict(DROPOUT), data="digits", epochs=2, batch_size=128,
                         lr=0.05, seed=5, progress=False, tensorboard=False, out=str(tmp_path / name))


def test_resumed_teacher_with_dropout_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    """Exists for a resume that does not restore the RNG state (``set_rng_state(state["rng"])`` in
    ``fit``): the dropout masks after the resume would then repeat the first steps' draws instead of
    continuing the stream. Checked to fail with that bug planted (the ``set_rng_state`` call in
    dfa_ext/training/loop.py commented out)."""
    whole = train_teacher(_teacher_config(tmp_path, "whole"))
    reference = load_checkpoint(whole.last_path)
    resumed = _interrupt_and_resume(lambda **kw: train_teacher(_teacher_config(tmp_path, "parts"), **kw),
                                    tmp_path / "parts")
    assert resumed["step"] == reference["step"] == 22
    _assert_same_state(resumed["model"]["state_dict"], reference["model"]["state_dict"], "teacher")
    _assert_has_dropout(whole.last_path)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A resnet8 teacher checkpoint for the 8x8 digits (random weights: the student only needs its
    features to be fixed, not good)."""
    torch.manual_seed(0)
    teacher = models.create("resnet8", num_classes=10, in_channels=1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, {"kind": "teacher", "model": model_record(teacher, "resnet8", 10, 1)})
    return str(path)


def _distill_config(tmp_path: Path, teacher: str, name: str) -> DistillConfig:
    return DistillConfig(teacher=teacher, method="ofd", student="wrn_10_1", student_options=dict(DROPOUT),
                         data="digits", epochs=2, batch_size=128, lr=0.05, seed=5, progress=False,
                         tensorboard=False, out=str(tmp_path / name))


def test_resumed_distillation_of_a_student_with_dropout_ends_with_the_uninterrupted_weights(
        tmp_path: Path, teacher_file: str) -> None:
    """Exists for a resume that does not restore the RNG state (``set_rng_state(state["rng"])`` in
    ``fit``), through the distillation trainer: its student (a WRN with dropout 0.3) draws masks at
    every step. Checked to fail with that bug planted (the ``set_rng_state`` call in
    dfa_ext/training/loop.py commented out)."""
    run_distill(_distill_config(tmp_path, teacher_file, "whole"))
    reference = load_checkpoint(tmp_path / "whole" / "last.pt")
    resumed = _interrupt_and_resume(lambda **kw: run_distill(_distill_config(tmp_path, teacher_file, "parts"), **kw),
                                    tmp_path / "parts")
    assert resumed["step"] == reference["step"] == 22
    _assert_same_state(resumed["model"]["state_dict"], reference["model"]["state_dict"], "student")
    _assert_same_state(resumed["distiller"], reference["distiller"], "connectors")
    _assert_has_dropout(tmp_path / "whole" / "last.pt")
