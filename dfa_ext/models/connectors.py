"""The 1x1 conv + BN connectors between student and teacher channels (method.md section 5).

Initialised as OFD's connectors: conv weight ~ N(0, sqrt(2 / (k * k * out_channels))), BN weight
1 and bias 0.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import ModelError
from .layers import conv1x1


def _conv_bn(in_channels: int, out_channels: int) -> list:
    for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(c, int) or c < 1:
            raise ModelError(f"connector {name} must be a positive int, got {c!r}")
    conv = conv1x1(in_channels, out_channels)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * out_channels)))
    bn = nn.BatchNorm2d(out_channels)  # weight 1, bias 0 by default
    return [conv, bn]


def make_st_connector(c_s: int, c_t: int) -> nn.Sequential:
    """Student -> teacher channels: [B, c_s, H, W] -> [B, c_t, H, W] (1x1 conv, BN)."""
    return nn.Sequential(*_conv_bn(c_s, c_t))


def make_ts_connector(c_t: int, c_s: int, activation: nn.Module) -> nn.Sequential:
    """Teacher -> student channels, then the student's group input activation:
    [B, c_t, H, W] -> [B, c_s, H, W] (1x1 conv, BN, ``activation``, used as given, not copied)."""
    return nn.Sequential(*_conv_bn(c_t, c_s), activation)
