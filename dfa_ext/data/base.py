"""The dataset base class: labels, the epoch, and the per-item augmentation + normalisation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .transforms import Preprocess


class PreparedDataset(Dataset):
    """A dataset whose items are ``(normalised [C, H, W] image, int label)``, the image in
    torch's default dtype when the data was loaded (float32 unless set otherwise).

    Subclasses give the raw pixels of an item (``pixels``); this class applies ``preprocess``
    with the item's index and the current epoch, so augmentation is a function of
    (seed, epoch, index) only.

    ``set_epoch`` must be called before a loader's workers start (they hold copies of the
    dataset); ``dfa_ext.data.make_loader`` does so.
    """

    def __init__(self, labels: torch.Tensor, preprocess: Preprocess) -> None:
        self.labels = labels.to(torch.int64)  # [N], for stratified subsets and reports
        self.preprocess = preprocess
        self.epoch = 0
        self._length = len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation draws of epoch ``epoch``."""
        self.epoch = int(epoch)

    def pixels(self, index: int) -> torch.Tensor:
        """Item ``index`` as [C, H, W], uint8 (0..255) or float32 in [0, 1], before augmentation."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for a dataset of {self._length} items")
        index %= self._length  # a negative index draws as its positive twin
        image = self.preprocess(self.pixels(index), index, self.epoch)
        return image, int(self.labels[index])
