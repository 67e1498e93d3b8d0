"""Options of stage 1, ``dfa search`` (defaults: method.md sections 5 and 8)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import option
from ..data.options import DataOptions
from ..errors import ConfigError
from ..kernels_switch import KERNEL_CHOICES
from ..training.run_options import RunOptions

OBJECTIVES = ("bridge", "st", "ts", "distill")
ORDERS = ("first", "second")
# The search recipe measured in bench/RESULTS.md ("Is the search stable?"): beta's gradient is noisy and
# at first dominated by the fresh student's random features, so beta waits while the weights warm
# up for half of each group's steps, then moves for the other half. Shorter searches without a
# warm-up found the seed's alpha; much longer ones drift back towards the first block.
DEFAULT_STEPS_PER_GROUP = 400
DEFAULT_WARMUP_SHARE = 2  # warm-up: half of each group's steps (the weights learn, beta waits)
# beta's Adam (DARTS' lr 3e-4 suits searches of tens of thousands of steps; ours are hundreds).
# The Architect takes these too, so a search built from the parts is the measured recipe.
ARCH_LR = 1e-2
ARCH_BETAS = (0.5, 0.999)
ARCH_WEIGHT_DECAY = 1e-3


@dataclass
class SearchConfig(RunOptions, DataOptions):
    """Stage 1: for each teacher layer group in turn, learn beta (alpha = softmax(beta)) with the
    bridge loss on search-val while the student and connectors train on search-train."""

    teacher: str | None = option(None, "teacher checkpoint (last.pt or best.pt of dfa train-teacher)")
    student: str | None = option("resnet8", "student network: a name (see `dfa models`) or an import path "
                                 "pkg.module:factory of your own (the factory returns a TappedNetwork)")
    student_options: dict = option({}, "extra arguments of the student network, as KEY=VALUE")
    out: str = option("runs/search", "output folder (search.json, alpha.png, alpha_trajectory.csv, checkpoints)")
    check_teacher_data: bool = option(True, "refuse a teacher trained on another dataset or image size")
    objective: str = option("bridge", "beta objective: bridge (gamma_st*L_ST + gamma_ts*L_TS), st or ts "
                            "(one path only), distill (plain partial-L2 distillation loss, collapses)",
                            choices=OBJECTIVES)
    gamma_st: float = option(1.0, "weight of the student-to-teacher bridge path L_ST")
    gamma_ts: float = option(1.0, "weight of the teacher-to-student bridge path L_TS")
    gamma_fd: float = option(1e-3, "weight of the partial-L2 loss of the distill objective (per-sample sum)")
    order: str = option("first", "first-order beta gradient, or second-order (DARTS unrolled)", choices=ORDERS)
    fd_radius: float = option(0.01, "second order: finite-difference step eps = fd_radius / |v| (DARTS: 0.01)")
    groups: tuple[int, ...] = option((), "groups to search, 0-based, in this order (default: all)")
    epochs_per_group: float | None = option(None, "search steps per group, in epochs of the search-train split "
                                            "(instead of steps_per_group)")
    steps_per_group: int | None = option(None, f"search steps per group (default {DEFAULT_STEPS_PER_GROUP} when "
                                         "epochs_per_group is unset too)")
    warmup_steps: int | None = option(None, "per group: weight steps (student and connectors) before beta starts to "
                                      "move; they count within the group's steps (default: half of them)")
    init_student: str | None = option(None, "start the student from this checkpoint (last.pt or best.pt of dfa "
                                      "distill, e.g. --method vanilla or kd) instead of a fresh initialisation")
    val_fraction: float = option(0.5, "share of the training split held out as search-val (seeded, stratified)")
    batch_size: int = option(64, "global batch size of both splits")
    arch_lr: float = option(ARCH_LR, "Adam learning rate of beta (DARTS: 3e-4, for searches of tens of thousands of steps)")
    arch_betas: tuple[float, ...] = option(ARCH_BETAS, "Adam betas of beta")
    arch_weight_decay: float = option(ARCH_WEIGHT_DECAY, "Adam weight decay of beta (the regulariser R)")
    arch_grad_clip: float | None = option(None, "clip the norm of each beta gradient to this value (unset: off)")
    beta_init_std: float = option(0.0, "beta starts at N(0, std^2) (0: uniform alpha)")
    lr: float = option(0.025, "peak SGD learning rate of the student and connectors (cosine decay)")
    lr_min: float = option(0.001, "final SGD learning rate")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(3e-4, "SGD weight decay")
    grad_clip: float | None = option(5.0, "gradient-norm clip of the weight step (unset: off)")
    kernels: str = option("fused", "DFA ops: fused kernels or the pure-PyTorch reference", choices=KERNEL_CHOICES)
    ts_margins: bool = option(False, "apply the teacher's OFD margins in the TS-path aggregation")

    def group_steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """(steps per group, warm-up steps of each group) for ``steps_per_epoch`` search-train batches."""
        if self.steps_per_group is not None:
            steps = self.steps_per_group
        elif self.epochs_per_group is not None:
            steps = max(1, math.ceil(self.epochs_per_group * steps_per_epoch))
        else:
            steps = DEFAULT_STEPS_PER_GROUP
        warmup = self.warmup_steps if self.warmup_steps is not None else steps // DEFAULT_WARMUP_SHARE
        if warmup >= steps:
            raise ConfigError(f"warmup_steps ({warmup}) must be fewer than the steps per group ({steps}): "
                              "beta would never move")
        return steps, warmup

    def validate(self, teacher_given: bool = False, student_given: bool = False) -> None:
        super().validate()
        if not self.teacher and not teacher_given:
            raise ConfigError("teacher is required: the checkpoint written by dfa train-teacher")
        if not self.student and not student_given:
            raise ConfigError("student is required: a network name, an import path pkg.module:factory, or a module")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {self.order!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.steps_per_group is not None and self.epochs_per_group is not None:
            raise ConfigError("give steps_per_group or epochs_per_group, not both")
        if self.steps_per_group is not None and self.steps_per_group < 1:
            raise ConfigError(f"steps_per_group must be positive, got {self.steps_per_group}")
        if self.epochs_per_group is not None and not self.epochs_per_group > 0:
            raise ConfigError(f"epochs_per_group must be positive, got {self.epochs_per_group}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.arch_grad_clip is not None and not self.arch_grad_clip > 0:
            raise ConfigError(f"arch_grad_clip must be > 0 (or unset), got {self.arch_grad_clip}")
        if len(self.arch_betas) != 2 or not all(0 <= b < 1 for b in self.arch_betas):
            raise ConfigError(f"arch_betas must be two numbers in [0, 1), got {list(self.arch_betas)}")
        for name in ("gamma_st", "gamma_ts", "gamma_fd", "arch_lr", "arch_weight_decay", "lr", "lr_min",
                     "momentum", "weight_decay", "beta_init_std"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.fd_radius > 0:  # the finite difference divides by it
            raise ConfigError(f"fd_radius must be > 0, got {self.fd_radius}")
