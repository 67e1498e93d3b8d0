"""Batches of an in-memory image dataset built on the training device.

The loader path reads one item at a time in Python (``PreparedDataset.__getitem__``: crop, flip,
normalise), collates the batch on the CPU and copies it to the device. For datasets held in one
tensor (mnist, digits, cifar10/100, any ``ImageTensorDataset`` and its search subsets), this
module keeps the pixels on the device instead, zero-padded once, and builds a batch with one
gather (crop and flip together) and one multiply-add (normalisation).

Contract, the same as the loader's: the augmentation of sample ``index`` in epoch ``epoch`` is
drawn from ``sample_generator(seed, epoch, index)`` (``Augment.sample``, on the CPU, a few
microseconds a sample), the order from ``EpochSampler``; so a batch does not depend on the number
of processes or on a resume, and on the CPU it is bitwise the batch ``make_loader`` yields.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import DataError
from .sampler import EpochSampler
from .split import SubsetDataset
from .tensor_dataset import ImageTensorDataset
from .transforms import sample_generator


def device_source(dataset: torch.utils.data.Dataset) -> tuple[ImageTensorDataset, torch.Tensor | None] | None:
    """``(in-memory dataset, indices of its items or None for all)`` behind ``dataset``, or
    None when its items are not held in one tensor (e.g. an image folder)."""
    indices = None
    while isinstance(dataset, SubsetDataset):
        indices = dataset.indices if indices is None else dataset.indices[indices]
        dataset = dataset.base
    return (dataset, indices) if isinstance(dataset, ImageTensorDataset) else None


def _padded_on_device(base: ImageTensorDataset, device: torch.device,
                      padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``base``'s images zero-padded by ``padding`` on each side (a crop is then a window of the
    padded image, the flip a reversed window) and its labels, on ``device``: made once per
    dataset and kept in ``base.device_copies``, which its shallow copies share (the search's two
    splits are subsets of one dataset: one copy on the device, not two)."""
    key = (str(device), padding)
    if key not in base.device_copies:
        pixels = base.images.to(device)
        if padding:  # (no padding: the images themselves, not a copy of them on the CPU)
            pixels = F.pad(pixels, (padding, padding, padding, padding))
        base.device_copies[key] = (pixels, base.labels.to(device))
    return base.device_copies[key]


class DeviceImages:
    """The pixels of ``dataset`` on ``device``, and its preprocessing as batched tensor ops.

    Args:
        dataset: an ``ImageTensorDataset`` or a ``SubsetDataset`` of one (``device_source``).
        device: where the pixels live and batches are built.

    Memory: the images once, as stored (uint8 for mnist/cifar: 3 KiB a CIFAR image), padded by
    the crop's padding on each side, plus the labels; shared with every other ``DeviceImages``
    of the same dataset (e.g. the search's other split).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, device: torch.device) -> None:
        source = device_source(dataset)
        if source is None:
            raise DataError(f"{type(dataset).__name__} does not hold its images in memory: "
                            "data on the device needs an in-memory dataset (mnist, digits, cifar)")
        base, self.indices = source
        preprocess = base.preprocess
        self.augment, self.seed = preprocess.augment, preprocess.seed
        self.device = torch.device(device)
        self.padding = self.augment.padding if self.augment is not None else 0
        self.pixels, self.labels = _padded_on_device(base, self.device, self.padding)
        self.shape = tuple(base.images.shape[1:])
        self.preprocess = preprocess.to(self.device)

    def batch(self, items: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``items`` (int64 [B], positions in the dataset given at construction) of epoch
        ``epoch``: normalised images [B, C, H, W] (in the dataset's dtype) and int64 labels [B] on the
        device."""
        index = items if self.indices is None else self.indices[items]
        channels, height, width = self.shape
        top = torch.full((len(index),), self.padding, dtype=torch.int64)
        left, flip = top.clone(), torch.zeros(len(index), dtype=torch.bool)
        if self.augment is not None:
            # The loader's draws, sample by sample: the augmentation stays (seed, epoch, index)'s.
            for row, i in enumerate(index.tolist()):
                params = self.augment.sample(sample_generator(self.seed, epoch, i))
                top[row], left[row], flip[row] = params.top, params.left, params.flip
        rows = top[:, None] + torch.arange(height)                       # [B, H]
        cols = left[:, None] + torch.arange(width)                        # [B, W]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        # One host-to-device copy per batch (item, rows, columns side by side), not three.
        where = torch.cat([index[:, None], rows, cols], dim=1).to(self.device)   # [B, 1 + H + W]
        index, rows, cols = where[:, 0], where[:, 1:1 + height], where[:, 1 + height:]
        gather = (index[:, None, None, None], torch.arange(channels, device=self.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :])
        return self.preprocess.normalise(self.pixels[gather]), self.labels[index]


class DeviceBatches:
    """One epoch of one rank's batches from ``DeviceImages`` in ``sampler``'s order: what
    ``make_loader(..., on_device=images)`` returns (``len`` is the number of batches)."""

    def __init__(self, images: DeviceImages, sampler: EpochSampler, batch_size: int, *, epoch: int,
                 drop_last: bool) -> None:
        self.images, self.sampler, self.batch_size = images, sampler, batch_size
        self.epoch, self.drop_last = epoch, drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.sampler.rank_indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.images.batch(order[start:start + self.batch_size], self.epoch)


DATA_ON_DEVICE_CHOICES = ("auto", "on", "off")


def data_on_device(mode: str, dataset: torch.utils.data.Dataset | None,
                   device: torch.device) -> DeviceImages | None:
    """``dataset`` on ``device`` as ``--data-on-device MODE`` asks, or None for the loader path
    (always for a user's dataset, whose transforms are its own; and for no dataset).

    ``auto``: on a GPU for in-memory datasets (the loader's per-item Python and the host-to-device
    copy are what a GPU waits on); off on the CPU, where the loader is as fast (bench_epoch.py).
    """
    if mode not in DATA_ON_DEVICE_CHOICES:
        raise DataError(f"data_on_device must be one of {', '.join(DATA_ON_DEVICE_CHOICES)}, got {mode!r}")
    if dataset is None:  # a bundle without a test split: nothing to place
        return None
    in_memory = device_source(dataset) is not None
    if mode == "on" and not in_memory:
        # An image folder reads files; a user's dataset (LabelledDataset) has its own transforms,
        # which the batched gather cannot apply.
        raise DataError(f"--data-on-device on needs an in-memory dataset (mnist, digits, cifar10/100); "
                        f"{type(dataset).__name__} does not hold its images in one tensor: pass auto or off")
    if mode == "off" or not in_memory or (mode == "auto" and torch.device(device).type != "cuda"):
        return None
    return DeviceImages(dataset, device)
