"""scikit-learn's 8x8 digits (1,797 images, 1x8x8): a tiny dataset for tests and smoke runs."""

from __future__ import annotations

import os

import torch

from ..errors import DataError
from .spec import DataBundle
from .split import split_bundle
from .transforms import Augment

# Off by default: at 8x8 a shift is an eighth of the image. Pass padding=1 for a pad-1 crop.
AUGMENT = Augment(padding=0, flip=False)


def load(data_dir: str | os.PathLike | None, *, augment: Augment | None, seed: int,
         split_seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """The digits with a stratified split; ``data_dir`` is unused (they ship with scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 16  # 0..16 -> [0, 1]
    labels = torch.from_numpy(digits.target).to(torch.int64)
    return split_bundle("digits", images, labels, tuple(str(d) for d in range(10)), augment=augment,
                        seed=seed, test_fraction=test_fraction, split_seed=split_seed)
