"""Seeded, resumable, rank-aware data loading.

One permutation per (seed, epoch) is shared by every process; rank r of W takes every W-th index
of it (as ``DistributedSampler`` does). Batched with a per-rank batch of B/W, step b of the W
ranks together covers exactly the global batch b of a one-process run with batch B, so a run's
data order does not depend on the number of processes, and ``start_batch`` resumes mid-epoch.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError, DfaError


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

    def _rank_indices(self) -> torch.Tensor:
        order = self.order()
        if self.drop_last:
            order = order[: self.length - self.length % self.world_size]
        return order[self.rank::self.world_size][self.start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices().tolist())

    def __len__(self) -> int:
        per_rank = (self.length // self.world_size if self.drop_last
                    else len(range(self.rank, self.length, self.world_size)))
        return max(per_rank - self.start, 0)


def seed_worker(worker_id: int) -> None:
    """Seeds numpy and ``random`` in a loader worker from its torch seed (itself seeded by the loader).

    The package's own augmentation draws from per-sample generators; this covers user transforms.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _worker_message(error: DfaError) -> str | None:
    """The one-line message of a DfaError raised in a loader worker process, or None when
    ``error`` was raised in this process.

    torch re-raises a worker's exception as ``type(error)(text)``, where text is "Caught DataError
    in DataLoader worker process 0.\nOriginal Traceback (most recent call last): ..." and ends with
    the line ``dfa_ext.errors.DataError: <message>``; that message is what the user needs.
    """
    text = str(error)
    if "\nOriginal Traceback (most recent call last):\n" not in text:
        return None
    kind = type(error)
    _, found, message = text.rpartition(f"\n{kind.__module__}.{kind.__qualname__}: ")
    return message.strip() if found else None


class _Loader(DataLoader):
    """A DataLoader whose worker processes fail with the dataset's own one-line error (e.g. a
    corrupt image, named), not with torch's multi-line report of the worker's traceback."""

    def __iter__(self) -> Iterator:
        try:
            yield from super().__iter__()
        except DfaError as error:
            message = _worker_message(error)
            if message is None:
                raise
            raise type(error)(message) from error


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0,
                start_batch: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                drop_last: bool | None = None, pin_memory: bool = False) -> DataLoader:
    """A loader over ``dataset`` for one epoch of one rank.

    Args:
        batch_size: per-process batch (the global batch is ``batch_size * world_size``).
        train: shuffle (seeded by ``seed`` and ``epoch``) and, by default, drop the last partial
            global batch so that every step has the same batch size on every rank; evaluation
            keeps the order and every sample.
        epoch: selects the permutation and, through ``dataset.set_epoch``, the augmentation draws.
        start_batch: batches of this epoch already done (resume mid-epoch).
        drop_last: override of the default above.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size}")
    length = len(dataset)  # type: ignore[arg-type]
    if drop_last is None:
        drop_last = train and length >= batch_size * world_size
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = EpochSampler(length, shuffle=train, seed=seed, rank=rank, world_size=world_size,
                           drop_last=drop_last, start=start_batch * batch_size)
    sampler.set_epoch(epoch)
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                   num_workers=num_workers, worker_init_fn=seed_worker,
                   generator=torch.Generator().manual_seed(mix_seed(seed, epoch, rank, 1)),
                   pin_memory=pin_memory, persistent_workers=False)


def batch_stream(dataset: Dataset, batch_size: int, *, seed: int, start_step: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> Iterator:
    """Endless training batches, epoch after epoch, starting at global step ``start_step``.

    Step s is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``: the position in
    the data is a function of the step count, so a resumed stream continues exactly.
    """
    steps_per_epoch = len(make_loader(dataset, batch_size, train=True, seed=seed, rank=rank,
                                      world_size=world_size))
    if steps_per_epoch == 0:
        raise DataError(f"a dataset of {len(dataset)} samples has no full batch of {batch_size}")
    epoch, batch = divmod(start_step, steps_per_epoch)
    while True:
        yield from make_loader(dataset, batch_size, train=True, seed=seed, epoch=epoch, start_batch=batch,
                               num_workers=num_workers, rank=rank, world_size=world_size,
                               pin_memory=pin_memory)
        epoch, batch = epoch + 1, 0
