"""torch.autograd.gradcheck of every op in float64, with the feature maps among the inputs.

Inputs are redrawn until no element sits within 1e-3 of a kink (margin, partial-L2 mask edge), so
the finite differences of gradcheck (eps 1e-6) see a smooth function.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from dfa_ext import ops
from dfa_helpers import MARGIN_OPS, OP_MARGINS, OPS, Inputs, away_from_kinks, make_inputs, op_id, seed_of


def _smooth_inputs(name: str, shape, k: int, margins: bool, layout: str = "contiguous") -> Inputs:
    for attempt in range(100):
        inp = make_inputs(shape, k, margins=margins, layout=layout, seed=seed_of(name, shape, margins, attempt))
        if away_from_kinks(inp, name):
            return inp
    raise AssertionError("no kink-free draw found")


def _flat_fn(name: str, k: int, margins: Optional[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The op as a function of flat tensors (student, beta, *features), as gradcheck needs."""
    def fn(student: torch.Tensor, beta: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        assert len(features) == k
        if name == "aggregate":
            return ops.aggregate(list(features), beta, margins)
        if name == "bridge_st_loss":
            return ops.bridge_st_loss(student, list(features), beta)
        return ops.partial_l2(student, list(features), beta, margins)
    return fn


@pytest.mark.parametrize("name,margins", OP_MARGINS, ids=[op_id(n, m) for n, m in OP_MARGINS])
@pytest.mark.parametrize("shape,layout", [((2, 3, 2, 3), "contiguous"), ((2, 3, 2, 3), "channels_last"),
                                          ((3, 4), "contiguous")], ids=["4d", "channels_last", "2d"])
def test_gradcheck(name: str, margins: bool, shape, layout: str) -> None:
    """Analytical gradients (student, beta, every feature map) match finite differences."""
    inp = _smooth_inputs(name, shape, 3, margins, layout)
    fn = _flat_fn(name, 3, inp.margins)
    assert torch.autograd.gradcheck(fn, (inp.student, inp.beta, *inp.features))


@pytest.mark.parametrize("name", OPS)
def test_gradcheck_features_only(name: str) -> None:
    """Gradients w.r.t. the maps alone (student and beta constants), K = 2."""
    inp = _smooth_inputs(name, (2, 2, 3), 2, name in MARGIN_OPS)

    def fn(*features: torch.Tensor) -> torch.Tensor:
        return _flat_fn(name, 2, inp.margins)(inp.student.detach(), inp.beta.detach(), *features)

    assert torch.autograd.gradcheck(fn, tuple(inp.features))
