"""What stage 1 trains (the weights w) and the losses it trains and searches with.

``SearchNetwork`` holds the student and, per layer group, the ST connector (student -> teacher
channels, 1x1 conv + BN) and the TS connector (teacher -> student channels, 1x1 conv + BN + the
student's group-input activation). Its forward returns the named losses of one group for given
teacher features and beta, so the architecture step can evaluate it at other weights
(``torch.func.functional_call``) and DistributedDataParallel can wrap it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..kernels_switch import dfa_ops
from ..losses import cross_entropy
from ..models import GroupPair, TappedNetwork


class SearchNetwork(nn.Module):
    """Student + connectors for the objective of method.md section 5.

    Args:
        student: a tapped network (fresh or warm-started).
        pairs: the teacher/student group pairing (``dfa_ext.models.pair_networks``).
        kernels: "fused" (``dfa_ext.ops``) or "reference" (``dfa_ext.reference``).
        objective: "bridge", "st", "ts" or "distill" (see :class:`~dfa_ext.search.config.SearchConfig`).
        margins: per group, the teacher's [K, C] OFD margins (used by "distill", and by the TS path
            when ``ts_margins``).
    """

    def __init__(self, student: TappedNetwork, pairs: Sequence[GroupPair], *, kernels: str = "fused",
                 objective: str = "bridge", gamma_st: float = 1.0, gamma_ts: float = 1.0,
                 gamma_fd: float = 1e-3, margins: Sequence[Tensor] | None = None,
                 ts_margins: bool = False) -> None:
        super().__init__()
        self.student = student
        self.st_connectors = nn.ModuleList(pair.make_st_connector() for pair in pairs)
        self.ts_connectors = nn.ModuleList(pair.make_ts_connector(student.group_input_activation)
                                           for pair in pairs)
        for i, m in enumerate(margins or ()):
            self.register_buffer(f"margins_{i}", m.detach().clone(), persistent=False)
        self.kernels, self.objective, self.ts_margins = kernels, objective, ts_margins
        dfa_ops(kernels)  # an unknown name fails here, not at the first step
        self.gamma_st, self.gamma_ts, self.gamma_fd = gamma_st, gamma_ts, gamma_fd

    def margins(self, group: int) -> Tensor:
        return getattr(self, f"margins_{group}")

    def forward(self, images: Tensor, labels: Tensor, teacher_layers: Sequence[Tensor], beta: Tensor,
                group: int, with_ce: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Losses of group ``group`` on one batch.

        Args:
            images: [B, C_in, H, W]; labels: [B] int64.
            teacher_layers: the K teacher features of the group, each [B, C_t, h, w] (no grad).
            beta: [K] architecture parameters of the group.
            with_ce: add the student's own cross-entropy (the weight objective L_train); without
                it the losses are the beta objective L_val.
        Returns:
            the student's logits [B, classes] and the named scalar losses (their sum is the loss).
        """
        ops = dfa_ops(self.kernels)
        out = self.student(images, features=True)
        losses: dict[str, Tensor] = {}
        if with_ce:
            losses["ce"] = cross_entropy(out.logits, labels)
        student_feature = out.groups[group].last
        if self.objective in ("bridge", "st"):
            mapped = self.st_connectors[group](student_feature)
            losses["st"] = self.gamma_st * ops.bridge_st_loss(mapped, teacher_layers, beta).mean()
        if self.objective in ("bridge", "ts"):
            margins = self.margins(group) if self.ts_margins else None
            aggregation = ops.aggregate(teacher_layers, beta, margins)
            h = self.ts_connectors[group](aggregation)
            logits = self.student.forward_from(group + 1, h)
            losses["ts"] = self.gamma_ts * cross_entropy(logits, labels)
        if self.objective == "distill":
            mapped = self.st_connectors[group](student_feature)
            fd = ops.partial_l2(mapped, teacher_layers, beta, self.margins(group))
            losses["fd"] = self.gamma_fd * fd.mean()
        return out.logits, losses


@torch.no_grad()
def teacher_features(teacher: TappedNetwork, images: Tensor) -> list[list[Tensor]]:
    """The frozen teacher's pre-ReLU features: per group, its K maps [B, C_t, h, w]."""
    return [list(g.layers) for g in teacher(images, features=True).groups]
