"""Memory layouts: outputs and gradients take the strides of torch.empty_like of their input, and
non-contiguous or mixed layouts give the reference's values (float64, rtol = atol = 1e-10)."""

from __future__ import annotations

import itertools
from typing import Sequence

import pytest
import torch

from dfa_ext import ops
from dfa_helpers import (F64, LAYOUTS, MARGIN_OPS, OP_MARGINS, OPS, Inputs, call, check_against_reference,
                         grad_leaves, make_inputs, memory_layout_of, op_id, seed_of, to_layout, value_and_grads)

SHAPE_OF = {layout: (2, 3, 3, 4, 5) if layout == "channels_last_3d" else (2, 3, 5, 7) for layout in LAYOUTS}

pytestmark = pytest.mark.rounding  # float bounds that must hold on any CPU (rounding.py)


def _cases():
    for layout, (name, margins) in itertools.product(SHAPE_OF, OP_MARGINS):
        yield pytest.param(layout, name, margins, id=f"{layout}-{op_id(name, margins)}")


@pytest.mark.parametrize("layout,name,margins", list(_cases()))
def test_strides_follow_empty_like(layout: str, name: str, margins: bool) -> None:
    """aggregate's output and the student/feature gradients have the strides of empty_like(input)."""
    inp = make_inputs(SHAPE_OF[layout], 3, layout=layout, margins=margins, seed=seed_of(layout, name))
    out, grads = value_and_grads(ops, name, inp)
    if name == "aggregate":
        assert out.stride() == memory_layout_of(inp.features[0])
    for g, leaf in zip(grads, grad_leaves(name, inp)):
        if leaf is not inp.beta:
            assert g.stride() == memory_layout_of(leaf), (g.stride(), leaf.stride())


@pytest.mark.parametrize("layout,name,margins", list(_cases()))
def test_values_in_every_layout(layout: str, name: str, margins: bool) -> None:
    """Values and gradients equal the reference's in every layout (views with steps, permutations)."""
    inp = make_inputs(SHAPE_OF[layout], 3, layout=layout, margins=margins, seed=seed_of(layout, name, 1))
    check_against_reference(name, inp, **F64)


# (feature layouts, student layout): mixes of layouts within one call.
MIXES = [
    (("channels_last",) * 3, "contiguous"),
    (("contiguous",) * 3, "channels_last"),
    (("contiguous", "channels_last", "sliced"), "permuted"),
    (("channels_last", "contiguous", "permuted"), "sliced"),
    (("sliced", "channels_last", "contiguous"), "channels_last"),
]


@pytest.mark.parametrize("features_layouts,student_layout", MIXES,
                         ids=["+".join(f) + "-s_" + s for f, s in MIXES])
@pytest.mark.parametrize("name", OPS)
def test_mixed_layouts(name: str, features_layouts: Sequence[str], student_layout: str) -> None:
    """Maps in different layouts within one call: values, gradients and gradient strides are right."""
    base = make_inputs((2, 4, 5, 3), 3, margins=name in MARGIN_OPS, seed=seed_of(name, features_layouts))
    features = [to_layout(f, lay).requires_grad_() for f, lay in zip(base.features, features_layouts)]
    inp = Inputs(to_layout(base.student, student_layout).requires_grad_(), features, base.beta, base.margins)
    check_against_reference(name, inp, **F64)
    out, grads = value_and_grads(ops, name, inp)
    if name == "aggregate":
        assert out.stride() == memory_layout_of(features[0])
    for g, leaf in zip(grads, grad_leaves(name, inp)):
        if leaf is not inp.beta:
            assert g.stride() == memory_layout_of(leaf)


def test_inputs_not_modified() -> None:
    """The ops neither write to their inputs nor change their layout."""
    inp = make_inputs((2, 3, 4, 5), 3, layout="channels_last", margins=True, seed=3)
    before = [t.detach().clone() for t in (inp.student, inp.beta, inp.margins, *inp.features)]
    for name in OPS:
        if name == "bridge_st_loss":
            call(ops, name, Inputs(inp.student, inp.features, inp.beta, None)).sum().backward()
        else:
            call(ops, name, inp).sum().backward()
    after = (inp.student, inp.beta, inp.margins, *inp.features)
    for b, a in zip(before, after):
        assert torch.equal(b, a.detach())
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in inp.features)
