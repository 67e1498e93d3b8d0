"""The dataset options every command shares, and the bundle they select."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from .registry import load_data
from .spec import DataBundle


@dataclass
class DataOptions:
    data: str = option("mnist", "dataset: mnist (bundled), digits (bundled), cifar10, cifar100, imagefolder")
    data_dir: str | None = option(None, "dataset folder (cifar10/cifar100/imagefolder)")
    data_options: dict = option({}, "extra dataset arguments, as KEY=VALUE (e.g. image_size=32)")
    augment: bool = option(True, "training-set augmentation (random crop, and flips where they make sense)")

    def load(self, seed: int) -> DataBundle:
        """The bundle these options name; augmentation draws are seeded by ``seed``."""
        return load_data(self.data, self.data_dir, augment=self.augment, seed=seed, **self.data_options)
