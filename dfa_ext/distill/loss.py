"""The DFA feature loss as a module for any training loop (method.md section 6):

    loss = gamma_fd * sum_i w_i * mean_b partial_l2(ST_i(S_i), T_i[layers_i], beta_i, margins_i)

S_i is the student's group-i output before its activation, ST_i OFD's connector (1x1 conv + BN,
student to teacher channels, trained with the student), T_i[layers_i] the teacher's group-i layers
the aggregation mixes with alpha_i = softmax(beta_i), and margins_i the teacher's OFD margins.
OFD, uniform, random, fixed and searched (DFA) aggregations differ only in (layers_i, beta_i).

Stage 2's feature distillers are built on :class:`DFALoss`, so the formula lives here only.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..kernels_switch import dfa_ops
from ..margins import teacher_margins
from ..models import GroupFeatures, GroupPair, TapOutput, as_tapped, pair_networks
from ..search.result import SearchResult, check_teacher, load_search_result
from ..losses import at_least_float32
from .targets import GroupTarget, group_targets
from .targets import stage_weights as resolve_stage_weights  # the name `stage_weights` is an argument here

MARGIN_PLACES = ("layer", "aggregate")
# What names an aggregation: "ofd" | "uniform" | "random", a search result (object or search.json),
# one alpha for every group (K weights), or one alpha per group.
Aggregation = Union[str, os.PathLike, SearchResult, Sequence[float], Sequence[Sequence[float]]]
Features = Union[TapOutput, Sequence[GroupFeatures]]


def aggregate_margins(targets: Sequence[GroupTarget], margins: Sequence[Tensor]) -> list[Tensor]:
    """Per group, the [1, C] margins of the aggregated feature: the alpha-weighted mean of its
    layers' [K, C] margins (``margins[i]`` row j belongs to teacher layer j of group i)."""
    return [(torch.softmax(t.beta.double(), 0)[:, None] * m[list(t.layers)].double()).sum(0, keepdim=True).float()
            for t, m in zip(targets, margins)]


def _groups(features: Features, what: str) -> Sequence[GroupFeatures]:
    groups = features.groups if isinstance(features, TapOutput) else features
    if not isinstance(groups, (tuple, list)) or not all(isinstance(g, GroupFeatures) for g in groups):
        raise TypeError(f"{what} must be what a tapped network returns with features=True (a TapOutput) "
                        f"or its .groups, got {type(features).__name__}")
    return groups


class DFALoss(nn.Module):
    """The feature loss towards per-group aggregations of a frozen teacher's layers.

    ``loss(student_features, teacher_features)`` takes what ``net(images, features=True)``
    returns for the student and the teacher (a :class:`~dfa_ext.models.TapOutput`) and returns
    the scalar feature loss (float32, or float64 when the features are); add it to your task loss.
    Its parameters are only the ST connectors (optimise them with the student); the aggregation
    (beta) and the margins are buffers. The teacher and student are not kept.

    Dtypes are reconciled: under bf16/fp16 autocast, or with a teacher run outside autocast, the
    student's mapped feature and the teacher's maps meet in the wider of their two dtypes. It runs
    under ``torch.compile(fullgraph=True)``. Under DistributedDataParallel wrap it as you wrap the
    student (its connectors are trained parameters), e.g. ``DDP(loss)``.

    Args:
        teacher: the trained network (a TappedNetwork, a torchvision-style ResNet, or a module
            wrapped in ``dfa_ext.models.HookedNetwork``); read once for the group layout and its
            BN margins.
        student: the network being trained (same kinds); read once for its group layout.
        aggregation: "ofd" (each group's last teacher layer), "uniform" (alpha = 1/K), "random"
            (beta ~ N(0, random_std^2), seeded by ``aggregation_seed``), a :class:`SearchResult` or
            the path of a ``search.json`` (the searched alphas: DFA), K weights used in every group
            (e.g. ``(0, 0.3, 0.7)``), or one such list per group.
        input_shape: (C, H, W) of the images (the groups are paired by one probe forward pass).
        gamma_fd: weight of the whole feature loss (method.md: 1e-3 on the per-sample sum).
        stage_weights: per group, its weight w_i (default OFD's 1/2^(G-1-i); 0 skips a group).
        margins: "bn" (OFD's estimate from the BN before each teacher feature) or, per group, the
            [K, C] margins of all its layers (e.g. ``dfa_ext.margins.empirical_margins``).
        margin_place: "layer" (margin ReLU on each layer before mixing) or "aggregate" (once on
            the mixture, with the alpha-weighted mean of the layers' margins: the paper's F_t(A)).
        kernels: "fused" (the package's kernels) or "reference" (pure PyTorch, same formula).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, aggregation: Aggregation = "ofd", *,
                 input_shape: tuple[int, int, int], gamma_fd: float = 1e-3, stage_weights: Sequence[float] = (),
                 margins: str | Sequence[Tensor] = "bn", margin_place: str = "layer", kernels: str = "fused",
                 random_std: float = 1.0, aggregation_seed: int = 0) -> None:
        super().__init__()
        teacher, student = as_tapped(teacher), as_tapped(student)
        input_shape = tuple(input_shape)
        pairs = pair_networks(teacher, student, input_shape)
        targets = _targets(aggregation, pairs, teacher, input_shape, random_std, aggregation_seed)
        if isinstance(margins, str):
            if margins != "bn":
                raise ConfigError(f"margins must be 'bn' or one [K, C] tensor per group, got {margins!r}")
            margins = teacher_margins(teacher, input_shape)
        if margin_place not in MARGIN_PLACES:
            raise ConfigError(f"margin_place must be one of {MARGIN_PLACES}, got {margin_place!r}")
        if margin_place == "aggregate":
            margins = aggregate_margins(targets, margins)
        self._setup(pairs, targets, margins, resolve_stage_weights(len(pairs), tuple(stage_weights)), gamma_fd=gamma_fd,
                    kernels=kernels, aggregate_first=margin_place == "aggregate")

    @classmethod
    def from_targets(cls, pairs: Sequence[GroupPair], targets: Sequence[GroupTarget], margins: Sequence[Tensor],
                     weights: Sequence[float], *, gamma_fd: float = 1e-3, kernels: str = "fused",
                     aggregate_first: bool = False) -> "DFALoss":
        """The loss from its resolved parts (the trainers' path): per group its pair, target, stage
        weight and margins, [K_i, C_i] of every layer or, with ``aggregate_first``, [1, C_i]."""
        loss = cls.__new__(cls)
        nn.Module.__init__(loss)
        loss._setup(pairs, targets, margins, weights, gamma_fd=gamma_fd, kernels=kernels,
                    aggregate_first=aggregate_first)
        return loss

    def _setup(self, pairs: Sequence[GroupPair], targets: Sequence[GroupTarget], margins: Sequence[Tensor],
               weights: Sequence[float], *, gamma_fd: float, kernels: str, aggregate_first: bool) -> None:
        if not len(pairs) == len(targets) == len(margins) == len(weights):
            raise ConfigError(f"pairs, targets, margins and stage weights need one entry per group, got "
                              f"{len(pairs)}, {len(targets)}, {len(margins)} and {len(weights)}")
        if not gamma_fd >= 0:
            raise ConfigError(f"gamma_fd must be >= 0, got {gamma_fd}")
        self.st_connectors = nn.ModuleList(pair.make_st_connector() for pair in pairs)
        self.layers = [tuple(t.layers) for t in targets]
        for i, (target, group_margins) in enumerate(zip(targets, margins)):
            if not aggregate_first:
                group_margins = group_margins[list(target.layers)]
            elif group_margins.shape[0] != 1:
                raise ConfigError(f"aggregate-place margins are [1, C] per group; group {i} has "
                                  f"{list(group_margins.shape)}")
            self.register_buffer(f"beta_{i}", target.beta.detach().float().clone())
            self.register_buffer(f"margins_{i}", group_margins.detach().float().clone())
        self.weights, self.gamma_fd, self.kernels = [float(w) for w in weights], float(gamma_fd), kernels
        self.aggregate_first = aggregate_first
        self.has_unused_parameters = any(w == 0 for w in self.weights)  # skipped groups' connectors
        dfa_ops(kernels)  # an unknown name fails here, not at the first step

    @property
    def num_groups(self) -> int:
        return len(self.layers)

    def beta(self, group: int) -> Tensor:
        """beta_i of group ``group``: [len(layers_i)] float32 (alpha_i = softmax(beta_i))."""
        return getattr(self, f"beta_{group}")

    def margins(self, group: int) -> Tensor:
        """The margins of group ``group``: [len(layers_i), C] per layer, or [1, C] aggregate-place."""
        return getattr(self, f"margins_{group}")

    def aggregation(self) -> list[dict]:
        """Per group, the teacher layers (indices) and the beta it distils towards (JSON-friendly)."""
        return [{"layers": list(layers), "beta": self.beta(i).tolist()} for i, layers in enumerate(self.layers)]

    def forward(self, student_features: Features, teacher_features: Features, *,
                per_group: bool = False) -> Tensor | tuple[Tensor, tuple[Tensor, ...]]:
        """The feature loss, a 0-dim tensor (gradients reach the student and the connectors).

        Args:
            student_features: ``student(images, features=True)`` (or its ``.groups``).
            teacher_features: ``teacher(images, features=True)`` on the same images, usually under
                ``torch.no_grad()``.
            per_group: also return each group's term gamma_fd * w_i * mean_b partial_l2 (0 for a
                skipped group); they sum to the loss up to rounding.
        """
        ops = dfa_ops(self.kernels)
        student_groups = _groups(student_features, "student_features")
        teacher_groups = _groups(teacher_features, "teacher_features")
        if len(student_groups) != self.num_groups or len(teacher_groups) != self.num_groups:
            raise ModelError(f"this loss pairs {self.num_groups} layer groups; got {len(student_groups)} student and "
                             f"{len(teacher_groups)} teacher groups (features of other networks?)")
        total: Tensor | None = None
        terms: list[Tensor] = []
        for i, weight in enumerate(self.weights):
            if weight == 0:
                terms.append(torch.zeros((), device=self.beta(i).device))
                continue
            mapped = self.st_connectors[i](student_groups[i].last)
            maps = [teacher_groups[i].layers[j] for j in self.layers[i]]
            dtype = torch.promote_types(mapped.dtype, maps[0].dtype)  # autocast: bf16 student, fp32 teacher
            mapped, maps = mapped.to(dtype), [m.to(dtype) for m in maps]
            beta = self.beta(i)
            if self.aggregate_first and len(maps) > 1:  # one map: both places are the same
                maps, beta = [ops.aggregate(maps, beta)], beta.new_zeros(1)
            per_sample = ops.partial_l2(mapped, maps, beta, self.margins(i))
            term = weight * at_least_float32(per_sample).mean()
            total = term if total is None else total + term
            terms.append(self.gamma_fd * term)
        if total is None:
            total = torch.zeros((), device=self.beta(0).device)
        loss = self.gamma_fd * total
        return (loss, tuple(terms)) if per_group else loss


def _targets(aggregation: Aggregation, pairs: Sequence[GroupPair], teacher: nn.Module,
             input_shape: tuple[int, int, int], random_std: float, aggregation_seed: int) -> list[GroupTarget]:
    """The (layers, beta) of every group that ``aggregation`` names (see :class:`DFALoss`)."""
    if isinstance(aggregation, str) and aggregation in ("ofd", "uniform", "random"):
        return group_targets(aggregation, pairs, random_std=random_std, aggregation_seed=aggregation_seed)
    if isinstance(aggregation, SearchResult):
        check_teacher(aggregation, teacher, input_shape, "the search result")
        return group_targets("dfa", pairs, search=aggregation)
    if isinstance(aggregation, (str, os.PathLike)):
        if not str(aggregation).endswith(".json") and not os.path.exists(aggregation):
            raise ConfigError(f"aggregation must be 'ofd', 'uniform', 'random', a SearchResult, a search.json path "
                              f"or alpha weights, got {aggregation!r}")
        search = load_search_result(aggregation, teacher=teacher, input_shape=input_shape)
        return group_targets("dfa", pairs, search=search)
    rows = list(aggregation)
    if rows and all(isinstance(r, (int, float)) for r in rows):  # one alpha for every group
        return group_targets("fixed", pairs, alpha=tuple(float(a) for a in rows))
    if len(rows) != len(pairs):
        raise ConfigError(f"aggregation gives {len(rows)} alpha lists; the teacher has {len(pairs)} layer groups")
    return [group_targets("fixed", [pair], alpha=tuple(row))[0] for pair, row in zip(pairs, rows)]
