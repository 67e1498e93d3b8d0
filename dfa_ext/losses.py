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
