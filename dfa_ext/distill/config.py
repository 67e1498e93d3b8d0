"""Options of stage 2, ``dfa distill`` (defaults: method.md sections 6-8)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..data.options import DataOptions
from ..errors import ConfigError
from ..kernels_switch import KERNEL_CHOICES
from ..training.loop import LoopConfig

# vanilla: CE only; kd: Hinton KD; the rest: feature distillation towards an aggregation of each
# teacher group (ofd: its last layer; uniform: alpha = 1/K; random: softmax of a random beta;
# dfa: the searched alpha of --aggregation).
METHODS = ("vanilla", "kd", "ofd", "uniform", "random", "dfa")
FEATURE_METHODS = ("ofd", "uniform", "random", "dfa")


@dataclass
class DistillConfig(LoopConfig, DataOptions):
    """Stage 2: train a fresh student with cross-entropy plus the chosen method's distillation loss."""

    epochs: int = option(15, "training epochs")
    teacher: str | None = option(None, "teacher checkpoint (last.pt or best.pt of dfa train-teacher); "
                                 "not needed by --method vanilla")
    student: str = option("resnet8", "student network name (see `dfa models`)")
    student_options: dict = option({}, "extra arguments of the student network, as KEY=VALUE")
    method: str = option("dfa", "vanilla (CE only), kd (Hinton), ofd (each group's last teacher layer), "
                         "uniform / random aggregation, or dfa (the searched aggregation)", choices=METHODS)
    aggregation: str | None = option(None, "search result of dfa search (search.json); needed by --method dfa")
    check_teacher_hash: bool = option(True, "refuse an aggregation searched with another teacher checkpoint "
                                      "file (same layers, other weights)")
    check_teacher_data: bool = option(True, "refuse a teacher trained, or an aggregation searched, on another dataset or image size")
    gamma_fd: float = option(1e-3, "weight of the partial-L2 feature loss (on its per-sample sum)")
    stage_weights: tuple[float, ...] = option((), "weight of each group's feature loss (default OFD's "
                                              "1/2^(G-1-i): 1 for the last group, halving towards the input)")
    kd_temperature: float = option(4.0, "kd: softmax temperature T")
    kd_weight: float = option(0.9, "kd: loss = (1 - w) * CE + w * T^2 * KL")
    random_std: float = option(1.0, "random: beta ~ N(0, std^2)")
    aggregation_seed: int = option(0, "random: seed of beta (apart from --seed, so every run seed sees the "
                                   "same aggregation)")
    warm_start: str | None = option(None, "start the student (and ST connectors) from a search checkpoint "
                                    "(runs/search/last.pt) instead of a fresh initialisation")
    kernels: str = option("fused", "DFA ops: fused kernels or the pure-PyTorch reference", choices=KERNEL_CHOICES)
    out: str = option("runs/distill", "output folder (checkpoints, metrics.csv, config.json)")

    def validate(self) -> None:
        super().validate()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "dfa" and not self.aggregation:
            raise ConfigError("aggregation is required by --method dfa: the search.json written by dfa search")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if not self.gamma_fd >= 0 or not self.random_std >= 0:
            raise ConfigError("gamma_fd and random_std must be >= 0")
        if any(not w >= 0 for w in self.stage_weights):
            raise ConfigError(f"stage_weights must be >= 0, got {list(self.stage_weights)}")
        if not self.kd_temperature > 0:
            raise ConfigError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
