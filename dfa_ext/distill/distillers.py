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
from ..kernels_switch import dfa_ops
from ..losses import cross_entropy, hinton_losses
from ..models import GroupPair, TappedNetwork
from ..training.checkpoint import model_record
from ..training.loop import TrainingTask
from ..training.teacher import freeze
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
    """Feature distillation towards a per-group aggregation of the teacher's layers (method.md s. 6):

        loss = CE + gamma_fd * sum_i w_i * mean_b partial_l2(ST_i(S_i), T_i[layers_i], beta_i, margins_i)

    OFD, uniform, random and DFA differ only in ``targets``. ST_i is OFD's connector (1x1 conv + BN,
    student to teacher channels); margins are the teacher's per-layer OFD margins [K, C]. With
    ``aggregate_first`` the margin ReLU acts once on the aggregation sum_j alpha_j T_j (the paper's
    F_t(A)) with margins [1, C] of the aggregated feature. With ``kd`` the CE term becomes Hinton's
    (1 - w) CE + w T^2 KL (the teacher's logits come with its features, at no extra cost).

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
        if not len(pairs) == len(targets) == len(margins) == len(weights):
            raise ValueError("pairs, targets, margins and weights need one entry per group")
        self.st_connectors = nn.ModuleList(pair.make_st_connector() for pair in pairs)
        self.layers = [t.layers for t in targets]
        for i, (target, group_margins) in enumerate(zip(targets, margins)):
            if not aggregate_first:
                group_margins = group_margins[list(target.layers)]
            elif group_margins.shape[0] != 1:
                raise ValueError(f"aggregate_first needs [1, C] margins per group; group {i} has {list(group_margins.shape)}")
            self.register_buffer(f"beta_{i}", target.beta.detach().float().clone())
            self.register_buffer(f"margins_{i}", group_margins.detach().float().clone())
        self.weights, self.gamma_fd, self.kernels = list(weights), gamma_fd, kernels
        self.aggregate_first, self.kd = aggregate_first, kd
        self.has_unused_parameters = any(w == 0 for w in self.weights)  # skipped groups' connectors
        dfa_ops(kernels)  # an unknown name fails here, not at the first step

    def aggregation(self) -> list[dict]:
        """Per group, the teacher layers (indices) and the beta it distils towards (JSON-friendly)."""
        return [{"layers": list(layers), "beta": getattr(self, f"beta_{i}").tolist()}
                for i, layers in enumerate(self.layers)]

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ops = dfa_ops(self.kernels)
        with torch.no_grad():
            teacher_out = self.teacher(images, features=True)
        out = self.classifier(images, features=True)
        feature_loss = out.logits.new_zeros((), dtype=torch.float32)
        for i, weight in enumerate(self.weights):
            if weight == 0:
                continue
            teacher_maps = [teacher_out.groups[i].layers[j] for j in self.layers[i]]
            beta = getattr(self, f"beta_{i}")
            if self.aggregate_first and len(teacher_maps) > 1:  # one map: both places are the same
                teacher_maps, beta = [ops.aggregate(teacher_maps, beta)], beta.new_zeros(1)
            mapped = self.st_connectors[i](out.groups[i].last)
            per_sample = ops.partial_l2(mapped, teacher_maps, beta, getattr(self, f"margins_{i}"))
            feature_loss = feature_loss + weight * per_sample.float().mean()
        if self.kd is None:
            losses = {"ce": cross_entropy(out.logits, labels)}
        else:
            temperature, kd_weight = self.kd
            losses = hinton_losses(out.logits, teacher_out.logits, labels, temperature=temperature, weight=kd_weight)
        return out.logits, {**losses, "fd": self.gamma_fd * feature_loss}
