"""Post-activation CIFAR ResNets as in RepDistiller/CRD: resnet8..110, resnet8x4, resnet32x4.

Stem conv3x3-BN-ReLU, 3 groups of n = (depth - 2) / 6 basic blocks, global pool + fc.  A block's
tap is its pre-ReLU output bn2(conv2(..)) + shortcut(x); its margin BN is bn2 (OFD convention).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor, nn

from ..errors import ModelError
from .layers import ClassifierHead, ConvStem, conv1x1, conv3x3, init_weights
from .staged import StagedNetwork, TappedBlock

WIDTHS = (16, 16, 32, 64)  # stem, group 0, group 1, group 2
WIDTHS_X4 = (32, 64, 128, 256)


def scaled_widths(widths: Sequence[int], width: int) -> tuple[int, ...]:
    """``widths`` (stem, group 0..2) scaled so that group 0 has ``width`` channels (at least 1 each)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ModelError(f"width must be a positive int (channels of the first group), got {width!r}")
    return tuple(max(1, round(w * width / widths[1])) for w in widths)


class BasicBlock(TappedBlock):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes).

    The final ReLU is left to the network, so the returned sum is the pre-ReLU feature.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)  # acts on bn1's output only, never on a tap
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride),
                                            nn.BatchNorm2d(out_channels))

    @property
    def tap_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, a: Tensor, raw: Optional[Tensor]) -> Tuple[Tensor, None]:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(a)))))
        shortcut = a if self.downsample is None else self.downsample(a)
        return out + shortcut, None  # out of place: bn2's output stays untouched too


class CifarResNet(StagedNetwork):
    """Post-activation ResNet-``depth`` for small images; ``widths`` = (stem, group 0..2)."""

    def __init__(self, depth: int, widths: Sequence[int] = WIDTHS, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ModelError(f"a CIFAR ResNet needs depth = 6n + 2 with n >= 1 (8, 14, 20, ...), "
                             f"got {depth}")
        if len(widths) != 4:
            raise ModelError(f"widths must give the stem and 3 groups (4 values), got {widths}")
        n = (depth - 2) // 6
        groups = []
        channels = widths[0]
        for g, width in enumerate(widths[1:]):
            stride = 1 if g == 0 else 2
            blocks = [BasicBlock(channels if j == 0 else width, width, stride if j == 0 else 1)
                      for j in range(n)]
            groups.append(blocks)
            channels = width
        super().__init__(ConvStem(in_channels, widths[0], keep_raw=False), groups,
                         ClassifierHead(widths[-1], num_classes))
        self.depth = depth
        init_weights(self)
