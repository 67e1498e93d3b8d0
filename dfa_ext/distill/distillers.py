"""Distillers: what one training step of each stage-2 method computes.

Each :class:`Distiller` owns the student (``classifier``), the frozen teacher and whatever extra
modules its method trains (connectors), and returns the student's logits with a dict of named
losses; :func:`dfa_ext.training.loop.fit` sums and optimises them, so the loop is written once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..losses import cross_entropy, hinton_losses
from ..models import GroupPair, TappedNetwork
from ..training.checkpoint import model_record
from ..training.loop import TrainingTask
from ..training.teacher import freeze
from .loss import DFALoss
from .targets import GroupTarget


class Distiller(TrainingTask):
    """Base: a student trained against a frozen teacher (None for the vanilla baseline).

    Args:
        student: the network being trained (its logits are evaluated).
        teacher: a trained network; frozen here and kept in eval mode whatever ``train()`` says.
        student_record: name, num_classes, in_channels and kwargs that rebuild the student.
    """

    def __init__(self, student: TappedNetwork, teacher: nn.Module | None, student_record: dict[str, Any]) -> None:
        super().__init__()
        self.classifier = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self._record = student_record

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN running statistics of the teacher never change
        return self

    def frozen_modules(self) -> tuple[nn.Module, ...]:
        return (self.teacher,) if self.teacher is not None else ()

    def _own_state(self) -> dict[str, Tensor]:
        """Everything but the teacher and the student (connectors, aggregation buffers)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                if not k.startswith(("teacher.", "classifier."))}

    def export_state(self) -> dict:
        return {"model": model_record(self.classifier, **self._record), "distiller": self._own_state()}

    def import_state(self, state: dict) -> None:
        try:
            self.classifier.load_state_dict(state["model"]["state_dict"])
            missing, unexpected = self.load_state_dict(state["distiller"], strict=False)
        except (KeyError, RuntimeError) as error:
            raise CheckpointError(f"the checkpoint does not fit this run: {str(error).splitlines()[0][:300]}") from None
        missing = [k for k in missing if not k.startswith(("teacher.", "classifier."))]
        if missing or unexpected:
            raise CheckpointError(f"the checkpoint does not fit this run: missing {missing}, unexpected {unexpected}")


class VanillaDistiller(Distiller):
    """The student alone: cross-entropy only (the baseline every method must beat)."""

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.classifier(images)
        return logits, {"ce": cross_entropy(logits, labels)}


class KDDistiller(Distiller):
    """Hinton et al. (2015): (1 - w) * CE + w * T^2 * KL(teacher || student) on softened logits."""

    def __init__(self, student: TappedNetwork, teacher: nn.Module, student_record: dict[str, Any], *,
                 temperature: float = 4.0, weight: float = 0.9) -> None:
        super().__init__(student, teacher, student_record)
        self.temperature, self.weight = temperature, weight

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = self.classifier(images)
        return logits, hinton_losses(logits, teacher_logits, labels, temperature=self.temperature, weight=self.weight)


class FeatureDistiller(Distiller):
    """Cross-entropy (or Hinton's KD terms, with ``kd``) plus the feature loss of a :class:`DFALoss`
    (method.md section 6), which owns the ST connectors, the aggregation and the margins:

        loss = CE + gamma_fd * sum_i w_i * mean_b partial_l2(ST_i(S_i), T_i[layers_i], beta_i, margins_i)

    OFD, uniform, random and DFA differ only in ``targets``. With ``kd`` the CE term becomes
    Hinton's (1 - w) CE + w T^2 KL (the teacher's logits come with its features, at no extra cost).

    Args:
        pairs: the teacher/student group pairing.
        targets: one :class:`GroupTarget` per group (layers and beta).
        margins: per group, the teacher's margins [K_i, C_i] of all its K_i layers, or with
            ``aggregate_first`` the [1, C_i] margins of the group's aggregation.
        weights: per group, its stage weight w_i (groups with weight 0 are skipped).
        kd: (temperature, weight) of the KD term, or None for plain CE.
    """

    def __init__(self, student: TappedNetwork, teacher: nn.Module, student_record: dict[str, Any], *,
                 pairs: Sequence[GroupPair], targets: Sequence[GroupTarget], margins: Sequence[Tensor],
                 weights: Sequence[float], gamma_fd: float = 1e-3, kernels: str = "fused",
                 aggregate_first: bool = False, kd: tuple[float, float] | None = None) -> None:
        super().__init__(student, teacher, student_record)
        self.feature_loss = DFALoss.from_targets(pairs, targets, margins, weights, gamma_fd=gamma_fd, kernels=kernels,
                                                 aggregate_first=aggregate_first)
        self.kd = kd
        self.has_unused_parameters = self.feature_loss.has_unused_parameters

    @property
    def st_connectors(self) -> nn.ModuleList:
        return self.feature_loss.st_connectors

    def aggregation(self) -> list[dict]:
        """Per group, the teacher layers (indices) and the beta it distils towards (JSON-friendly)."""
        return self.feature_loss.aggregation()

    def import_state(self, state: dict) -> None:
        # Checkpoints written before the loss became a module hold its entries without the prefix.
        own = state.get("distiller")
        if isinstance(own, dict) and own and not any(k.startswith("feature_loss.") for k in own):
            state = {**state, "distiller": {f"feature_loss.{k}": v for k, v in own.items()}}
        super().import_state(state)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_out = self.teacher(images, features=True)
        out = self.classifier(images, features=True)
        if self.kd is None:
            losses = {"ce": cross_entropy(out.logits, labels)}
        else:
            temperature, kd_weight = self.kd
            losses = hinton_losses(out.logits, teacher_out.logits, labels, temperature=temperature, weight=kd_weight)
        return out.logits, {**losses, "fd": self.feature_loss(out, teacher_out)}
