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


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022, eq. 5-7; mdistiller's ``dkd_loss``): KD split into a
    target-class and a non-target-class term, reweighted,

        alpha * TCKD + beta * NCKD,   each T^2 * KL(teacher || student), mean over the batch

    TCKD compares the binary distributions b = [p_y, 1 - p_y] of the labelled class y; NCKD the
    distributions over the other C - 1 classes, renormalised among themselves (p_j / (1 - p_y),
    j != y); p = softmax(logits / T). Computed in log space (log(1 - p_y) as the log-sum-exp of
    the non-target logits minus that of all), so a confident teacher gives no log(0).

    Args:
        student_logits, teacher_logits: [B, C] with C >= 2 (the teacher's side is detached).
        labels: [B] class indices.
    """
    s = at_least_float32(student_logits) / temperature
    t = at_least_float32(teacher_logits).detach() / temperature
    batch, classes = s.shape
    if classes < 2 or t.shape != s.shape or labels.shape != (batch,):
        raise ValueError(f"dkd_loss needs [B, C >= 2] logits of one shape and [B] labels, got "
                         f"{list(s.shape)}, {list(t.shape)} and {list(labels.shape)}")
    target = F.one_hot(labels, classes).bool()

    def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 2] log b = (log p_y, log(1 - p_y)) and [B, C-1] log-softmax over the non-targets."""
        log_all = torch.logsumexp(z, dim=1, keepdim=True)
        others = z[~target].view(batch, classes - 1)
        log_others = torch.logsumexp(others, dim=1, keepdim=True)
        log_binary = torch.cat([z[target].view(batch, 1) - log_all, log_others - log_all], dim=1)
        return log_binary, others - log_others

    (s_binary, s_others), (t_binary, t_others) = split(s), split(t)

    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

    return temperature**2 * (alpha * kl(t_binary, s_binary) + beta * kl(t_others, s_others))
