"""Batches a user loads themselves: their own ``DataLoader`` for the trainers' epoch loop.

The package's own loading draws each epoch's order and augmentation from (seed, epoch, index), so a
run is the same with any number of workers or processes and resumes exactly mid-epoch. A user who
owns the loading keeps their sampler, transforms and workers; the trainers then iterate the loader
once per epoch, giving its sampler the epoch (``set_epoch``, as ``DistributedSampler`` needs), and a
resumed run skips the batches of the interrupted epoch already done: the same batches only when the
loader's order is a function of the epoch (e.g. ``DistributedSampler``, or a sampler seeded per epoch).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from ..errors import DataError


class UserBatches:
    """A ``DataLoader`` of ``(images [B, C, H, W], labels [B])`` batches, iterated epoch by epoch.

    Under several processes the loader must give each process its share (``DistributedSampler``);
    the trainers do not split it.
    """

    def __init__(self, loader: DataLoader, what: str = "data") -> None:
        if not isinstance(loader, DataLoader):
            raise DataError(f"{what} is a {type(loader).__name__}: pass a DataLoader, or a map-style dataset")
        try:
            length = len(loader)
        except TypeError:
            raise DataError(f"{what} is a DataLoader without a length (an IterableDataset): the trainers need the "
                            "number of batches per epoch; pass a map-style dataset or a loader over one") from None
        if length == 0:
            raise DataError(f"{what} is a DataLoader with no batches")
        self.loader, self.what = loader, what

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Passes the epoch to the loader's sampler and dataset where they take one."""
        for holder in (self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None),
                       self.loader.dataset):
            if callable(getattr(holder, "set_epoch", None)):
                holder.set_epoch(epoch)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        """The batches of epoch ``epoch``, from batch ``start_batch`` on (a resumed epoch)."""
        self.set_epoch(epoch)
        return itertools.islice(iter(self.loader), start_batch, None)

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of epoch 0, checked to be ``(images [B, C, H, W] float, labels [B] int)``."""
        batch = next(self.epoch(0))
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{self.what} yields {type(batch).__name__} batches: the trainers need "
                            "(images, labels) pairs")
        images, labels = batch[0], batch[1]
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            found = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) \
                else type(images).__name__
            raise DataError(f"{self.what} yields images {found}: the trainers need floating [B, C, H, W] tensors")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise DataError(f"{self.what} yields labels that are not an integer tensor [B] of class indices")
        return images, labels
