"""A fixed, seeded, stratified train/test split of one in-memory image set (MNIST, digits)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..errors import DataError
from .spec import DataBundle, DataSpec
from .tensor_dataset import ImageTensorDataset
from .transforms import Augment, Preprocess, channel_stats


def stratified_split(labels: torch.Tensor, test_fraction: float, split_seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test indices (int64, sorted) holding ``round(test_fraction * n_c)`` of the
    ``n_c`` samples of every class c in the test split.

    The split depends only on the labels, ``test_fraction`` and ``split_seed`` (its own RNG), not
    on the training seed, so every run of a study evaluates on the same test images.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise DataError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    rng = np.random.default_rng(split_seed)
    labels_np = labels.numpy()
    test = []
    for cls in np.unique(labels_np):
        members = np.flatnonzero(labels_np == cls)
        n_test = int(round(test_fraction * len(members)))
        if not 0 < n_test < len(members):
            raise DataError(f"test_fraction={test_fraction} leaves class {cls} ({len(members)} samples) "
                            f"with an empty train or test split")
        test.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(len(labels_np), dtype=bool)
    is_test[np.concatenate(test)] = True
    return torch.from_numpy(np.flatnonzero(~is_test)), torch.from_numpy(np.flatnonzero(is_test))


def split_bundle(name: str, images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...],
                 *, augment: Augment | None, seed: int, test_fraction: float, split_seed: int
                 ) -> DataBundle:
    """Splits ``images`` [N, C, H, W] (uint8, or float in [0, 1]) and ``labels`` [N] with
    ``stratified_split``; mean and std come from the training split."""
    train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
    train_images, test_images = images[train_idx], images[test_idx]
    mean, std = channel_stats(train_images)
    spec = DataSpec(name=name, num_classes=len(class_names), in_channels=images.shape[1],
                    image_size=images.shape[-1], mean=mean, std=std, class_names=class_names,
                    split=f"stratified test_fraction={test_fraction} split_seed={split_seed}")
    train = ImageTensorDataset(train_images, labels[train_idx], Preprocess(mean, std, augment, seed))
    test = ImageTensorDataset(test_images, labels[test_idx], Preprocess(mean, std))
    return DataBundle(train=train, test=test, spec=spec)


class SubsetDataset(torch.utils.data.Dataset):
    """The items ``indices`` of ``base``, keeping ``labels`` and ``set_epoch``.

    Augmentation draws stay those of the base item (seeded by its own index). Each subset holds
    its own shallow copy of ``base`` (the pixel tensors are shared, the epoch is not): two
    subsets of one dataset, read by two batch streams whose epochs advance at different steps
    (search-train and search-val), must not set each other's augmentation epoch.
    """

    def __init__(self, base: torch.utils.data.Dataset, indices: torch.Tensor) -> None:
        self.base, self.indices = copy.copy(base), indices.to(torch.int64)
        self.labels = base.labels[self.indices]

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[int(self.indices[index])]


def split_train_val(dataset: torch.utils.data.Dataset, val_fraction: float, seed: int
                    ) -> tuple[SubsetDataset, SubsetDataset]:
    """A stratified, seeded split of a training set into two parts (search-train, search-val)."""
    train_idx, val_idx = stratified_split(dataset.labels, val_fraction, seed)
    return SubsetDataset(dataset, train_idx), SubsetDataset(dataset, val_idx)
