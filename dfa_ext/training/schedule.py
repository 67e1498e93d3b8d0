"""The weight optimiser and its learning-rate schedule (the usual CIFAR recipe).

The schedule is a pure function of the global step, so resuming only needs the step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")


def make_sgd(params: Iterable, *, lr: float, momentum: float = 0.9, nesterov: bool = True,
             weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum and L2 weight decay on every parameter."""
    if nesterov and momentum <= 0:
        raise ConfigError("nesterov needs momentum > 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


@dataclass(frozen=True)
class LrSchedule:
    """Learning rate at a global step.

    Args:
        base_lr: peak learning rate.
        total_steps: steps of the whole run.
        kind: "cosine" (to 0 at the end), "step" (times ``gamma`` at each milestone) or "constant".
        milestones: for "step", fractions of the run (e.g. (0.5, 0.75)).
        gamma: for "step", the factor per milestone.
        warmup_steps: linear warm-up from ``base_lr / warmup_steps`` before the schedule.
    """

    base_lr: float
    total_steps: int
    kind: str = "cosine"
    milestones: Sequence[float] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"lr schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError(f"lr milestones are fractions of the run in (0, 1), got {list(self.milestones)}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            passed = sum(step >= round(m * self.total_steps) for m in self.milestones)
            return self.base_lr * self.gamma ** passed
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets every parameter group's lr for ``step``; returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
