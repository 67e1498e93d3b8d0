"""The process group a trainer runs in; a single process is the same code with world size 1."""

from __future__ import annotations

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
        total = values.detach().to(torch.float64).clone()
        if self.active:
            if dist.get_backend() == "nccl":
                total = total.cuda()
            dist.all_reduce(total)
        return total.cpu()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current_context() -> DistContext:
    """The context of an initialised ``torch.distributed`` group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()
