"""Loss helpers shared by the trainers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """16-bit logits (autocast) are promoted so the loss is not rounded; float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, classes] against labels [B], in float32 or float64."""
    return F.cross_entropy(at_least_float32(logits), labels)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation loss: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch.

    The T^2 factor keeps the gradient's scale independent of T (Hinton et al., section 2).
    """
    log_student = F.log_softmax(at_least_float32(student_logits) / temperature, dim=1)
    log_teacher = F.log_softmax(at_least_float32(teacher_logits).detach() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def hinton_losses(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                  temperature: float, weight: float) -> dict[str, torch.Tensor]:
    """Hinton KD as named terms: ``ce`` = (1 - w) * CE and ``kd`` = w * T^2 * KL (see :func:`kd_loss`)."""
    return {"ce": (1.0 - weight) * cross_entropy(logits, labels),
            "kd": weight * kd_loss(logits, teacher_logits, temperature)}
