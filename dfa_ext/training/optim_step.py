"""One optimiser step from a loss, with loss scaling (fp16), gradient clipping and the divergence
guard's say: the same in every trainer."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .finite import gradient_norm


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   parameters: Iterable[nn.Parameter], grad_clip: float | None,
                   allow: Callable[[torch.Tensor | None], bool] | None = None) -> bool:
    """zero_grad, backward, optional clip of the (unscaled) gradient norm, step, scaler update.

    ``allow`` (a :meth:`FiniteGuard.observe` call) gets the gradient norm, or None under loss
    scaling (whose scaled gradients overflow on purpose); when it says no, the gradients are
    dropped and no parameter moves. Returns whether the update was applied (the scaler may still
    skip it).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    params = list(parameters)
    norm = None
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        norm = nn.utils.clip_grad_norm_(params, grad_clip)
    if allow is not None:
        if scaler.is_enabled():
            norm = None
        elif norm is None:
            norm = gradient_norm(params)
        if not allow(norm):
            optimizer.zero_grad(set_to_none=True)
            return False
    scaler.step(optimizer)
    scaler.update()
    return True
