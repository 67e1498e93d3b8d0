"""Matching a teacher's layer groups to a student's by spatial size, from one dummy forward pass."""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..errors import ModelError
from .connectors import make_st_connector, make_ts_connector
from .taps import TappedNetwork


@dataclasses.dataclass(frozen=True)
class GroupShape:
    """One group of one network: its layer names, their common channels and spatial size (H, W)."""

    names: Tuple[str, ...]
    channels: int
    spatial_size: Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class GroupPair:
    """Teacher group ``index`` (K = ``num_layers`` layers) matched with the same student group."""

    index: int
    num_layers: int
    teacher_channels: int
    student_channels: int
    spatial_size: Tuple[int, int]
    teacher_layer_names: Tuple[str, ...]
    student_layer_name: str

    @property
    def st_connector(self) -> Tuple[int, int]:
        """(in, out) channels of the student-to-teacher connector: (C_s, C_t)."""
        return (self.student_channels, self.teacher_channels)

    @property
    def ts_connector(self) -> Tuple[int, int]:
        """(in, out) channels of the teacher-to-student connector: (C_t, C_s)."""
        return (self.teacher_channels, self.student_channels)

    def make_st_connector(self) -> nn.Sequential:
        """[B, C_s, H, W] -> [B, C_t, H, W]; see :func:`connectors.make_st_connector`."""
        return make_st_connector(*self.st_connector)

    def make_ts_connector(self, activation: nn.Module) -> nn.Sequential:
        """[B, C_t, H, W] -> [B, C_s, H, W] ending in ``activation`` (the student's
        ``group_input_activation``); see :func:`connectors.make_ts_connector`."""
        return make_ts_connector(*self.ts_connector, activation)


def probe_groups(net: TappedNetwork, input_shape: Tuple[int, int, int]) -> List[GroupShape]:
    """The group layout of ``net`` for images of ``input_shape`` = (C, H, W).

    Runs one forward pass of a batch of 2 zero images under no_grad in eval mode (BN running
    stats untouched), then restores every submodule's train/eval flag.
    """
    if len(input_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ModelError(f"input_shape must be (channels, height, width), got {input_shape}")
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros((2,) + tuple(input_shape), device=device, dtype=dtype),
                      features=True)
    finally:
        for m, training in modes:
            m.training = training
    shapes = []
    for group in out.groups:
        sizes = {tuple(t.shape[1:]) for t in group.layers}
        if len(sizes) != 1:
            raise ModelError(f"the layers {group.names} of one group differ in shape "
                             f"{sorted(sizes)}; a group's layers must share [C, H, W]")
        c, h, w = sizes.pop()
        shapes.append(GroupShape(tuple(group.names), c, (h, w)))
    return shapes


def pair_networks(teacher: TappedNetwork, student: TappedNetwork,
                  input_shape: Tuple[int, int, int]) -> List[GroupPair]:
    """Pairs group i of the teacher with group i of the student; both must have the same number
    of groups with the same spatial sizes, in the same order (else :class:`ModelError`)."""
    t_groups = probe_groups(teacher, input_shape)
    s_groups = probe_groups(student, input_shape)
    t_sizes = [g.spatial_size for g in t_groups]
    s_sizes = [g.spatial_size for g in s_groups]
    if t_sizes != s_sizes:
        raise ModelError(
            f"cannot pair teacher {_name(teacher)} and student {_name(student)} "
            f"for input {tuple(input_shape)}: their layer groups' spatial sizes differ "
            f"(teacher {len(t_sizes)} groups {_fmt(t_sizes)}, student {len(s_sizes)} groups "
            f"{_fmt(s_sizes)}); they must match group by group")
    return [GroupPair(index=i, num_layers=len(t.names), teacher_channels=t.channels,
                      student_channels=s.channels, spatial_size=t.spatial_size,
                      teacher_layer_names=t.names, student_layer_name=s.names[-1])
            for i, (t, s) in enumerate(zip(t_groups, s_groups))]


def _fmt(sizes: Sequence[Tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{h}x{w}" for h, w in sizes) + "]"


def _name(net: nn.Module) -> str:
    return getattr(net, "model_name", type(net).__name__)  # create() sets model_name
