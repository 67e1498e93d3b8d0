"""The order of the samples: one seeded permutation per (seed, epoch), shared by every process,
of which rank r of W takes every W-th index (as ``DistributedSampler`` does)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import DataError


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), stable across processes and runs.

    Python's ``hash`` is salted per process for strings and collides for small tuples, hence this.
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[int]):
    """The indices one rank visits in one epoch.

    Args:
        length: dataset size N.
        shuffle: seeded permutation (training) or the identity order (evaluation).
        seed: run seed; the permutation of epoch e depends only on (seed, e).
        rank, world_size: this process and the number of processes.
        drop_last: drop the tail so that every rank gets ``N // W`` indices (training: every
            step then has the same batch on every rank). Otherwise rank r gets ``order[r::W]``
            (evaluation: every sample is seen exactly once over all ranks, with no padding).
        start: indices of this rank to skip at the start (resuming mid-epoch).
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, start: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.start = int(start)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """The global order of this epoch (all ranks), int64 [N]."""
        if not self.shuffle:
            return torch.arange(self.length)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.length, generator=generator)

    def rank_indices(self) -> torch.Tensor:
        """This rank's indices of this epoch, after ``start``: int64 [len(self)]."""
        order = self.order()
        if self.drop_last:
            order = order[: self.length - self.length % self.world_size]
        return order[self.rank::self.world_size][self.start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices().tolist())

    def __len__(self) -> int:
        per_rank = (self.length // self.world_size if self.drop_last
                    else len(range(self.rank, self.length, self.world_size)))
        return max(per_rank - self.start, 0)
