"""In-memory image datasets (MNIST, digits, CIFAR): one image tensor and one label tensor."""

from __future__ import annotations

import torch

from ..errors import DataError
from .base import PreparedDataset
from .transforms import Preprocess


class ImageTensorDataset(PreparedDataset):
    """Images held in memory as one tensor.

    Args:
        images: [N, C, H, W], uint8 (0..255) or float (already in [0, 1]).
        labels: [N] integer class indices.
        preprocess: augmentation (training) and normalisation, applied per item.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preprocess: Preprocess) -> None:
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} "
                            f"and {tuple(labels.shape)}")
        super().__init__(labels, preprocess)
        self.images = images
        # Copies of the (padded) images on training devices, made by data.device_batches; a dict
        # so that shallow copies (each search split holds one) share them with the original.
        self.device_copies: dict = {}

    def __copy__(self) -> "ImageTensorDataset":
        # A plain shallow copy, sharing device_copies (not through __getstate__, which drops it).
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        return clone

    def __getstate__(self) -> dict:
        # Loader workers and spawned processes get the images, never the device copies (CUDA
        # memory of this process).
        return {**self.__dict__, "device_copies": {}}

    def pixels(self, index: int) -> torch.Tensor:
        return self.images[index]
