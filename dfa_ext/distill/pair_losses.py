"""The feature baselines FitNet, AT and SP on the package's group pairing, as loss modules.

Every method pairs teacher group i's last layer T_i (the teacher's group output) with the
student's group-i output S_i, group by group (``dfa_ext.models.pair_networks``: the groups share
their spatial size), and sums a per-pair term with per-group weights w_i (``--stage-weights``;
a zero weight skips the group) under one coefficient:

    fitnet:  hint_weight * sum_i w_i * mean (ST_i(S_i) - T_i)^2             (pre-activation S_i, T_i)
    at:      beta        * sum_i w_i * mean_{b,hw} (a(relu S_i) - a(relu T_i))^2
    sp:      gamma       * sum_i w_i * ||G~(relu S_i) - G~(relu T_i)||_F^2 / B^2

with the pure per-pair formulas in :mod:`dfa_ext.feature_losses`. Which features, and why:

- FitNet regresses the teacher's pre-activation group output (the T_i that OFD's partial L2 uses,
  without OFD's margin) through the ST connector (1x1 conv + BN, student to teacher channels): the
  FitNets regressor r(.) (Romero et al. 2015 use a conv regressor; RepDistiller's ConvReg is conv +
  BN + ReLU on post-ReLU features; without the ReLU, the connector's output can reach the negative
  pre-activation values it regresses).
- AT and SP compare post-activation maps: each network's ``group_input_activation`` (ReLU) of its
  group output, i.e. the tensor the next group receives, as the reference code does (the
  RepDistiller and mdistiller features are post-ReLU block outputs). They need no connector: the
  attention map averages out the channels and the similarity matrix is [B, B].

The default group weights follow each method's reference implementation (:func:`group_weights`).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..feature_losses import attention_loss, hint_loss, similarity_loss
from ..losses import at_least_float32
from ..models import GroupPair, TapOutput
from .targets import stage_weights


def group_weights(method: str, num_groups: int, given: Sequence[float] = ()) -> list[float]:
    """Per group, the weight w_i of ``method``'s term: ``given`` (one per group), else the method's
    reference choice:

    - fitnet: the middle group (G-1)//2 only. FitNets guide one middle layer; RepDistiller's and
      mdistiller's default ``hint_layer = 2`` picks, among their [stem, group 1..3] features, the
      second group's output, which is (G-1)//2 for G = 3 (and 4) groups.
    - at: every group, weight 1 (the AT code and mdistiller sum the attention loss of every group
      output, beside the stem: ``feats[1:]``).
    - sp: the last group only (Tung & Mori apply SP at the last group's output; RepDistiller's
      ``feat[-2]`` and mdistiller's ``feats[-1]`` are it).
    """
    if given:
        return stage_weights(num_groups, given)
    if method == "fitnet":
        return [1.0 if i == (num_groups - 1) // 2 else 0.0 for i in range(num_groups)]
    if method == "at":
        return [1.0] * num_groups
    if method == "sp":
        return [1.0 if i == num_groups - 1 else 0.0 for i in range(num_groups)]
    raise ConfigError(f"{method!r} is not one of the pair methods fitnet, at, sp")


class GroupPairLoss(nn.Module):
    """Base: ``coefficient * sum_i w_i * term(student feature i, teacher feature i)`` over the groups
    with w_i > 0. Subclasses say which feature of each side the term reads (:meth:`student_side`,
    :meth:`teacher_side`) and the per-pair formula (``term``).

    ``loss(student_features, teacher_features)`` takes what ``net(images, features=True)`` returns
    (a :class:`~dfa_ext.models.TapOutput`) and returns a 0-dim tensor (float32, or float64 when the
    features are); gradients reach the student and the connectors, never the teacher.
    """

    def __init__(self, pairs: Sequence[GroupPair], weights: Sequence[float], coefficient: float) -> None:
        super().__init__()
        if len(weights) != len(pairs):
            raise ConfigError(f"{type(self).__name__} needs one weight per group pair, got {len(weights)} for "
                              f"{len(pairs)} groups")
        if any(not w >= 0 for w in weights) or not coefficient >= 0:
            raise ConfigError(f"{type(self).__name__}: weights and coefficient must be >= 0, got {list(weights)} "
                              f"and {coefficient}")
        self.weights, self.coefficient = [float(w) for w in weights], float(coefficient)
        self.num_groups = len(pairs)

    def student_side(self, group: int, last: Tensor) -> Tensor:
        """What the term reads of the student's group ``group``, from its output ``last``."""
        return last

    def teacher_side(self, group: int, last: Tensor) -> Tensor:
        """What the term reads of the teacher's group ``group``, from its output ``last``."""
        return last

    def term(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The per-pair formula (one of :mod:`dfa_ext.feature_losses`), a 0-dim tensor."""
        raise NotImplementedError

    def forward(self, student_features: TapOutput, teacher_features: TapOutput) -> Tensor:
        student_groups, teacher_groups = student_features.groups, teacher_features.groups
        if len(student_groups) != self.num_groups or len(teacher_groups) != self.num_groups:
            raise ModelError(f"this loss pairs {self.num_groups} layer groups; got {len(student_groups)} student and "
                             f"{len(teacher_groups)} teacher groups (features of other networks?)")
        total: Tensor | None = None
        for i, weight in enumerate(self.weights):
            if weight == 0:
                continue
            term = weight * at_least_float32(self.term(self.student_side(i, student_groups[i].last),
                                                       self.teacher_side(i, teacher_groups[i].last)))
            total = term if total is None else total + term
        if total is None:  # every weight 0: no feature loss (but a tensor the loop can log)
            return torch.zeros((), device=student_features.logits.device)
        return self.coefficient * total


class HintLoss(GroupPairLoss):
    """FitNet: ``hint_weight * sum_i w_i * mean (ST_i(S_i) - T_i)^2``; the ST connectors (the
    regressors, trained with the student) exist for the weighted groups only, so none idles."""

    def __init__(self, pairs: Sequence[GroupPair], weights: Sequence[float], hint_weight: float = 100.0) -> None:
        super().__init__(pairs, weights, hint_weight)
        self.connectors = nn.ModuleDict({str(p.index): p.make_st_connector()
                                         for p, w in zip(pairs, self.weights) if w > 0})

    def term(self, student: Tensor, teacher: Tensor) -> Tensor:
        return hint_loss(student, teacher)

    def student_side(self, group: int, last: Tensor) -> Tensor:
        return self.connectors[str(group)](last)


class _ActivatedPairLoss(GroupPairLoss):
    """A term on post-activation maps: each network's ``group_input_activation`` (ReLU, a
    stateless module copied here) of its group output."""

    def __init__(self, pairs: Sequence[GroupPair], weights: Sequence[float], coefficient: float, *,
                 student_activation: nn.Module, teacher_activation: nn.Module) -> None:
        super().__init__(pairs, weights, coefficient)
        self.student_activation = copy.deepcopy(student_activation)
        self.teacher_activation = copy.deepcopy(teacher_activation)

    def student_side(self, group: int, last: Tensor) -> Tensor:
        return self.student_activation(last)

    def teacher_side(self, group: int, last: Tensor) -> Tensor:
        return self.teacher_activation(last)


class AttentionLoss(_ActivatedPairLoss):
    """AT: ``beta * sum_i w_i * attention_loss(relu S_i, relu T_i, p)`` (as the AT code, RepDistiller
    and mdistiller weight it; the paper's eq. 2 writes beta / 2, see :class:`ATDistiller`)."""

    def __init__(self, pairs: Sequence[GroupPair], weights: Sequence[float], beta: float = 1e3, p: float = 2.0, *,
                 student_activation: nn.Module, teacher_activation: nn.Module) -> None:
        super().__init__(pairs, weights, beta, student_activation=student_activation,
                         teacher_activation=teacher_activation)
        if not p > 0:
            raise ConfigError(f"at_p must be > 0, got {p}")
        self.p = float(p)

    def term(self, student: Tensor, teacher: Tensor) -> Tensor:
        return attention_loss(student, teacher, self.p)


class SimilarityLoss(_ActivatedPairLoss):
    """SP: ``gamma * sum_i w_i * similarity_loss(relu S_i, relu T_i)`` (paper eq. 4)."""

    def __init__(self, pairs: Sequence[GroupPair], weights: Sequence[float], gamma: float = 3e3, *,
                 student_activation: nn.Module, teacher_activation: nn.Module) -> None:
        super().__init__(pairs, weights, gamma, student_activation=student_activation,
                         teacher_activation=teacher_activation)

    def term(self, student: Tensor, teacher: Tensor) -> Tensor:
        return similarity_loss(student, teacher)
