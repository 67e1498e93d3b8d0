"""OFD margins of the teacher's pre-ReLU features, from the BN that produced them (method.md s. 3),
or measured on data (:func:`empirical_margins`).

A channel's pre-ReLU response is modelled as x ~ N(mu, s^2) with mu = BN bias, s = |BN weight|;
its margin is E[x | x < 0] = mu - s * phi(mu/s) / Phi(-mu/s), or -3s when Phi(-mu/s) <= 1e-3 (too
few negative responses to trust the estimate, as in OFD's code).  For s == 0 the response is the
constant mu, and the margin is min(mu, 0): mu itself when it is negative, else 0 (the s -> 0 limit
of both branches).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .errors import ModelError

TAIL_THRESHOLD = 1e-3  # Phi(-mu/s) at or below which OFD falls back to -3s
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def bn_margins(bn: nn.Module) -> Tensor:
    """Per-channel margins of a BatchNorm's output: [C], float32, detached, on the BN's device."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ModelError(f"margins need a BatchNorm module, got {type(bn).__name__}")
    ref = bn.weight if bn.affine else bn.running_mean
    device = ref.device if ref is not None else torch.device("cpu")
    if bn.affine:
        s = bn.weight.detach().to("cpu", torch.float64).abs()
        mu = bn.bias.detach().to("cpu", torch.float64)
    else:  # a non-affine BN outputs N(0, 1)-like responses
        s = torch.ones(bn.num_features, dtype=torch.float64)
        mu = torch.zeros(bn.num_features, dtype=torch.float64)
    degenerate = s == 0
    r = mu / torch.where(degenerate, torch.ones_like(s), s)
    # phi(r) / Phi(-r) in log space: Phi(-r) underflows long before the ratio is large.
    log_tail = torch.special.log_ndtr(-r)
    ratio = torch.exp(-0.5 * r * r - _LOG_SQRT_2PI - log_tail)
    margin = torch.where(torch.special.ndtr(-r) > TAIL_THRESHOLD, mu - s * ratio, -3.0 * s)
    margin = torch.where(degenerate, mu.clamp(max=0.0), margin)
    return margin.to(device=device, dtype=torch.float32)


def group_margins(bns: Sequence[nn.Module]) -> Tensor:
    """Margins of a group's K layers, [K, C]: row j from ``bns[j]`` (GroupFeatures.bns)."""
    if len(bns) == 0:
        raise ModelError("group_margins needs at least one BN")
    for j, bn in enumerate(bns):
        if bn is None:
            raise ModelError(f"layer {j} of the group has no known BN, so it has no OFD margin")
    rows = [bn_margins(bn) for bn in bns]
    channels = [row.numel() for row in rows]
    if len(set(channels)) != 1:
        raise ModelError(f"the group's BNs have different channel counts {channels}; "
                         "margins of one group must share C")
    return torch.stack(rows)


def teacher_margins(teacher: nn.Module, input_shape: tuple[int, int, int]) -> list[Tensor]:
    """Per layer group of a tapped ``teacher``, its [K, C] margins (one probe forward of two zero
    images of ``input_shape`` on the teacher's device, in eval mode, under no_grad)."""
    param = next(teacher.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else None  # a float64 teacher too
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            groups = teacher(torch.zeros(2, *input_shape, device=device, dtype=dtype), features=True).groups
    finally:
        teacher.train(was_training)
    return [group_margins(g.bns) for g in groups]


@torch.no_grad()
def empirical_margins(teacher: nn.Module, dataset: torch.utils.data.Dataset, *, samples: int = 2048,
                      batch_size: int = 256, aggregations: Sequence[tuple[Sequence[int], Tensor] | None] | None = None,
                      device: torch.device | str | None = None) -> list[Tensor]:
    """Per layer group, the margins E[x | x < 0] of each channel measured on the teacher's features of
    the first ``samples`` items of ``dataset`` (eval mode, no gradients), float32 on the CPU.

    The BN estimate (:func:`bn_margins`) assumes the feature is that BN's output; a residual sum
    (e.g. bn2 plus a conv+BN projection shortcut) spreads further below zero, and the measured
    margin sees it. A channel with no negative value keeps margin 0 (the margin ReLU leaves its
    values as they are).

    Args:
        aggregations: per group, None for the margins of each of its K layers ([K, C]), or
            ``(layers, beta)`` for the margins of the aggregated feature sum_j softmax(beta)_j T_j
            over those layer indices ([1, C]).
    Returns:
        per group, [K, C] or [1, C] float32.
    """
    param = next(teacher.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    was_training = teacher.training
    teacher.to(device).eval()
    sums: list[Tensor] | None = None
    counts: list[Tensor] | None = None
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(min(samples, len(dataset)))),
                                         batch_size=batch_size)
    try:
        for images, _ in loader:
            groups = teacher(images.to(device), features=True).groups
            maps = []
            for g, group in enumerate(groups):
                spec = aggregations[g] if aggregations is not None else None
                if spec is None:
                    maps.append(torch.stack(group.layers, dim=1))  # [B, K, C, ...]
                else:
                    layers, beta = spec
                    alpha = torch.softmax(beta.double(), 0).to(device, group.layers[0].dtype)
                    mixed = sum(a * group.layers[j] for a, j in zip(alpha, layers))
                    maps.append(mixed.unsqueeze(1))
            reduce = [tuple(itertools.chain((0,), range(3, m.dim()))) for m in maps]
            batch_sums = [m.clamp(max=0).double().sum(dim=r) for m, r in zip(maps, reduce)]
            batch_counts = [(m < 0).double().sum(dim=r) for m, r in zip(maps, reduce)]
            sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
            counts = batch_counts if counts is None else [a + b for a, b in zip(counts, batch_counts)]
    finally:
        teacher.to(home).train(was_training)
    if sums is None:
        raise ModelError("empirical margins need at least one training image")
    return [(s / c.clamp(min=1)).float().cpu() for s, c in zip(sums, counts)]
