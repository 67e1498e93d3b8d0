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

    def pixels(self, index: int) -> torch.Tensor:
        return self.images[index]
