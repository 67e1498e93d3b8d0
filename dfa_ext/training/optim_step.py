"""One optimiser step from a loss, with loss scaling (fp16) and gradient clipping: the same in
every trainer."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   parameters: Iterable[nn.Parameter], grad_clip: float | None) -> None:
    """zero_grad, backward, optional clip of the (unscaled) gradient norm, step, scaler update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(list(parameters), grad_clip)
    scaler.step(optimizer)
    scaler.update()
