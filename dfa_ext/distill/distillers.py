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
from ..losses import cross_entropy, dkd_loss, hinton_losses
from ..models import GroupPair, TappedNetwork
from ..training.checkpoint import model_record
from ..training.loop import TrainingTask
from ..training.teacher import freeze
from .loss import DFALoss
from .pair_losses import AttentionLoss, HintLoss, SimilarityLoss
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


class DKDDistiller(Distiller):
    """Decoupled KD (Zhao et al., CVPR 2022; mdistiller's ``DKD``): CE plus the DKD term, ramped in
    linearly over the first epochs:

        loss = CE + min(e / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD)   (epochs e = 1, 2, ...)

    (:func:`dfa_ext.losses.dkd_loss`). Defaults, from the paper and mdistiller's CIFAR-100 config
    (``CFG.DKD``: CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20): alpha 1, beta 8, T 4, 20 epochs of
    warm-up. mdistiller tunes beta per pair (its res56->res20 and res110->res32 configs use 2, the
    res32x4->res8x4 one 8), so beta is the option to try first in a new regime. The warm-up factor
    is a buffer the loop sets each epoch (:meth:`set_epoch`), not a Python number, so a compiled
    step does not recompile as it changes.
    """

    def __init__(self, student: TappedNetwork, teacher: nn.Module, student_record: dict[str, Any], *,
                 alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 20) -> None:
        super().__init__(student, teacher, student_record)
        self.alpha, self.beta, self.temperature, self.warmup_epochs = alpha, beta, temperature, warmup_epochs
        # Not in the checkpoint: the loop sets it from the epoch before every epoch, resumed runs included.
        self.register_buffer("warmup", torch.tensor(self.warmup_factor(0)), persistent=False)

    def warmup_factor(self, epoch: int) -> float:
        """min((epoch + 1) / warmup_epochs, 1) for the 0-based ``epoch`` (mdistiller counts from 1)."""
        return 1.0 if self.warmup_epochs <= 0 else min((epoch + 1) / self.warmup_epochs, 1.0)

    def set_epoch(self, epoch: int) -> None:
        self.warmup.fill_(self.warmup_factor(epoch))

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = self.classifier(images)
        dkd = dkd_loss(logits, teacher_logits, labels, alpha=self.alpha, beta=self.beta, temperature=self.temperature)
        return logits, {"ce": cross_entropy(logits, labels), "dkd": self.warmup * dkd}


class FeatureLossDistiller(Distiller):
    """Cross-entropy (or, with ``kd``, Hinton's (1 - w) CE + w T^2 KL, the teacher's logits coming
    with its features at no extra cost) plus one loss module on both networks' group features,
    logged under ``term_name``. The methods below differ only in that module and its name.

    Args:
        feature_loss: ``loss(student_out, teacher_out) -> 0-dim tensor`` on what ``net(images,
            features=True)`` returns; its parameters (connectors) train with the student.
        kd: (temperature, weight) of the KD term, or None for plain CE.
    """

    term_name = "fd"

    def __init__(self, student: TappedNetwork, teacher: nn.Module, student_record: dict[str, Any],
                 feature_loss: nn.Module, *, kd: tuple[float, float] | None = None) -> None:
        super().__init__(student, teacher, student_record)
        self.feature_loss, self.kd = feature_loss, kd
        self.has_unused_parameters = bool(getattr(feature_loss, "has_unused_parameters", False))

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_out = self.teacher(images, features=True)
        out = self.classifier(images, features=True)
        if self.kd is None:
            losses = {"ce": cross_entropy(out.logits, labels)}
        else:
            temperature, kd_weight = self.kd
            losses = hinton_losses(out.logits, teacher_out.logits, labels, temperature=temperature, weight=kd_weight)
        return out.logits, {**losses, self.term_name: self.feature_loss(out, teacher_out)}


class FeatureDistiller(FeatureLossDistiller):
    """The partial-L2 feature loss of a :class:`DFALoss` (method.md section 6), which owns the ST
    connectors, the aggregation and the margins:

        loss = CE + gamma_fd * sum_i w_i * mean_b partial_l2(ST_i(S_i), T_i[layers_i], beta_i, margins_i)

    OFD, uniform, random and DFA differ only in ``targets``; ``kd`` as :class:`FeatureLossDistiller`.

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
        feature_loss = DFALoss.from_targets(pairs, targets, margins, weights, gamma_fd=gamma_fd, kernels=kernels,
                                            aggregate_first=aggregate_first)
        super().__init__(student, teacher, student_record, feature_loss, kd=kd)

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


class FitNetDistiller(FeatureLossDistiller):
    """FitNets (Romero et al., ICLR 2015), trained in one stage as RepDistiller and mdistiller do:

        loss = CE + hint_weight * sum_i w_i * mean (ST_i(S_i) - T_i)^2      (:class:`HintLoss`)

    on the package's group pairing: T_i is teacher group i's last layer (pre-activation), S_i the
    student's group-i output, ST_i the ST connector (1x1 conv + BN) as the regressor r(.).

    Defaults and choices (source):

    - hint weight 100 on the element-wise mean: RepDistiller ``scripts/run_cifar_distill.sh``
      (``--distill hint -b 100``) and mdistiller ``CFG.FITNET.LOSS.FEAT_WEIGHT = 100``.
    - the hint group: the middle one, (G-1)//2 (the paper's middle "hint" layer; RepDistiller's and
      mdistiller's ``hint_layer = 2``); ``--stage-weights 1 1 1`` hints every group.
    - joint, not two-stage: the paper first trains the student's lower half on the hint alone, then
      the whole student with KD. Joint training is what the implementations behind the published
      CIFAR-100 FitNet rows do (RepDistiller, mdistiller; CRD paper Table 1), it keeps every method
      on one loop with the same epochs and the same fresh student (a hint-only first stage would be
      extra training the other methods do not get), and ``fitnet+kd`` adds the paper's second-stage
      KD term throughout.
    """

    term_name = "hint"

    def __init__(self, student: TappedNetwork, teacher: nn.Module, student_record: dict[str, Any], *,
                 pairs: Sequence[GroupPair], weights: Sequence[float], hint_weight: float = 100.0,
                 kd: tuple[float, float] | None = None) -> None:
        super().__init__(student, teacher, student_record, HintLoss(pairs, weights, hint_weight), kd=kd)


class ATDistiller(FeatureLossDistiller):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based:

        loss = CE + beta * sum_i w_i * mean_{b,hw} (a_S,i - a_T,i)^2      (:class:`AttentionLoss`)

    with a = vec(mean_c |f|^p) / ||vec(mean_c |f|^p)||_2 per sample, f the post-activation (ReLU)
    output of each group: teacher group i's last layer and the student's group i, every group with
    weight 1.

    Defaults (source): beta = 1e3 and p = 2 (the paper, section 4.1). The weighting is the code's:
    the paper's eq. 2 writes beta / 2 before the sum, but its code (szagoruyko/attention-transfer
    ``cifar.py``: ``opt.beta * sum(loss_groups)`` over ``at_loss`` = this mean), RepDistiller
    (``--distill attention -b 1000``) and mdistiller (``CFG.AT.LOSS.FEAT_WEIGHT = 1000``) all
    multiply the sum of the per-group means by 1000, and their published numbers come from that;
    ``--at-beta 500`` is the eq. 2 reading.
    """

    term_name = "at"

    def __init__(self, student: TappedNetwork, teacher: nn.Module, student_record: dict[str, Any], *,
                 pairs: Sequence[GroupPair], weights: Sequence[float], beta: float = 1e3, p: float = 2.0,
                 kd: tuple[float, float] | None = None) -> None:
        loss = AttentionLoss(pairs, weights, beta, p, student_activation=student.group_input_activation,
                             teacher_activation=teacher.group_input_activation)
        super().__init__(student, teacher, student_record, loss, kd=kd)


class SPDistiller(FeatureLossDistiller):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019):

        loss = CE + gamma * sum_i w_i * ||G~_S,i - G~_T,i||_F^2 / B^2      (:class:`SimilarityLoss`)

    with G~ = row-normalised F F^T of the [B, C*H*W] post-activation output of each group (teacher
    group i's last layer, the student's group i), on the last group only.

    Defaults (source): gamma = 3000 (the paper's CIFAR-10 value; RepDistiller ``-b 3000``,
    mdistiller ``CFG.SP.LOSS.FEAT_WEIGHT = 3000``); the last group (RepDistiller ``feat[-2]``,
    mdistiller ``feats[-1]``).
    """

    term_name = "sp"

    def __init__(self, student: TappedNetwork, teacher: nn.Module, student_record: dict[str, Any], *,
                 pairs: Sequence[GroupPair], weights: Sequence[float], gamma: float = 3e3,
                 kd: tuple[float, float] | None = None) -> None:
        loss = SimilarityLoss(pairs, weights, gamma, student_activation=student.group_input_activation,
                              teacher_activation=teacher.group_input_activation)
        super().__init__(student, teacher, student_record, loss, kd=kd)
