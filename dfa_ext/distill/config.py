"""Options of stage 2, ``dfa distill`` (defaults: method.md sections 6-8)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import option
from ..data.options import DataOptions
from ..errors import ConfigError
from ..kernels_switch import KERNEL_CHOICES
from ..training.loop import LoopConfig

# vanilla: CE only; kd: Hinton KD; dkd: decoupled KD; FEATURE_METHODS: the partial-L2 feature
# loss towards an aggregation of each teacher group (ofd: its last layer; uniform: alpha = 1/K;
# random: softmax of a random beta; fixed: the --alpha given; dfa: the searched alpha of
# --aggregation); PAIR_METHODS: the feature baselines on each group's last teacher layer (fitnet:
# hint regression; at: attention transfer; sp: similarity preserving). Either kind alone or with
# Hinton's KD term beside it ("+kd": FitNets' second stage is KD, the AT paper reports AT + KD;
# sp+kd is offered alike). DKD reworks KD itself: it has no "+kd".
FEATURE_METHODS = ("ofd", "uniform", "random", "fixed", "dfa")
PAIR_METHODS = ("fitnet", "at", "sp")
METHODS = ("vanilla", "kd", "dkd", *FEATURE_METHODS, *PAIR_METHODS,
           *(f"{m}+kd" for m in (*FEATURE_METHODS, *PAIR_METHODS)))
# The options each method reads besides the shared ones (a resumed run must keep them).
METHOD_OPTIONS = {"fitnet": ("hint_weight",), "at": ("at_beta", "at_p"), "sp": ("sp_gamma",),
                  "dkd": ("dkd_alpha", "dkd_beta", "dkd_warmup_epochs")}
MARGIN_SOURCES = ("bn", "empirical")
MARGIN_PLACES = ("layer", "aggregate")


def base_method(method: str) -> str:
    """The feature method of a "+kd" method ("dfa+kd" -> "dfa"); other names unchanged."""
    return method.removesuffix("+kd")


def method_options(config: "DistillConfig") -> dict:
    """The values of the options only ``config.method`` reads (``METHOD_OPTIONS``), e.g.
    {"at_beta": 1000.0, "at_p": 2.0} for at and at+kd; {} for the methods that have none."""
    return {name: getattr(config, name) for name in METHOD_OPTIONS.get(base_method(config.method), ())}


@dataclass
class DistillConfig(LoopConfig, DataOptions):
    """Stage 2: train a fresh student with cross-entropy plus the chosen method's distillation loss."""

    epochs: int = option(15, "training epochs")
    teacher: str | None = option(None, "teacher checkpoint (last.pt or best.pt of dfa train-teacher); "
                                 "not needed by --method vanilla")
    student: str | None = option("resnet8", "student network: a name (see `dfa models`) or an import path "
                                 "pkg.module:factory of your own (the factory returns a TappedNetwork)")
    student_options: dict = option({}, "extra arguments of the student network, as KEY=VALUE")
    method: str = option("dfa", "vanilla (CE only), kd (Hinton), dkd (decoupled KD), ofd (each group's last "
                         "teacher layer), uniform / random aggregation, dfa (the searched aggregation), or "
                         "the feature baselines fitnet (hint regression), at (attention transfer), sp "
                         "(similarity preserving); METHOD+kd adds Hinton's KD term to a feature method "
                         "((1 - kd_weight) CE + KD + feature loss)", choices=METHODS)
    aggregation: str | None = option(None, "search result of dfa search (search.json; in Python also the "
                                     "SearchResult run_search returns); needed by --method dfa")
    check_teacher_hash: bool = option(True, "refuse an aggregation searched with another teacher checkpoint "
                                      "file (same layers, other weights)")
    check_teacher_data: bool = option(True, "refuse a teacher trained, or an aggregation searched, on another dataset or image size")
    gamma_fd: float = option(1e-3, "weight of the partial-L2 feature loss (on its per-sample sum)")
    stage_weights: tuple[float, ...] = option((), "weight of each group's feature loss (default: OFD's "
                                              "1/2^(G-1-i) for the partial-L2 methods, 1 for the last group "
                                              "halving towards the input; fitnet: the middle group "
                                              "(G-1)//2 only; at: 1 each; sp: the last group only)")
    margins: str = option("bn", "feature methods: the teacher's margins: bn (OFD's Gaussian estimate from the "
                          "BN before each feature) or empirical (E[x | x < 0] per channel, measured on the "
                          "training images)", choices=MARGIN_SOURCES)
    margin_place: str = option("layer", "feature methods: margin ReLU on each layer before aggregating (layer), "
                               "or once on the aggregation, with the margins of the aggregated feature "
                               "(aggregate: the paper's F_t(A))", choices=MARGIN_PLACES)
    kd_temperature: float = option(4.0, "kd, dkd and METHOD+kd: softmax temperature T")
    kd_weight: float = option(0.9, "kd and METHOD+kd: loss = (1 - w) * CE + w * T^2 * KL (+ the feature loss)")
    hint_weight: float = option(100.0, "fitnet: weight of the hint loss, on the mean squared error of "
                                "ST(S_i) and the teacher's T_i (RepDistiller's and mdistiller's 100)")
    at_beta: float = option(1e3, "at: weight beta of beta * sum_i w_i mean (a_S - a_T)^2 (1e3: Zagoruyko & "
                            "Komodakis' code, RepDistiller, mdistiller; the paper's eq. 2 writes beta/2, i.e. 500)")
    at_p: float = option(2.0, "at: the attention map is mean_c |f|^p, L2-normalised (the paper's p = 2)")
    sp_gamma: float = option(3e3, "sp: weight gamma of (1/B^2) ||G_S - G_T||_F^2 (Tung & Mori's 3000)")
    dkd_alpha: float = option(1.0, "dkd: weight of the target-class term TCKD (Zhao et al.'s 1)")
    dkd_beta: float = option(8.0, "dkd: weight of the non-target-class term NCKD (Zhao et al.'s 8; "
                             "mdistiller's res56->res20 and res110->res32 use 2)")
    dkd_warmup_epochs: int = option(20, "dkd: the DKD term's weight rises linearly to 1 over this many "
                                      "epochs (min(epoch / N, 1), epochs counted from 1; 0: no warm-up)")
    alpha: tuple[float, ...] = option((), "fixed: the weights of each group's K teacher layers, first to last "
                                     "(normalised to sum 1; the same in every group), e.g. 0 0.3 0.7")
    random_std: float = option(1.0, "random: beta ~ N(0, std^2)")
    aggregation_seed: int = option(0, "random: seed of beta (apart from --seed, so every run seed sees the "
                                   "same aggregation)")
    warm_start: str | None = option(None, "start the student (and ST connectors) from a search checkpoint "
                                    "(runs/search/last.pt) instead of a fresh initialisation")
    kernels: str = option("fused", "DFA ops: fused kernels or the pure-PyTorch reference", choices=KERNEL_CHOICES)
    out: str = option("runs/distill", "output folder (checkpoints, metrics.csv, config.json)")

    def validate(self, student_given: bool = False) -> None:
        super().validate()
        if not self.student and not student_given:
            raise ConfigError("student is required: a network name, an import path pkg.module:factory, or a module")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.margins not in MARGIN_SOURCES or self.margin_place not in MARGIN_PLACES:
            raise ConfigError(f"margins must be one of {MARGIN_SOURCES} and margin_place one of {MARGIN_PLACES}, "
                              f"got {self.margins!r} and {self.margin_place!r}")
        if base_method(self.method) == "fixed" and (not self.alpha or any(not a >= 0 for a in self.alpha)
                                                    or not sum(self.alpha) > 0):
            raise ConfigError(f"alpha must give method fixed K weights >= 0 with a positive sum, got {list(self.alpha)}")
        if base_method(self.method) == "dfa" and not self.aggregation:
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
        for name in ("hint_weight", "at_beta", "sp_gamma", "dkd_alpha", "dkd_beta", "dkd_warmup_epochs"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):  # NaN fails the first test
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if not (self.at_p > 0 and math.isfinite(self.at_p)):
            raise ConfigError(f"at_p must be a finite number > 0, got {self.at_p}")
