"""Values and gradients of the fused ops vs the reference in float64, on random shapes.

Tolerance: rtol = atol = 1e-10 (both sides compute in float64; only summation order differs).
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import pytest
import torch

from dfa_ext import ops
from dfa_helpers import (F64, OP_MARGINS, OPS, STUDENT_OPS, call, check_against_reference, make_inputs, op_id,
                         seed_of)

# (shape, layout): 2-D, 3-D, odd 4-D and 5-D sizes, channels_last and channels_last_3d.
SMALL_SHAPES = [
    ((2, 3), "contiguous"),
    ((1, 4, 7), "contiguous"),
    ((3, 5, 7, 9), "contiguous"),
    ((2, 3, 5, 3), "contiguous"),
    ((1, 3, 3, 5, 3), "contiguous"),
    ((3, 5, 7, 9), "channels_last"),
    ((2, 3, 3, 5, 3), "channels_last_3d"),
]
# More than one 16384-element chunk per sample (18483 elements), only with K = 3.
CHUNKED_SHAPES = [((2, 3, 101, 61), "contiguous"), ((2, 3, 101, 61), "channels_last")]
KS = (1, 2, 3, 5, 9)

pytestmark = pytest.mark.rounding  # float bounds that must hold on any CPU (rounding.py)


def _cases() -> Iterator:
    combos = itertools.chain(itertools.product(SMALL_SHAPES, KS), itertools.product(CHUNKED_SHAPES, (3,)))
    for ((shape, layout), k), (name, margins) in itertools.product(combos, OP_MARGINS):
        yield pytest.param(name, shape, layout, k, margins,
                           id=f"{op_id(name, margins)}-{'x'.join(map(str, shape))}-{layout}-K{k}")


@pytest.mark.parametrize("name,shape,layout,k,margins", list(_cases()))
def test_matches_reference(name: str, shape: Sequence[int], layout: str, k: int, margins: bool) -> None:
    """Output and gradients for student, beta and every feature map equal the reference's."""
    inp = make_inputs(shape, k, layout=layout, margins=margins, seed=seed_of(name, shape, layout, k, margins))
    check_against_reference(name, inp, **F64)


# Which leaves require grad; "features[j]" is one map only.
SUBSETS = [("beta",), ("student",), ("features",), ("features[0]", "features[2]"), ("student", "features[1]")]


def _subset_cases() -> Iterator:
    for (name, margins), requires in itertools.product(OP_MARGINS, SUBSETS):
        if "student" in requires and name not in STUDENT_OPS:
            continue
        yield pytest.param(name, requires, margins, id=f"{op_id(name, margins)}-{'+'.join(requires)}")


@pytest.mark.parametrize("name,requires,margins", list(_subset_cases()))
def test_some_inputs_require_grad(name: str, requires: Sequence[str], margins: bool) -> None:
    """With only some inputs requiring grad, their gradients still equal the reference's, and the
    others get none."""
    inp = make_inputs((2, 3, 5, 7), 3, margins=margins, requires_grad=requires, seed=seed_of(name, requires))
    check_against_reference(name, inp, **F64)
    call(ops, name, inp).sum().backward()
    for t in inp.leaves():
        assert (t.grad is not None) == t.requires_grad


@pytest.mark.parametrize("name", OPS)
def test_nothing_requires_grad(name: str) -> None:
    """No input requires grad: the output equals the reference's and carries no grad_fn."""
    inp = make_inputs((2, 4, 3, 5), 4, requires_grad=(), seed=3)
    check_against_reference(name, inp, **F64)
    assert call(ops, name, inp).grad_fn is None


@pytest.mark.parametrize("name", OPS)
def test_output_shape_and_dtype(name: str) -> None:
    """aggregate returns the maps' shape and dtype; the losses are [B], float64 for float64 maps."""
    inp = make_inputs((3, 2, 4), 2, requires_grad=())
    out = call(ops, name, inp)
    assert out.dtype == torch.float64
    assert out.shape == ((3, 2, 4) if name == "aggregate" else (3,))
