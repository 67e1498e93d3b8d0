"""Pre-activation Wide ResNets WRN-d-k (Zagoruyko & Komodakis) for any depth d = 6n + 4 and width k.

Widths (16, 16k, 32k, 64k); a block computes conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut.
OFD taps a pre-activation block *through the next BN*: the next block's bn1, or, after a group's
last block, the next group's first bn1 and finally the network's last BN.  So that each BN runs
once, every block here owns the BN that follows it (``out_bn``), and the stem owns the first
block's bn1: the tap ``out_bn(y)`` is the very tensor the next ReLU consumes (out of place).
Parameter names therefore differ from the canonical code; the function computed is the same.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from ..errors import ModelError
from .layers import ClassifierHead, ConvStem, conv1x1, conv3x3, init_weights
from .staged import StagedNetwork, TappedBlock


class PreActBlock(TappedBlock):
    """Pre-activation basic block followed by the BN of whatever comes next (``out_bn``).

    Given a = relu(bn1(y_in)) (bn1 lives in the previous block or the stem) it returns
    (out_bn(y), y) with y = conv2(dropout(relu(bn2(conv1(a))))) + shortcut.  The shortcut is
    the raw y_in when channels and stride are unchanged, else a 1x1 conv of the activated a
    (as in the canonical WRN code).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)  # acts on bn2's output only, never on a tap
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv1x1(in_channels, out_channels, stride)
        self.out_bn = nn.BatchNorm2d(out_channels)

    @property
    def tap_bn(self) -> nn.BatchNorm2d:
        return self.out_bn

    def forward(self, a: Tensor, raw: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(a)))))
        if self.shortcut is not None:
            shortcut = self.shortcut(a)
        elif raw is None:  # only reachable by resuming inside group 0, which forward_from forbids
            raise ModelError("an identity-shortcut block needs its un-activated input")
        else:
            shortcut = raw
        y = out + shortcut
        return self.out_bn(y), y


class WideResNet(StagedNetwork):
    """WRN-``depth``-``width``: 3 groups of n = (depth - 4) / 6 pre-activation blocks."""

    def __init__(self, depth: int, width: int, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ModelError(f"a WRN needs depth = 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), "
                             f"got {depth}")
        if width < 1:
            raise ModelError(f"a WRN needs width k >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        groups = []
        channels = widths[0]
        for g, out_channels in enumerate(widths[1:]):
            stride = 1 if g == 0 else 2
            groups.append([PreActBlock(channels if j == 0 else out_channels, out_channels,
                                       stride if j == 0 else 1, dropout) for j in range(n)])
            channels = out_channels
        super().__init__(ConvStem(in_channels, widths[0], keep_raw=True), groups,
                         ClassifierHead(widths[-1], num_classes))
        self.depth, self.width = depth, width
        init_weights(self)
