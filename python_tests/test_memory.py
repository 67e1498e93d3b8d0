"""Memory: beyond the tensors it returns, an op allocates no feature-sized temporaries.

Every allocation made through PyTorch's CPU allocator during one call is recorded with
torch.profiler (profile_memory=True).  The bytes allocated minus the bytes of the returned tensors
must stay below 1/8 of one feature map, forward and backward.  The same measurement applied to the
pure-PyTorch reference (which materialises the weighted maps) must exceed that bound: this shows
the measurement sees kernel-internal allocations and the test can fail.  Allocations made with
plain malloc/new (std::vector partial sums, O(B * K) scalars) are not recorded and are not meant
to be.
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import List, Sequence, Tuple

import pytest
import torch

from dfa_ext import ops, reference
from dfa_helpers import MARGIN_OPS, OPS, Inputs, allocated_bytes, call, grad_leaves, make_inputs, upstream_like

SHAPE = (4, 8, 32, 32)  # one float32 map: 128 KiB
MAP_BYTES = 4 * 8 * 32 * 32 * 4
BOUND = MAP_BYTES // 8


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _inputs(name: str, layout: str, requires: Sequence[str]) -> Inputs:
    return make_inputs(SHAPE, 3, dtype=torch.float32, layout=layout, margins=name in MARGIN_OPS,
                       requires_grad=requires, seed=0)


def forward_extra_bytes(impl: ModuleType, name: str, inp: Inputs) -> Tuple[int, List[int]]:
    """Bytes allocated by one forward call beyond its output, and the allocation sizes."""
    call(impl, name, inp)  # warm-up
    out, sizes = allocated_bytes(lambda: call(impl, name, inp))
    return sum(sizes) - _nbytes([out]), sizes


def backward_extra_bytes(impl: ModuleType, name: str, inp: Inputs) -> Tuple[int, List[int]]:
    """Bytes allocated by one backward call beyond the gradients it returns, and the sizes."""
    leaves = grad_leaves(name, inp)
    out = call(impl, name, inp)
    g = upstream_like(out)
    torch.autograd.grad(out, leaves, g, retain_graph=True)  # warm-up
    grads, sizes = allocated_bytes(lambda: torch.autograd.grad(out, leaves, g))
    return sum(sizes) - _nbytes(grads), sizes


REQUIRES = {"all": ("student", "beta", "features"), "beta": ("beta",), "student": ("student",),
            "features": ("features",)}
CASES = [pytest.param(name, layout, req, id=f"{name}-{layout}-grad_{req}")
         for name, layout, req in itertools.product(OPS, ("contiguous", "channels_last"), REQUIRES)
         if not (req == "student" and name == "aggregate")]


@pytest.mark.parametrize("name,layout,requires", CASES)
def test_forward_allocates_no_map_sized_temporaries(name: str, layout: str, requires: str) -> None:
    extra, sizes = forward_extra_bytes(ops, name, _inputs(name, layout, REQUIRES[requires]))
    assert extra < BOUND, f"allocated {sizes} beyond the output"


@pytest.mark.parametrize("name,layout,requires", CASES)
def test_backward_allocates_no_map_sized_temporaries(name: str, layout: str, requires: str) -> None:
    extra, sizes = backward_extra_bytes(ops, name, _inputs(name, layout, REQUIRES[requires]))
    assert extra < BOUND, f"allocated {sizes} beyond the gradients"


@pytest.mark.parametrize("name", OPS)
def test_measurement_flags_the_reference(name: str) -> None:
    """The reference allocates temporaries the size of a map: the measurement must see them."""
    inp = _inputs(name, "contiguous", REQUIRES["all"])
    assert forward_extra_bytes(reference, name, inp)[0] >= MAP_BYTES
    assert backward_extra_bytes(reference, name, inp)[0] >= MAP_BYTES
