"""Seeded per-sample augmentation and normalisation of ``[C, H, W]`` images (uint8 0..255, or
float in [0, 1]).

The random draws for sample ``index`` in epoch ``epoch`` come from a ``torch.Generator`` seeded by
a mix of ``(seed, epoch, index)``, never from the global or a worker's RNG: a sample gets the same
crop and flip whatever the number of loader workers or processes, and after a resume.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..errors import DataError
from .sampler import mix_seed


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of the augmentation draws of sample ``index`` in epoch ``epoch``."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, index))


def crop_padded(image: torch.Tensor, padding: int, top: int, left: int) -> torch.Tensor:
    """Zero-pads ``image`` [C, H, W] by ``padding`` on every side, then takes the [C, H, W] window
    at (``top``, ``left``) of the padded image (0 <= top, left <= 2 * padding).

    This is torchvision's ``RandomCrop(size=(H, W), padding=padding)`` with its offsets given.
    """
    if padding == 0:
        return image
    # One pad with negative amounts on the far sides pads and crops in a single op.
    return F.pad(image, (padding - left, left - padding, padding - top, top - padding))


class AugmentParams(NamedTuple):
    """One sample's draws: crop offsets in the padded image (pixels) and whether to flip."""

    top: int
    left: int
    flip: bool


@dataclass(frozen=True)
class Augment:
    """Training augmentation: pad-``padding`` random crop (zero padding), then a horizontal flip
    with probability 1/2 when ``flip``. ``Augment()`` does nothing."""

    padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise DataError(f"augmentation padding must be a non-negative integer, got {self.padding!r}")
        if not isinstance(self.flip, bool):
            raise DataError(f"augmentation flip must be True or False, got {self.flip!r}")

    @property
    def active(self) -> bool:
        return self.padding > 0 or self.flip

    def sample(self, generator: torch.Generator) -> AugmentParams:
        """Draws one sample's parameters: crop offsets uniform in [0, 2 * padding] (``padding``
        each when there is no padding), flip with probability 1/2 (never when ``flip`` is off)."""
        # One call for all three draws: each torch call on a generator costs microseconds.
        u_top, u_left, u_flip = torch.rand(3, generator=generator).tolist()
        span = 2 * self.padding + 1
        top, left = min(int(u_top * span), span - 1), min(int(u_left * span), span - 1)
        return AugmentParams(top, left, self.flip and u_flip < 0.5)

    def apply(self, image: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """``image`` [C, H, W] cropped and flipped as ``params`` say (same shape)."""
        image = crop_padded(image, self.padding, params.top, params.left)
        return image.flip(-1) if params.flip else image

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(image, self.sample(generator))


class Preprocess:
    """Turns a sample's pixels into a model input: seeded augmentation (training only), then
    per-channel normalisation.

    Args:
        mean, std: per channel, for pixels in [0, 1].
        augment: training augmentation; None (or an inactive one) for evaluation.
        seed: run seed; with the epoch and the sample index it seeds the sample's draws.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: Augment | None = None,
                 seed: int = 0) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
        # The images come in torch's default dtype when the data is loaded (float32 unless the
        # caller set another with torch.set_default_dtype: float64 trains everything in double
        # precision, as the networks are created in that dtype too). Fixed here, so that loader
        # worker processes, which do not inherit the setting, produce the same.
        self.dtype = torch.get_default_dtype()
        # (x - mean) / std as one multiply-add: x * scale + shift (scale also undoes the 0..255
        # range of uint8 pixels, which are augmented before conversion: a quarter of the bytes).
        self.scale = (1 / std_t).to(self.dtype)
        self.scale_uint8 = (1 / (255 * std_t)).to(self.dtype)
        self.shift = (-mean_t / std_t).to(self.dtype)
        self.augment = augment if augment is not None and augment.active else None
        self.seed = int(seed)

    def __call__(self, image: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        """``image`` [C, H, W], uint8 (0..255) or float in [0, 1] -> normalised [C, H, W] in
        ``self.dtype`` (float32 by default).
        The crop's zero padding is black on both scales."""
        if self.augment is not None:
            image = self.augment(image, sample_generator(self.seed, epoch, index))
        return self.normalise(image)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [..., C, H, W] (uint8 0..255, or float in [0, 1]) -> normalised, in
        ``self.dtype``, on the device of this object's tensors (see :meth:`to`)."""
        scale = self.scale_uint8 if images.dtype == torch.uint8 else self.scale
        return torch.addcmul(self.shift, images.to(self.dtype), scale)

    def to(self, device: torch.device) -> "Preprocess":
        """A copy whose normalisation runs on ``device`` (the augmentation draws stay on the CPU)."""
        moved = copy.copy(self)
        moved.scale, moved.scale_uint8, moved.shift = (t.to(device) for t in (self.scale, self.scale_uint8, self.shift))
        return moved


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``images`` [N, C, H, W] (uint8, or float in
    [0, 1]) on the [0, 1] scale, computed in float64."""
    values = images.to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1)
    if images.dtype == torch.uint8:
        values /= 255
    mean, std = values.mean(dim=1), values.std(dim=1, correction=0)
    if (std <= 0).any():
        raise DataError("the training images have a constant channel (std 0); cannot normalise them")
    return tuple(mean.tolist()), tuple(std.tolist())
