"""BatchNorm over the global batch of all processes, on CPUs (gloo) as on GPUs (NCCL).

``torch.nn.SyncBatchNorm`` runs on GPUs only; this one all-reduces the per-channel sums with
the autograd-aware ``torch.distributed.nn.functional.all_reduce``, so a run on N processes
normalises (and back-propagates) exactly as one process on the whole batch would, up to float
rounding. With one process (or in eval mode) it is an ordinary BatchNorm. It subclasses the
BatchNorm classes, so state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _global_sum(x: Tensor) -> Tensor:
    """SUM over processes, differentiable: the backward sums the gradients of every process."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of functional collectives, not yet differentiable
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x)


class _GlobalBatchNorm:
    """Mixin over a ``_BatchNorm`` subclass: training-mode statistics of the global batch."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.tensor([x.numel() / x.shape[1]], dtype=xf.dtype, device=x.device)
        local = torch.cat([xf.sum(dims), count])
        total = _global_sum(local)
        n = total[-1]
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = _global_sum((centred * centred).sum(dims)) / n  # two passes: no cancellation
        if self.track_running_stats:  # type: ignore[attr-defined]
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                count = float(self.num_batches_tracked)  # type: ignore[attr-defined]
                momentum = self.momentum if self.momentum is not None else 1.0 / count  # type: ignore[attr-defined]
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))  # type: ignore[attr-defined]
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))  # type: ignore[attr-defined]
        y = centred * torch.rsqrt(var + self.eps).view(shape)  # type: ignore[attr-defined]
        if self.affine:  # type: ignore[attr-defined]
            y = y * self.weight.view(shape) + self.bias.view(shape)  # type: ignore[attr-defined]
        return y.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    pass


class GlobalBatchNorm3d(_GlobalBatchNorm, nn.BatchNorm3d):
    pass


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Turns every BatchNorm{1,2,3}d of ``module`` into its global-batch version, in place (the
    same object keeps its parameters and buffers: only its class changes, so references other
    modules hold to it stay valid). Returns ``module``."""
    for m in module.modules():
        target = _GLOBAL.get(type(m))
        if target is not None:
            m.__class__ = target
    return module
