"""What a loaded dataset is: its description (``DataSpec``) and its two splits (``DataBundle``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataSpec:
    """What a model and a report need to know about a dataset.

    Images are square: ``[in_channels, image_size, image_size]``. ``mean`` and ``std`` have one
    entry per channel and apply to pixels scaled to [0, 1]: ``x_normalised = (x - mean) / std``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    # How the test images were chosen when the dataset has no official split ("" when it has one):
    # a teacher trained on another split may have seen this split's test images.
    split: str = ""


@dataclass
class DataBundle:
    """The two splits of a dataset and its spec.

    Items of both splits are ``(image, label)``: a normalised ``[C, H, W]`` tensor (in torch's
    default dtype when loaded: float32 unless set otherwise) and an int. Both datasets have
    ``labels`` (int64 ``[N]``) and ``set_epoch(epoch)``; only ``train`` is augmented (when asked
    for), ``test`` never is.

    ``test`` is None when the data has no test split (``as_bundle`` of a single user dataset):
    such a bundle can train but not evaluate, so runs that evaluate ask
    ``as_bundle(..., require_test=True)``.
    """

    train: Dataset
    test: Dataset | None
    spec: DataSpec
