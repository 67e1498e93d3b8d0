"""Building blocks shared by the CIFAR families: convolutions, the classifier head, weight init."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BN always follows or precedes it)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (projection shortcuts and connectors)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ConvStem(nn.Module):
    """conv3x3 - BN - ReLU: image [B, C_in, H, W] -> (a, raw), both [B, C0, H, W].

    ``a`` is the activated output the first block takes. ``raw`` is the conv output, which the
    first block of a pre-activation network (WRN) needs for its identity shortcut, or None where
    nothing needs it (``keep_raw=False``, post-activation ResNets). In a WRN this BN is the first
    block's bn1, owned by the stem so that each BN runs once.
    """

    def __init__(self, in_channels: int, out_channels: int, keep_raw: bool) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.keep_raw = keep_raw

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        y = self.conv(x)
        return self.relu(self.bn(y)), (y if self.keep_raw else None)


class ClassifierHead(nn.Module):
    """Global average pool + linear: [B, C, H, W] (already activated) -> [B, num_classes].

    Adaptive pooling makes the networks work for any input size (8x8, 28x28, 32x32, ...).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(h), 1))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan_out, as RepDistiller and the WRN code), BN weight 1 bias 0,
    linear layers with a zero bias. A model built on the meta device (to check a name and its
    options without memory) has no values to set: skipped, since a random draw on meta tensors
    goes through torch._refs, whose first use imports torch._dynamo (~4 s)."""
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
