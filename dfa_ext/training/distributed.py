"""The process group a trainer runs in; a single process is the same code with world size 1.

``torchrun --nproc_per_node N dfa ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT;
:func:`init_from_env` then joins the group (NCCL when the processes use GPUs, gloo on CPUs) and
each process takes GPU LOCAL_RANK. Without those variables nothing is initialised.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (logs, pictures, checkpoints)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` over all processes (a float64 copy; the input is not modified)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``values`` over all processes (a float64 copy on the CPU)."""
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
        total = values.detach().to(torch.float64).clone()
        if self.active:
            if dist.get_backend() == "nccl":
                total = total.cuda()
            dist.all_reduce(total, op=op)
        return total.cpu()

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replaces each tensor (on any device, any float dtype) by its mean over all processes, in place."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        if dist.get_backend() == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current_context() -> DistContext:
    """The context of an initialised ``torch.distributed`` group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Joins the process group torchrun describes (a no-op for a single process).

    Args:
        device: the trainers' ``--device``: "cpu" uses gloo; otherwise NCCL when CUDA is
            available (each process on GPU LOCAL_RANK), else gloo.
    """
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return current_context()
    use_gpu = device != "cpu" and torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if use_gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return current_context()


def shutdown() -> None:
    """Leaves the process group joined by :func:`init_from_env` (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, device: torch.device, context: DistContext, *,
             sync_bn: bool = False, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under several processes (itself otherwise).

    DDP averages the gradients over processes in backward and, at construction, copies rank 0's
    parameters and buffers to every process, so all start identical. ``sync_bn`` first turns its
    BatchNorms into global-batch ones (:mod:`.sync_batchnorm`, in place).
    """
    if not context.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    from .sync_batchnorm import convert_to_global_batchnorm

    if sync_bn:
        convert_to_global_batchnorm(module)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)
