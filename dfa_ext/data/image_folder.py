"""Any image-folder dataset (e.g. CINIC-10): ``data_dir/train/<class>/*.png`` and a test split
``data_dir/test`` (or ``val`` / ``valid``), read lazily with PIL as RGB, resized to a square."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import UnidentifiedImageError
from PIL.Image import DecompressionBombError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset, pil_loader
from torchvision.transforms import functional as TF

from ..errors import DataError, DatasetNotFoundError
from .base import PreparedDataset
from .spec import DataBundle, DataSpec
from .transforms import Augment, Preprocess, channel_stats

# CIFAR-style, for 32-pixel images: pass padding=... for other sizes.
AUGMENT = Augment(padding=4, flip=True)

TEST_SPLITS = ("test", "val", "valid")  # tried in this order when test_split is not given
STATS_IMAGES = 512                      # training images sampled to estimate mean and std
_STATS_SEED = 0                         # fixed: the spec must not depend on the training seed

_LAYOUT = "data_dir/train/<class>/<image> and data_dir/test/<class>/<image> (or val/ or valid/)"


class ImageFolderDataset(PreparedDataset):
    """Images read from files on access.

    Args:
        samples: (path, class index) pairs.
        image_size: S; an image's shorter side is resized to S, then the centre S x S is kept.
        preprocess: augmentation (training) and normalisation, applied per item.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, preprocess: Preprocess) -> None:
        super().__init__(torch.tensor([label for _, label in samples], dtype=torch.int64), preprocess)
        self.paths = [path for path, _ in samples]
        self.image_size = image_size

    def pixels(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index], self.image_size)


def read_image(path: str, image_size: int) -> torch.Tensor:
    """The image at ``path`` as RGB uint8 [3, S, S], S = ``image_size``: the shorter side resized
    to S (bilinear, antialiased), then the centre square kept."""
    try:
        image = pil_loader(path)  # converted to RGB
    except (OSError, DecompressionBombError) as exc:  # unreadable, truncated, not an image, too large
        # UnidentifiedImageError's message names a file object, not what is wrong
        reason = "not an image in a format PIL reads" if isinstance(exc, UnidentifiedImageError) else exc
        raise DataError(f"{path}: cannot read this image ({reason})") from exc
    if image.size != (image_size, image_size):
        image = TF.center_crop(TF.resize(image, image_size), image_size)
    return TF.pil_to_tensor(image)


def _samples(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    try:
        return make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:  # a class folder without images
        raise DataError(f"{folder}: {exc}") from exc


def _classes(folder: Path) -> list[str]:
    try:
        return find_classes(folder)[0]
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: no class folders; expected {_LAYOUT}") from exc


def _test_folder(root: Path, test_split: str | None) -> Path:
    names = TEST_SPLITS if test_split is None else (test_split,)
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DatasetNotFoundError(f"imagefolder: no test split at {' or '.join(str(root / n) for n in names)}; "
                               f"expected {_LAYOUT}")


def _channel_option(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise DataError(f"{name} must be 3 numbers (R, G, B){', all positive' if name == 'std' else ''}, "
                        f"got {value!r}")
    return values  # type: ignore[return-value]


def load(data_dir: str | os.PathLike | None, *, augment: Augment | None, seed: int,
         image_size: int = 32, test_split: str | None = None, mean: Sequence[float] | None = None,
         std: Sequence[float] | None = None) -> DataBundle:
    """The ``train`` split and the test split (``test_split``, else the first of test, val, valid).

    ``mean`` / ``std`` (per RGB channel, [0, 1] scale) default to estimates over up to 512 training
    images drawn with a fixed seed. Class indices follow the sorted class-folder names.
    """
    if data_dir is None:
        raise DataError(f"imagefolder needs data_dir, laid out as {_LAYOUT}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    root = Path(data_dir).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"imagefolder: no training split at {train_dir}; expected {_LAYOUT}")
    test_dir = _test_folder(root, test_split)

    classes = _classes(train_dir)
    test_classes = _classes(test_dir)
    if test_classes != classes:
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise DataError(f"{test_dir}: its classes differ from those of {train_dir} "
                        f"(missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'})")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    train_samples, test_samples = _samples(train_dir, class_to_idx), _samples(test_dir, class_to_idx)

    if mean is None or std is None:
        picks = np.sort(np.random.default_rng(_STATS_SEED).permutation(len(train_samples))[:STATS_IMAGES])
        estimate = channel_stats(torch.stack([read_image(train_samples[i][0], image_size) for i in picks]))
        mean = estimate[0] if mean is None else mean
        std = estimate[1] if std is None else std
    mean, std = _channel_option("mean", mean), _channel_option("std", std)

    spec = DataSpec(name="imagefolder", num_classes=len(classes), in_channels=3, image_size=image_size,
                    mean=mean, std=std, class_names=tuple(classes))
    train = ImageFolderDataset(train_samples, image_size, Preprocess(mean, std, augment, seed))
    test = ImageFolderDataset(test_samples, image_size, Preprocess(mean, std))
    return DataBundle(train=train, test=test, spec=spec)
