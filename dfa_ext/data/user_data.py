"""Data the user brings in PyTorch's own terms: ``as_bundle`` turns a map-style dataset of
``(image, label)`` items, or a (train, test) pair of them, into a checked ``DataBundle``.

The package draws the batches, the search's train/val split and each epoch's order itself, so it
needs map-style datasets (``__len__`` and ``__getitem__``), not iterable datasets; the trainers'
epoch loop also takes a user's own ``DataLoader``s (``user_batches``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import DataError
from .base import PreparedDataset
from .labelled import LabelledDataset, item_pair
from .spec import DataBundle, DataSpec
from .split import SubsetDataset
from .user_batches import UserBatches

__all__ = ["LabelledDataset", "as_bundle", "infer_spec", "check_bundle", "describe"]

DEFAULT_NAME = "custom"  # not a registry name: a teacher trained on "mnist" is not silently paired


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _complete(dataset: Any, what: str) -> Dataset:
    """``dataset`` as one the package can use: itself when it already has ``labels`` and
    ``set_epoch`` (the package's own datasets), else wrapped in ``LabelledDataset``."""
    if isinstance(dataset, (DataLoader, UserBatches)):
        raise DataError(f"{what} is a DataLoader: pass its map-style dataset ({what}.dataset) here; the package "
                        "draws the batches, the split and each epoch's order itself")
    if isinstance(dataset, IterableDataset):
        raise DataError(f"{what} is an IterableDataset ({type(dataset).__name__}): pass a map-style dataset "
                        "(with __len__ and __getitem__); the package draws the batches, the split and each "
                        "epoch's order itself")
    if isinstance(dataset, torch.Tensor):
        raise DataError(f"{what} is a tensor: pass a dataset of (image, label) items, e.g. "
                        "TensorDataset(images, labels), or a (train_dataset, test_dataset) pair")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(dataset, (str, bytes)):
        raise DataError(f"{what} is a {type(dataset).__name__}: pass a map-style dataset of (image, label) "
                        "items (with __len__ and __getitem__)")
    if len(dataset) == 0:
        raise DataError(f"{what} ({type(dataset).__name__}) has no items")
    if isinstance(dataset, (PreparedDataset, SubsetDataset, LabelledDataset)) or (
            hasattr(dataset, "labels") and callable(getattr(dataset, "set_epoch", None))
            and isinstance(dataset.labels, torch.Tensor)):
        return dataset
    return LabelledDataset(dataset)


def _classes(dataset: Dataset) -> tuple[str, ...] | None:
    return dataset.classes if isinstance(dataset, LabelledDataset) else None


def infer_spec(train: Dataset, *, name: str | None = None, num_classes: int | None = None) -> DataSpec:
    """The ``DataSpec`` of a training set of ``(image [C, H, W], label)`` items.

    ``in_channels`` and ``image_size`` come from item 0 (images must be square: the package's
    models are built, and teachers paired with students, on ``[C, S, S]`` inputs).
    ``num_classes``: as given, else the number of the dataset's ``classes`` when it has them,
    else ``labels.max() + 1``. ``class_names``: the dataset's ``classes``, else "0", "1", ...
    ``name`` defaults to "custom". The images are taken as already normalised: ``mean`` and
    ``std`` are 0 and 1 per channel (the identity, for whoever normalises with them).
    """
    train = _complete(train, "train")
    if name is None:
        name = DEFAULT_NAME
    if not isinstance(name, str) or not name:
        raise DataError(f"name must be a non-empty string, got {name!r}")
    image, _ = item_pair(train[0], 0, type(train).__name__)
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        found = f"shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else f"a {type(image).__name__}"
        raise DataError(f"item 0 of the training set has an image of {found}: images must be [C, H, W] tensors "
                        "(add a channel dimension with image.unsqueeze(0) for grey images)")
    channels, height, width = image.shape
    if height != width:
        raise DataError(f"item 0 of the training set has an image of shape {tuple(image.shape)}: images must be "
                        "square [C, S, S] (the package's models are paired on square inputs); resize or crop them")
    classes = _classes(train)
    labels = train.labels
    if num_classes is None:
        num_classes = len(classes) if classes else int(labels.max()) + 1
    elif not _positive_int(num_classes):
        raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
    elif classes and len(classes) != num_classes:
        raise DataError(f"num_classes={num_classes}, but the dataset declares {len(classes)} classes (its "
                        "`classes`): pass num_classes=None or fix its classes")
    _check_labels(labels, num_classes, "the training set")
    return DataSpec(name=name, num_classes=num_classes, in_channels=int(channels), image_size=int(height),
                    mean=(0.0,) * channels, std=(1.0,) * channels,
                    class_names=classes if classes else tuple(str(i) for i in range(num_classes)))


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{what} has labels from {low} to {high}, outside [0, num_classes={num_classes}): "
                        f"labels must be class indices 0..{num_classes - 1} (pass num_classes={max(high + 1, 1)} "
                        "if there are that many classes)")


def _check_item(dataset: Dataset, what: str, spec: DataSpec) -> None:
    """Item 0 of ``dataset`` is ``(floating [in_channels, image_size, image_size] tensor, label)``."""
    image, _ = item_pair(dataset[0], 0, what)
    expected = (spec.in_channels, spec.image_size, spec.image_size)
    if not isinstance(image, torch.Tensor):
        raise DataError(f"item 0 of {what}: the image is a {type(image).__name__}, not a tensor: add "
                        "transforms.ToTensor() to the dataset's transform")
    if tuple(image.shape) != expected:
        raise DataError(f"item 0 of {what} is an image of shape {tuple(image.shape)}, but spec.in_channels="
                        f"{spec.in_channels} and spec.image_size={spec.image_size} expect {expected}: "
                        "fix the DataSpec or the dataset")
    if not image.is_floating_point():
        raise DataError(f"item 0 of {what} is a {image.dtype} image: the models take floating images "
                        "(e.g. transforms.ToTensor(), or images.float() / 255)")


def _check_batch(batches: Any, what: str, spec: DataSpec) -> None:
    """The first batch of a user's loader fits ``spec`` (shape, labels in range)."""
    if not isinstance(batches, UserBatches):
        raise DataError(f"{what} is a {type(batches).__name__}: with a DataLoader for training, the test split "
                        "must be a DataLoader too")
    images, labels = batches.first_batch()
    expected = (spec.in_channels, spec.image_size, spec.image_size)
    if tuple(images.shape[1:]) != expected:
        raise DataError(f"{what} yields images of shape {tuple(images.shape[1:])}, but spec.in_channels="
                        f"{spec.in_channels} and spec.image_size={spec.image_size} expect {expected}")
    _check_labels(labels, spec.num_classes, f"the first batch of {what}")


def _loader_bundle(train: DataLoader, test: Any, name: str | None, num_classes: int | None) -> DataBundle:
    """A bundle of a user's own loaders (see ``user_batches``); the spec from the first batch and,
    for the number of classes, the loader's dataset (or ``num_classes``)."""
    train_batches = UserBatches(train, "data[0]")
    test_batches = None if test is None else UserBatches(test, "data[1]") if isinstance(test, DataLoader) else test
    images, _ = train_batches.first_batch()
    channels, height, width = images.shape[1:]
    if height != width:
        raise DataError(f"data[0] yields images of shape {tuple(images.shape[1:])}: images must be square "
                        "[C, S, S] (the package's models are paired on square inputs); resize or crop them")
    if num_classes is None:
        try:
            num_classes = infer_spec(train.dataset).num_classes
        except DataError as error:
            raise DataError(f"cannot tell the number of classes from data[0].dataset ({error}): pass "
                            "as_bundle((train_loader, test_loader), num_classes=N)") from None
    if not _positive_int(num_classes):
        raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = DataSpec(name=name or DEFAULT_NAME, num_classes=num_classes, in_channels=int(channels),
                    image_size=int(height), mean=(0.0,) * channels, std=(1.0,) * channels,
                    class_names=tuple(str(i) for i in range(num_classes)))
    return check_bundle(DataBundle(train=train_batches, test=test_batches, spec=spec))


def check_bundle(bundle: DataBundle) -> DataBundle:
    """``bundle``, checked against its spec: item 0 of each split is a floating
    ``[in_channels, image_size, image_size]`` tensor, labels are in ``[0, num_classes)``.

    Cheap: one item per split (plus the labels). A split without ``labels`` or ``set_epoch`` is
    wrapped in ``LabelledDataset`` (a new bundle is returned then; else ``bundle`` itself).
    """
    if not isinstance(bundle, DataBundle):
        raise DataError(f"expected a DataBundle, got a {type(bundle).__name__}: pass datasets to as_bundle(...)")
    spec = bundle.spec
    if not isinstance(spec, DataSpec):
        raise DataError(f"bundle.spec is a {type(spec).__name__}: pass a DataSpec")
    for field in ("num_classes", "in_channels", "image_size"):
        if not _positive_int(getattr(spec, field)):
            raise DataError(f"spec.{field} must be a positive integer, got {getattr(spec, field)!r}")
    if bundle.train is None:
        raise DataError("bundle.train is None: pass a training dataset")
    if isinstance(bundle.train, UserBatches):
        for what, batches in (("bundle.train", bundle.train), ("bundle.test", bundle.test)):
            if batches is not None:
                _check_batch(batches, what, spec)
        return bundle
    train = _complete(bundle.train, "bundle.train")
    test = None if bundle.test is None else _complete(bundle.test, "bundle.test")
    for what, dataset in (("bundle.train", train), ("bundle.test", test)):
        if dataset is not None:
            _check_item(dataset, what, spec)
            _check_labels(dataset.labels, spec.num_classes, what)
    if train is bundle.train and test is bundle.test:
        return bundle
    return dataclasses.replace(bundle, train=train, test=test)


def as_bundle(data: Any, *, name: str | None = None, num_classes: int | None = None,
              require_test: bool = False) -> DataBundle:
    """A checked ``DataBundle`` of ``data``.

    Args:
        data: a ``DataBundle`` (checked with ``check_bundle`` and returned); a map-style dataset
            of ``(image [C, S, S] float tensor, int label)`` items (training only: the bundle's
            ``test`` is None); a ``(train_dataset, test_dataset)`` tuple or list (test may be
            None); or a ``(train_loader, test_loader)`` pair of your own ``DataLoader``s, for the
            trainers' epoch loop (``train_teacher``, ``run_distill``; see ``user_batches`` for what
            changes when you own the loading; the search splits its data itself and needs datasets).
            Images are taken as already normalised; their transforms are the dataset's own.
        name: the data's name in records and checkpoints (default "custom"); not with a bundle.
        num_classes: default: the dataset's ``classes``, else the largest label + 1; not with a
            bundle.
        require_test: refuse data without a test split (runs that evaluate).

    Raises:
        DataError: an IterableDataset, a loader where a dataset is needed, items that are not
            ``(tensor, int)``, non-square images, labels out of range, no test split when required.
    """
    if isinstance(data, DataBundle):
        if name is not None or num_classes is not None:
            raise DataError("name and num_classes apply to datasets: a DataBundle has its own spec "
                            "(use dataclasses.replace(bundle.spec, ...))")
        bundle = check_bundle(data)
        if require_test and bundle.test is None:
            raise DataError("data has no test split: pass a DataBundle with a test dataset")
        return bundle
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise DataError(f"data is a {type(data).__name__} of {len(data)} items: pass one dataset or a "
                            "(train_dataset, test_dataset) pair")
        train, test = data
    else:
        train, test = data, None
    if require_test and test is None:
        raise DataError("data has no test split: pass (train_dataset, test_dataset) to evaluate the run")
    if isinstance(train, DataLoader):  # the user owns the loading (train_teacher, run_distill)
        return _loader_bundle(train, test, name, num_classes)
    train = _complete(train, "data[0]" if isinstance(data, (tuple, list)) else "data")
    test = None if test is None else _complete(test, "data[1]")
    spec = infer_spec(train, name=name, num_classes=num_classes)
    return check_bundle(DataBundle(train=train, test=test, spec=spec))


def _augments(dataset: Dataset) -> bool | None:
    if isinstance(dataset, UserBatches):
        return None
    while isinstance(dataset, SubsetDataset):
        dataset = dataset.base
    if isinstance(dataset, PreparedDataset):
        return dataset.preprocess.augment is not None  # None when the augmentation does nothing
    return None


def describe(bundle: DataBundle) -> dict:
    """What a run records about its data: ``{"data": spec.name, "augment": ...}``.

    ``augment`` is whether the package's own training set augments (True/False: an inactive
    augmentation, e.g. digits' default, is False), or None for a user's dataset, whose transforms
    are its own and unknown here.
    """
    return {"data": bundle.spec.name, "augment": _augments(bundle.train)}
