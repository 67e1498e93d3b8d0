"""CIFAR-10 and CIFAR-100 from the standard python-pickle folders (``cifar-10-batches-py``,
``cifar-100-python``), read with a small, safe reader.

Not ``torchvision.datasets.CIFAR10``: it md5-checks the files, so folders made or trimmed by a user
or a test fail, and it unpickles with the unrestricted ``pickle``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, DatasetNotFoundError
from .safe_pickle import load_pickle
from .spec import DataBundle, DataSpec
from .tensor_dataset import ImageTensorDataset
from .transforms import Augment, Preprocess

AUGMENT = Augment(padding=4, flip=True)

_PIXELS = 3 * 32 * 32  # a row of b"data": the R, G then B planes of a 32x32 image, row-major


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant keeps what, and its normalisation constants."""

    name: str
    folder: str                 # the folder inside the extracted archive
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str              # in every batch dict
    names_key: str              # in the meta dict
    num_classes: int
    mean: tuple[float, float, float]   # per channel, over the training pixels in [0, 1]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


CIFAR10 = CifarLayout("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      "test_batch", "batches.meta", "labels", "label_names", 10,
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = CifarLayout("cifar100", "cifar-100-python", ("train",), "test", "meta", "fine_labels",
                       "fine_label_names", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def find_folder(data_dir: str | os.PathLike | None, layout: CifarLayout) -> Path:
    """The folder holding the pickles: ``data_dir/<layout.folder>`` or ``data_dir`` itself."""
    expected = ", ".join(layout.files)
    if data_dir is None:
        raise DataError(f"{layout.name} needs data_dir: the folder containing {layout.folder} "
                        f"(the extracted python archive) or that folder itself")
    root = Path(data_dir).expanduser()
    candidates = (root / layout.folder, root)
    for folder in candidates:
        if any((folder / name).is_file() for name in layout.files):
            missing = [str(folder / name) for name in layout.files if not (folder / name).is_file()]
            if missing:
                raise DatasetNotFoundError(f"{layout.name}: missing {', '.join(missing)} "
                                           f"(a complete folder has {expected})")
            return folder
    raise DatasetNotFoundError(f"{layout.name}: no dataset at {candidates[0]} or {candidates[1]}; "
                               f"expected a folder {layout.folder} with the files {expected}")


def _field(record: Any, key: str, path: Path) -> Any:
    """``record[key]`` of an unpickled dict, whose keys are bytes (Python 2 pickles) or str."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(record).__name__}")
    for candidate in (key.encode(), key):
        if candidate in record:
            return record[candidate]
    raise DataError(f"{path}: no key {key!r} (keys: {', '.join(map(repr, record))})")


def read_batch(path: Path, layout: CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] of one batch file."""
    record = load_pickle(path)
    data, labels = _field(record, "data", path), _field(record, layout.label_key, path)
    if not (isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == _PIXELS
            and data.shape[0] > 0 and data.dtype.kind in "ui"):
        raise DataError(f"{path}: 'data' must be a non-empty integer array [N, {_PIXELS}] "
                        f"(N 32x32 RGB images), got {getattr(data, 'shape', type(data).__name__)} "
                        f"{getattr(data, 'dtype', '')}".rstrip())
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: pixel values must be in 0..255")
    expected = f"{layout.label_key!r} must be {len(data)} integers (one per image)"
    try:
        labels = np.asarray(labels)
    except ValueError as exc:  # nested sequences of different lengths
        raise DataError(f"{path}: {expected}, got an irregular nested sequence") from exc
    if labels.shape != (len(data),) or labels.dtype.kind not in "ui":
        raise DataError(f"{path}: {expected}, got shape {labels.shape} of {labels.dtype}")
    outside = labels[(labels < 0) | (labels >= layout.num_classes)]
    if len(outside):
        raise DataError(f"{path}: {layout.label_key!r} must be in 0..{layout.num_classes - 1} "
                        f"({layout.num_classes} classes), found {outside[0]} "
                        f"({len(outside)} of {len(labels)} out of range)")
    images = torch.from_numpy(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def read_class_names(path: Path, layout: CifarLayout) -> tuple[str, ...]:
    names = _field(load_pickle(path), layout.names_key, path)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        raise DataError(f"{path}: {layout.names_key!r} must list {layout.num_classes} class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load(data_dir: str | os.PathLike | None, *, augment: Augment | None, seed: int,
         layout: CifarLayout) -> DataBundle:
    """The official train/test split of ``layout``, held as uint8 [N, 3, 32, 32] in memory."""
    folder = find_folder(data_dir, layout)
    batches = [read_batch(folder / name, layout) for name in layout.train_files]
    train_images = torch.cat([images for images, _ in batches])
    train_labels = torch.cat([labels for _, labels in batches])
    test_images, test_labels = read_batch(folder / layout.test_file, layout)
    spec = DataSpec(name=layout.name, num_classes=layout.num_classes, in_channels=3, image_size=32,
                    mean=layout.mean, std=layout.std,
                    class_names=read_class_names(folder / layout.meta_file, layout))
    train = ImageTensorDataset(train_images, train_labels, Preprocess(spec.mean, spec.std, augment, seed))
    test = ImageTensorDataset(test_images, test_labels, Preprocess(spec.mean, spec.std))
    return DataBundle(train=train, test=test, spec=spec)


def load_cifar10(data_dir: str | os.PathLike | None, *, augment: Augment | None, seed: int) -> DataBundle:
    return load(data_dir, augment=augment, seed=seed, layout=CIFAR10)


def load_cifar100(data_dir: str | os.PathLike | None, *, augment: Augment | None, seed: int) -> DataBundle:
    return load(data_dir, augment=augment, seed=seed, layout=CIFAR100)
