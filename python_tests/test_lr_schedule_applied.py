"""The learning rates ``fit`` actually applies, step by step, over runs of several epochs (and
across a resume), against the schedules' formulas written out here.

The rates are read where SGD uses them: a global optimiser step pre-hook records every parameter
group's lr at the moment of each step, whatever code set it. The unit tests of ``LrSchedule`` check
the formula as a function; these check what the trainer feeds it (the run's length, the step
count, the warm-up in steps) and that it is applied at every step.
"""

from __future__ import annotations

import csv
import math
import os
import signal
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dfa_ext.training import TeacherConfig, TrainingInterrupted, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

BASE_LR = 0.1
EPOCHS = 3
BATCH = 256  # the digits' 1437 training images: 5 full batches per epoch, 15 steps in all


def tiny(tmp_path: Path, name: str = "run", **overrides) -> TeacherConfig:
    """A narrow resnet8 on the 8x8 digits, big batches: 3 epochs in a second or two."""
    settings = dict(model="resnet8", model_options={"width": 4}, data="digits", epochs=EPOCHS, batch_size=BATCH,
                    lr=BASE_LR, seed=2, progress=False, tensorboard=False, out=str(tmp_path / name))
    settings.update(overrides)
    return TeacherConfig(**settings)


@pytest.fixture
def applied_lrs() -> Iterator[list[float]]:
    """The lr of every optimiser step taken while the test runs (all parameter groups must agree)."""
    rates: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        lrs = {group["lr"] for group in optimizer.param_groups}
        assert len(lrs) == 1, lrs
        rates.append(lrs.pop())

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield rates
    finally:
        handle.remove()


def steps_per_epoch(config: TeacherConfig) -> int:
    """Full batches per epoch (training drops the last partial batch)."""
    return len(config.load(config.seed).train) // config.batch_size


def expected_rates(kind: str, total: int, warmup: int, milestones: tuple[float, ...] = (),
                   gamma: float = 0.1) -> list[float]:
    """The rate of each step t = 0 .. total - 1, written out from the options' documentation:
    a linear warm-up base * (t + 1) / warmup over the first ``warmup`` steps, then either a
    cosine from the base rate to 0 over the remaining steps, 0.5 base (1 + cos(pi (t - warmup) /
    (total - warmup))), or the base rate times gamma for each milestone (a fraction of the whole
    run) already reached."""
    rates = []
    for t in range(total):
        if t < warmup:
            rates.append(BASE_LR * (t + 1) / warmup)
        elif kind == "cosine":
            rates.append(0.5 * BASE_LR * (1.0 + math.cos(math.pi * (t - warmup) / (total - warmup))))
        else:  # step: exact fractions, so that "reached" does not depend on rounding
            reached = sum(Fraction(t, total) >= Fraction(m).limit_denominator(1000) for m in milestones)
            rates.append(BASE_LR * gamma ** reached)
    return rates


def _lr_column(out: Path) -> list[float]:
    return [float(row["lr"]) for row in csv.DictReader(open(out / "metrics.csv"))]


SCHEDULES = {  # options, and the warm-up in steps they mean (5 steps per epoch)
    "cosine": (dict(schedule="cosine"), 0),
    "cosine, 1 epoch of warm-up": (dict(schedule="cosine", warmup_epochs=1.0), 5),
    "step, milestones 0.4 0.8, warm-up 0.4 epochs": (
        dict(schedule="step", milestones=(0.4, 0.8), lr_gamma=0.1, warmup_epochs=0.4), 2),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_fit_applies_the_scheduled_rate_at_every_step_of_a_several_epoch_run(tmp_path: Path,
                                                                            applied_lrs: list[float],
                                                                            name: str) -> None:
    """Exists for schedules fed the wrong run: a total one epoch short (or long), a schedule indexed
    by the epoch instead of the step, a warm-up off by one step. Checked to fail with each planted
    in dfa_ext/training/ (``steps_per_epoch * (config.epochs - 1)``, or ``+ 1``, as the total in loop.py;
    ``schedule.apply(optimizer, epoch)`` in loop.py; ``step <= self.warmup_steps`` and
    ``base_lr * step / warmup_steps`` in schedule.py)."""
    options, warmup = SCHEDULES[name]
    config = tiny(tmp_path, **options)
    per_epoch = steps_per_epoch(config)
    assert per_epoch == 5  # what SCHEDULES' warm-up steps assume
    train_teacher(config)
    want = expected_rates(config.schedule, EPOCHS * per_epoch, warmup, config.milestones, config.lr_gamma)
    assert applied_lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    # metrics.csv reports each epoch's last rate
    assert _lr_column(tmp_path / "run") == pytest.approx(want[per_epoch - 1::per_epoch], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("stop", [3, 7])  # in the warm-up (epoch 1), and mid-epoch 2 after it
def test_a_resumed_run_continues_the_same_sequence_of_rates(tmp_path: Path, applied_lrs: list[float],
                                                            stop: int) -> None:
    """Exists for a resume that restarts or shifts the schedule (the step count or the warm-up not
    carried over): the rates of both sessions, one after the other, must be those of one
    uninterrupted run. Checked to fail with ``step = 0`` planted after the checkpoint is read in
    ``fit`` (dfa_ext/training/loop.py), besides the bugs of the test above."""
    config = tiny(tmp_path, schedule="cosine", warmup_epochs=1.0)

    def interrupt(step: int) -> None:
        if step == stop:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train_teacher(config, on_step=interrupt)
    assert len(applied_lrs) == stop
    train_teacher(tiny(tmp_path, schedule="cosine", warmup_epochs=1.0))
    want = expected_rates("cosine", EPOCHS * steps_per_epoch(config), 5)
    assert applied_lrs == pytest.approx(want, rel=1e-12, abs=1e-15)

