"""A user's map-style dataset of ``(image, label)`` items, given what the package needs of it:
``labels`` (for stratified splits and reports), ``set_epoch`` and items ``(tensor, int)``."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import DataError


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _as_label_tensor(values: Any, source: str, length: int) -> torch.Tensor:
    """``values`` (list, numpy array or tensor of class indices) as int64 [length]."""
    try:
        labels = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{source} is not a sequence of integer class indices ({exc})") from exc
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise DataError(f"{source} has dtype {labels.dtype}: pass integer class indices (e.g. labels.long())")
    if labels.dim() != 1 or len(labels) != length:
        raise DataError(f"{source} has shape {tuple(labels.shape)}: pass one integer class index per item, "
                        f"shape [{length}]")
    return labels.to(torch.int64)


def _attribute_labels(dataset: Dataset) -> tuple[Any, str] | None:
    """The labels a dataset keeps beside its items, and where they were found; None if none."""
    name = type(dataset).__name__
    for attribute in ("labels", "targets"):  # ours and SVHN's; torchvision's (list or tensor)
        values = getattr(dataset, attribute, None)
        if values is not None and not callable(values):
            return values, f"{name}.{attribute}"
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1], f"{name}.tensors[1]"
    samples = getattr(dataset, "samples", None)  # ImageFolder / DatasetFolder: (path, class) pairs
    if isinstance(samples, list) and all(isinstance(s, tuple) and len(s) == 2 for s in samples):
        return [label for _, label in samples], f"{name}.samples"
    if isinstance(dataset, Subset):  # e.g. random_split of a torchvision dataset
        inner = _attribute_labels(dataset.dataset)
        if inner is not None:
            values, source = inner
            indices = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
            labels = _as_label_tensor(values, source, len(dataset.dataset))
            return labels[indices], f"{name}.indices of {source}"
    return None


def item_pair(item: Any, index: int, source: str) -> tuple[Any, Any]:
    """``item`` (what ``dataset[index]`` returned) as ``(image, label)``."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"a {len(item)}-item {_type_name(item)}" if isinstance(item, (tuple, list)) else f"a {_type_name(item)}"
        raise DataError(f"item {index} of {source} is {got}: a dataset's items must be (image, label) pairs")
    return item[0], item[1]


def as_int_label(label: Any, index: int, source: str) -> int:
    """A label (int, numpy integer, or one-element integer tensor) as an int."""
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not (
            label.is_floating_point() or label.is_complex() or label.dtype == torch.bool):
        return int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return int(label)
    raise DataError(f"item {index} of {source} has label {label!r} ({_type_name(label)}): "
                    "a label must be an integer class index")


class LabelledDataset(Dataset):
    """A user's map-style dataset ``base`` of ``(image, label)`` items, as the package's own
    datasets are: items ``(image [C, H, W] tensor, int label)`` and ``labels`` (int64 [N]).

    ``labels`` are found, in this order, in ``base.labels``, ``base.targets`` (torchvision
    datasets), a ``TensorDataset``'s second tensor, an ``ImageFolder``'s ``samples``, the base of
    a ``torch.utils.data.Subset`` having one of these; else by ONE pass over all the items at
    construction, which loads (and transforms) every image once: give your dataset ``targets``
    to avoid that cost.

    Floating images are cast to torch's default dtype at construction (float32 unless set
    otherwise: the dtype the package's models are created in), fixed here so that loader worker
    processes, which do not inherit the setting, return the same. Other images are returned as
    they are; ``check_bundle`` refuses non-floating ones. An image that is not a tensor (e.g. a
    PIL image) raises DataError: the dataset's transform lacks ``transforms.ToTensor()``.

    ``set_epoch`` is forwarded to ``base`` when it has one. The user's transforms draw their own
    randomness (seeded per loader worker by ``loader.seed_worker``): the package's contract that
    an item's augmentation is a function of (seed, epoch, index) only does NOT hold for them; it
    may change with the number of workers or across a resume.

    Picklable when ``base`` is (loader workers). A shallow copy (``split.SubsetDataset`` makes
    one) also shallow-copies a base that has ``set_epoch``, so that two subsets' epochs stay apart.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.source = type(base).__name__  # for messages
        self.dtype = torch.get_default_dtype()
        length = len(base)  # type: ignore[arg-type]
        found = _attribute_labels(base)
        if found is not None:
            self.labels = _as_label_tensor(*found, length)
        else:  # one pass over the items (images loaded too: a generic dataset reads them together)
            self.labels = torch.tensor([as_int_label(item_pair(base[i], i, self.source)[1], i, self.source)
                                        for i in range(length)], dtype=torch.int64).view(length)

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The class names the base dataset (or the dataset of a ``Subset``) declares, else None."""
        dataset = self.base
        while isinstance(dataset, Subset) and getattr(dataset, "classes", None) is None:
            dataset = dataset.dataset
        names = getattr(dataset, "classes", None)
        if names is None or isinstance(names, (str, bytes)) or callable(names):
            return None
        return tuple(str(name) for name in names)

    def set_epoch(self, epoch: int) -> None:
        """Forwards the epoch to the base dataset when it has ``set_epoch`` (else nothing to do)."""
        set_epoch = getattr(self.base, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __copy__(self) -> "LabelledDataset":
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        if callable(getattr(self.base, "set_epoch", None)):  # epoch state: one per copy
            clone.base = copy.copy(self.base)
        return clone

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = item_pair(self.base[index], index, self.source)
        if not isinstance(image, torch.Tensor):
            raise DataError(f"item {index} of {self.source}: the image is a {_type_name(image)}, not a tensor: "
                            "add transforms.ToTensor() to the dataset's transform")
        if image.is_floating_point() and image.dtype != self.dtype:
            image = image.to(self.dtype)
        return image, as_int_label(label, index, self.source)
