"""The network contract every model of the package follows (method.md section 2).

A *tapped* network returns, besides its logits, the pre-ReLU output of every block of every layer
group (the teacher features T_i^1..T_i^K, or the student's S_i = the group's last one), the BN
that produced each (for OFD margins), and can resume its forward pass from any group's input (the
DFA teacher-to-student path feeds an aggregation into the student's later groups).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

from torch import Tensor, nn

from ..errors import ModelError


class GroupFeatures(NamedTuple):
    """The taps of one layer group; a NamedTuple so DistributedDataParallel can traverse it.

    layers: pre-ReLU output of every block of the group, in order, each [B, C, H, W] (one C, H, W
        per group).  No later in-place op touches them; they stay in the autograd graph.
    names: qualified layer names ("group2.block4", "layer3.1"), stable across runs.
    bns: the BatchNorm whose output each layer is (its OFD margin source), or None when unknown.
    """

    layers: Tuple[Tensor, ...]
    names: Tuple[str, ...]
    bns: Tuple[Optional[nn.Module], ...]

    @property
    def last(self) -> Tensor:
        """The group's output before its activation, [B, C, H, W] (the student-side S_i)."""
        return self.layers[-1]


class TapOutput(NamedTuple):
    """What ``forward(x, features=True)`` returns: logits [B, num_classes] and one entry per group."""

    logits: Tensor
    groups: Tuple[GroupFeatures, ...]


class TappedNetwork(nn.Module):
    """Base of every model: ``forward(x, features)``, ``forward_from(g, h)`` and the group layout.

    Subclasses set ``group_input_activation`` (an out-of-place module mapping a group's pre-ReLU
    output to the next group's input) and implement the abstract members below.  The contract:
    ``forward_from(g, group_input_activation(out.groups[g - 1].last))`` equals ``forward(x)``.
    """

    group_input_activation: nn.Module

    @property
    def num_groups(self) -> int:
        """G, the number of layer groups."""
        return len(self.group_names())

    def group_names(self) -> Tuple[str, ...]:
        """One name per group, in forward order."""
        raise NotImplementedError

    def forward(self, x: Tensor, features: bool = False) -> Union[Tensor, TapOutput]:
        """x: [B, C_in, H, W] -> logits [B, num_classes], or a :class:`TapOutput` when ``features``."""
        raise NotImplementedError

    def forward_from(self, group_index: int, h: Tensor) -> Tensor:
        """Logits [B, num_classes] of the forward pass resumed at group ``group_index`` (0..G).

        ``forward_from(0, x)`` is the plain forward from the image.  For g >= 1, ``h`` is the input
        of group g in activated form, ``group_input_activation(out.groups[g - 1].last)``;
        ``forward_from(G, h)`` runs only the classifier head.
        """
        raise NotImplementedError

    def _check_group_index(self, group_index: int) -> None:
        if not 0 <= group_index <= self.num_groups:
            raise ModelError(f"group_index must be in 0..{self.num_groups} for this "
                             f"{self.num_groups}-group network, got {group_index}")
