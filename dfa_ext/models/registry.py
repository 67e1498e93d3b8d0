"""Models by name: ``create("wrn_40_2", num_classes=100)``, ``available_models()``.

Names: ``resnet{d}`` and ``resnet{d}x4`` (d = 6n + 2; ``width=W`` sets the first group's
channels), ``wrn_{d}_{k}`` (d = 6n + 4, k >= 1),
``torchvision:resnet{18,34,50,101,152}`` (wrapped in a :class:`HookedNetwork`), and the user's own
networks as an import path ``"pkg.module:factory"`` (see :mod:`.import_path`).

Every network ``create`` builds carries ``model_name`` and ``model_options`` (its keyword
arguments), so a checkpoint can record how to rebuild it: :func:`rebuild_record`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ..errors import ModelError
from .hooked import HookedNetwork
from .import_path import build_from_import_path, is_import_path
from .resnet_cifar import WIDTHS, WIDTHS_X4, CifarResNet, scaled_widths
from .taps import TappedNetwork
from .wrn import WideResNet

_CIFAR_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                  "resnet110", "resnet8x4", "resnet32x4")
_WRNS = ("wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_28_2", "wrn_28_4", "wrn_40_1", "wrn_40_2")
_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_TV_PREFIX = "torchvision:"


def available_models() -> List[str]:
    """The named models (any resnet{6n+2}[x4] and wrn_{6n+4}_{k} is accepted as well)."""
    return [*_CIFAR_RESNETS, *_WRNS, *(_TV_PREFIX + n for n in _TORCHVISION)]


def _resnet(m: re.Match, num_classes: int, in_channels: int, width: int | None = None) -> TappedNetwork:
    """``width``: channels of the first group (16, or 64 for x4); the stem and later groups scale
    with it (resnet8 width=4: 4/4/8/16 channels), for students narrow enough to need a teacher."""
    widths = WIDTHS_X4 if m[2] else WIDTHS
    if width is not None:
        widths = scaled_widths(widths, width)
    return CifarResNet(int(m[1]), widths, num_classes, in_channels)


def _wrn(m: re.Match, num_classes: int, in_channels: int, dropout: float = 0.0) -> TappedNetwork:
    return WideResNet(int(m[1]), int(m[2]), num_classes, in_channels, dropout=dropout)


def _torchvision(m: re.Match, num_classes: int, in_channels: int,
                 small_input: bool = False) -> TappedNetwork:
    """A torchvision ResNet (random init).  ``small_input``: CIFAR-style stem, a 3x3 stride-1
    conv1 and no max-pool, so 32x32 images keep 32/16/8/4 maps instead of 8/4/2/1."""
    import torchvision  # lazy: only these models need it

    model = getattr(torchvision.models, m[1])(weights=None, num_classes=num_classes)
    if small_input or in_channels != 3:
        kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel, stride, padding,
                                bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small_input:
        model.maxpool = nn.Identity()
    return HookedNetwork(model)


# (pattern, builder, accepted keyword arguments)
_FAMILIES: List[tuple] = [
    (re.compile(r"resnet(\d+)(x4)?"), _resnet, ("width",)),
    (re.compile(r"wrn_(\d+)_(\d+)"), _wrn, ("dropout",)),
    (re.compile(_TV_PREFIX + "(" + "|".join(_TORCHVISION) + ")"), _torchvision, ("small_input",)),
]


def create(name: str, num_classes: int = 10, in_channels: int = 3,
           **kwargs: Any) -> TappedNetwork:
    """Builds a freshly initialised model; logits [B, num_classes] for images [B, in_channels, H, W].

    ``name`` is a zoo name (:func:`available_models`) or an import path ``"pkg.module:factory"``:
    the factory (function or class) is called with ``kwargs``, plus ``num_classes`` and
    ``in_channels`` when its signature takes them, and must return a :class:`TappedNetwork` (or a
    torchvision-style ResNet, wrapped in a :class:`HookedNetwork`).  A module not importable from
    sys.path is looked for in the working directory too.

    The result carries ``model_name = name`` and ``model_options = dict(kwargs)``.
    Raises :class:`ModelError` for an unknown name, a bad depth/width, an unknown argument, or a
    factory that cannot be imported, called, or returns something else.
    """
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{what} must be a positive int, got {value!r}")
    model = _create_zoo(name, num_classes, in_channels, kwargs)
    # "torchvision:resnet19" is a mistyped zoo name, not the module torchvision's attribute
    if model is None and is_import_path(name) and not name.startswith(_TV_PREFIX):
        model = build_from_import_path(name, num_classes, in_channels, kwargs)
    if model is None:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(available_models())} "
                         "(any resnet{6n+2}, resnet{6n+2}x4 and wrn_{6n+4}_{k} too), or your own "
                         "network as 'pkg.module:factory'")
    model.model_name = name
    model.model_options = dict(kwargs)
    return model


def _create_zoo(name: str, num_classes: int, in_channels: int,
                kwargs: Dict[str, Any]) -> Optional[TappedNetwork]:
    """The zoo model ``name``, or None when no family matches it."""
    for pattern, build, accepted in _FAMILIES:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ModelError(f"model {name!r} does not take {unknown}; it accepts "
                             f"{list(accepted) or 'no extra arguments'}")
        try:
            return build(match, num_classes, in_channels, **kwargs)
        except ModelError as error:  # e.g. a bad depth: say which name the user gave
            raise ModelError(f"model {name!r}: {error}") from None
    return None


def rebuild_record(module: nn.Module) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(model_name, model_options)`` of a network :func:`create` built, so that
    ``create(model_name, num_classes, in_channels, **model_options)`` rebuilds it; None for any
    other module.  For a HookedNetwork the record is on the wrapper, not the wrapped model."""
    name = getattr(module, "model_name", None)
    options = getattr(module, "model_options", None)
    if not isinstance(name, str) or not isinstance(options, dict):
        return None
    return name, dict(options)
