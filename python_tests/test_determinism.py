"""Determinism: the same bits for 1 and 2 intra-op threads, and for two identical calls, for outputs
and every gradient, on maps of several 16384-element chunks per sample and many samples."""

from __future__ import annotations

from typing import List

import pytest
import torch

from dfa_ext import ops
from dfa_helpers import MARGIN_OPS, OPS, Inputs, bits, make_inputs, value_and_grads

# 8 samples of 4 * 96 * 128 = 49152 elements: 3 chunks of 16384 each.
SHAPE = (8, 4, 96, 128)


@pytest.fixture(scope="module")
def inputs() -> List[Inputs]:
    """float32 inputs, with and without margins, contiguous and channels_last."""
    return [make_inputs(SHAPE, 3, dtype=torch.float32, margins=m, layout=layout, seed=11)
            for m in (False, True) for layout in ("contiguous", "channels_last")]


def _run(name: str, inp: Inputs) -> List[torch.Tensor]:
    if inp.margins is not None and name not in MARGIN_OPS:
        inp = Inputs(inp.student, inp.features, inp.beta, None)
    out, grads = value_and_grads(ops, name, inp)  # the upstream gradient is drawn from a fixed seed
    return [out, *grads]


def _assert_same_bits(a: List[torch.Tensor], b: List[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(bits(x), bits(y))


@pytest.mark.parametrize("name", OPS)
def test_same_bits_for_one_and_two_threads(name: str, inputs: List[Inputs], restore_threads: None) -> None:
    """Outputs and gradients do not depend on the number of threads."""
    assert SHAPE[1] * SHAPE[2] * SHAPE[3] > 2 * 16384
    for inp in inputs:
        torch.set_num_threads(1)
        one = _run(name, inp)
        torch.set_num_threads(2)
        two = _run(name, inp)
        _assert_same_bits(one, two)


@pytest.mark.parametrize("name", OPS)
def test_repeated_calls_same_bits(name: str, inputs: List[Inputs]) -> None:
    """Two identical calls give identical outputs and gradients."""
    for inp in inputs:
        _assert_same_bits(_run(name, inp), _run(name, inp))
