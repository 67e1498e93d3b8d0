"""Seeded, resumable, rank-aware data loading.

One permutation per (seed, epoch) is shared by every process; rank r of W takes every W-th index
of it (as ``DistributedSampler`` does). Batched with a per-rank batch of B/W, step b of the W
ranks together covers exactly the global batch b of a one-process run with batch B, so a run's
data order does not depend on the number of processes, and ``start_batch`` resumes mid-epoch.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, DfaError
from .device_batches import DeviceBatches, DeviceImages
from .sampler import EpochSampler, mix_seed

__all__ = ["EpochSampler", "mix_seed", "make_loader", "batch_stream", "seed_worker"]


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
                drop_last: bool | None = None, pin_memory: bool = False,
                on_device: DeviceImages | None = None) -> Iterable:
    """A loader over ``dataset`` for one epoch of one rank.

    Args:
        batch_size: per-process batch (the global batch is ``batch_size * world_size``).
        train: shuffle (seeded by ``seed`` and ``epoch``) and, by default, drop the last partial
            global batch so that every step has the same batch size on every rank; evaluation
            keeps the order and every sample.
        epoch: selects the permutation and, through ``dataset.set_epoch``, the augmentation draws.
        start_batch: batches of this epoch already done (resume mid-epoch).
        drop_last: override of the default above.
        on_device: ``dataset``'s pixels on the training device (``DeviceImages``): the batches are
            then built there (the same batches, see ``device_batches``) and the loader options
            (workers, pinned memory) do not apply.

    Returns an iterable of ``(images [B, C, H, W], labels [B])`` with ``len``.
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
    if on_device is not None:
        return DeviceBatches(on_device, sampler, batch_size, epoch=epoch, drop_last=drop_last)
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                   num_workers=num_workers, worker_init_fn=seed_worker,
                   generator=torch.Generator().manual_seed(mix_seed(seed, epoch, rank, 1)),
                   pin_memory=pin_memory, persistent_workers=False)


def batch_stream(dataset: Dataset, batch_size: int, *, seed: int, start_step: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False, on_device: DeviceImages | None = None) -> Iterator:
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
                               pin_memory=pin_memory, on_device=on_device)
        epoch, batch = epoch + 1, 0
