"""What each feature-distillation method distils towards: per teacher group, which layers and
which beta (alpha = softmax(beta)).

OFD is the special case of one layer (the group's last) with alpha = 1, so every feature method
runs the same ``partial_l2`` op; OFD then reads one teacher map per group instead of K.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models import GroupPair
from ..search.result import SearchResult


@dataclass(frozen=True)
class GroupTarget:
    """Group ``index``: distil towards sum_j softmax(beta)_j * sigma_j(T_j) over ``layers`` (indices
    into the group's K teacher layers); ``beta`` is float32 [len(layers)]."""

    index: int
    layers: tuple[int, ...]
    beta: Tensor


def stage_weights(num_groups: int, given: Sequence[float] = ()) -> list[float]:
    """OFD's per-group loss weights 1/2^(G-1-i) (the last group 1), or the ``given`` ones."""
    if given:
        if len(given) != num_groups:
            raise ConfigError(f"stage_weights has {len(given)} values; the teacher has {num_groups} layer groups")
        return [float(w) for w in given]
    return [0.5 ** (num_groups - 1 - i) for i in range(num_groups)]


def group_targets(method: str, pairs: Sequence[GroupPair], *, search: SearchResult | None = None,
                  random_std: float = 1.0, aggregation_seed: int = 0, alpha: Sequence[float] = ()) -> list[GroupTarget]:
    """The targets of a feature method ("ofd", "uniform", "random", "fixed", "dfa") for the paired groups.

    "dfa" needs ``search`` (already checked against the teacher's layers); "fixed" needs ``alpha``,
    K weights used in every group (layers of weight 0 are left out, so (0, ..., 0, 1) is OFD).
    """
    if method == "ofd":
        return [GroupTarget(p.index, (p.num_layers - 1,), torch.zeros(1)) for p in pairs]
    if method == "fixed":
        if any(len(alpha) != p.num_layers for p in pairs):
            raise ConfigError(f"alpha has {len(alpha)} weights; the teacher's groups have "
                              f"{[p.num_layers for p in pairs]} layers")
        weights = torch.tensor(alpha, dtype=torch.float64)
        layers = tuple(int(j) for j in torch.nonzero(weights > 0).flatten())
        beta = torch.log(weights[list(layers)] / weights.sum()).float()
        return [GroupTarget(p.index, layers, beta.clone()) for p in pairs]
    every = [tuple(range(p.num_layers)) for p in pairs]
    if method == "uniform":
        betas = [torch.zeros(p.num_layers) for p in pairs]
    elif method == "random":
        generator = torch.Generator().manual_seed(aggregation_seed)
        betas = [random_std * torch.randn(p.num_layers, generator=generator) for p in pairs]
    elif method == "dfa":
        if search is None:
            raise ConfigError("method dfa needs the search result (--aggregation)")
        unsearched = [g.index for g in search.groups if not g.searched]
        if unsearched:  # a `dfa search --groups ...` run: those groups keep their initial beta
            warnings.warn(f"the aggregation file has groups {unsearched} that were not searched; they keep "
                          "their initial beta (uniform alpha unless --beta-init-std was set)", stacklevel=2)
        betas = search.betas()
    else:
        raise ConfigError(f"{method!r} is not a feature-distillation method")
    return [GroupTarget(p.index, layers, beta.float()) for p, layers, beta in zip(pairs, every, betas, strict=True)]
