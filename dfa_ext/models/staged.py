"""stem -> groups of blocks -> head: the forward/tap/resume logic shared by the CIFAR families.

Each block maps ``(a, raw)`` to ``(p, raw_out)``: ``a`` is its input in activated form, ``raw`` the
un-activated input an identity shortcut of a pre-activation block needs (None where unused), ``p``
the block's pre-ReLU feature and ``raw_out`` what the next block gets as ``raw``.  The network
applies ``group_input_activation`` (out of place, so ``p`` is never overwritten) between blocks.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from .taps import GroupFeatures, TapOutput, TappedNetwork


class TappedBlock(nn.Module):
    """A block of a :class:`StagedNetwork`; ``tap_bn`` is the BN whose output ``p`` is.

    Subclasses expose ``tap_bn`` as a property, not an attribute: registering the same BN under
    a second name would duplicate its entries in ``state_dict`` (and confuse module surgery).
    """

    @property
    def tap_bn(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, a: Tensor, raw: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """a: [B, C_in, H, W] (activated), raw: [B, C_in, H, W] or None -> (p, raw_out),
        both [B, C_out, H', W'] (raw_out may be None)."""
        raise NotImplementedError


class StagedNetwork(TappedNetwork):
    """A network made of ``stem`` (image -> (a, raw)), groups of :class:`TappedBlock` and ``head``
    (activated last feature -> logits)."""

    def __init__(self, stem: nn.Module, groups: Sequence[Sequence[TappedBlock]],
                 head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.groups = nn.ModuleList(nn.ModuleList(blocks) for blocks in groups)
        self.head = head
        self.group_input_activation = nn.ReLU()  # out of place: the taps must survive it

    def group_names(self) -> Tuple[str, ...]:
        return tuple(f"group{g}" for g in range(len(self.groups)))

    def layer_names(self, group_index: int) -> Tuple[str, ...]:
        """Names of the group's blocks, "group{g}.block{j}" (0-based)."""
        return tuple(f"group{group_index}.block{j}" for j in range(len(self.groups[group_index])))

    def forward(self, x: Tensor, features: bool = False) -> Union[Tensor, TapOutput]:
        a, raw = self.stem(x)
        return self._run(0, a, raw, features)

    def forward_from(self, group_index: int, h: Tensor) -> Tensor:
        self._check_group_index(group_index)
        if group_index == 0:
            return self.forward(h)
        return self._run(group_index, h, None, False)

    def _run(self, start: int, a: Tensor, raw: Optional[Tensor],
             features: bool) -> Union[Tensor, TapOutput]:
        taps = []
        for g in range(start, len(self.groups)):
            layers = []
            for block in self.groups[g]:
                p, raw = block(a, raw)
                a = self.group_input_activation(p)
                if features:  # keep p alive only when asked: it costs memory during training
                    layers.append(p)
            if features:
                bns = tuple(block.tap_bn for block in self.groups[g])
                taps.append(GroupFeatures(tuple(layers), self.layer_names(g), bns))
        logits = self.head(a)
        return TapOutput(logits, tuple(taps)) if features else logits
