"""bfloat16 and float16 maps vs the float32 reference evaluated on the same values upcast to float32,
and the autocast combination (bf16 maps from a conv, float32 beta and margins).

Tolerances. The kernels compute in float32 like the reference; the results differ by float32
summation order and by the one rounding of a 16-bit result, which the format's unit roundoff u
bounds on any CPU (round to nearest: bfloat16 u = 2**-8, float16 u = 2**-11):
* 16-bit results (aggregate output, student and feature gradients): rtol = 2 ulp = 4u of the format
  (bfloat16 2**-7, float16 2**-9): both paths round a float32 value to the 16-bit format, and
  float32 values within a few float32 ulps of each other round to the same or a neighbouring
  16-bit value; atol = 1e-5 for results near 0.
* float32 results (the losses, and beta gradients when beta is float32): compared with their
  float64 value on the same values, calibrated by the float32 reference's distance from it
  (rounding.assert_rounding_like_control: 30x, and a result 1 % off fails by >= 5x).
* beta gradients in a 16-bit beta dtype: the 16-bit tolerance, atol scaled by the largest entry.
* autocast (bf16 convolutions on both paths, float32 beta): both paths get the same bf16 maps and
  sum beta's gradient in float32, so it is compared with its float64 value from the same maps,
  calibrated by the reference's float32 gradient (dfa_helpers.check_autocast_gradients; bound
  ~1.5e-5 of the largest entry, measured 1e-7; a gradient 1 % off fails, asserted). The conv
  weights' gradients come through the bf16 conv backward from bf16 feature gradients that may
  round to the neighbouring bf16 value on one path (1 ulp, 2**-8 of the element): 2 ulp of
  bfloat16 relative to the largest entry (measured: <= 3e-3 over 30 seeds, 0 on the test's).
"""

from __future__ import annotations

import itertools
from typing import Dict, List

import pytest
import torch

from dfa_ext import ops, reference
from dfa_helpers import (OP_MARGINS, Inputs, call, check_autocast_gradients, grad_leaves, inputs_in, make_inputs, op_id,
                         seed_of, upstream_like)
from rounding import assert_rounding_like_control

HALF_TOL: Dict[torch.dtype, Dict[str, float]] = {
    torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-5),
    torch.float16: dict(rtol=2.0 ** -9, atol=1e-5),
}

pytestmark = pytest.mark.rounding  # float bounds that must hold on any CPU (rounding.py)


def _reference(name: str, inp: Inputs, upstream: torch.Tensor, dtype: torch.dtype) -> List[torch.Tensor]:
    """The reference's output and gradients on ``inp``'s values in ``dtype``."""
    ref_inp = inputs_in(inp, dtype)
    out = call(reference, name, ref_inp)
    return [out, *torch.autograd.grad(out, grad_leaves(name, ref_inp), upstream.to(dtype))]


def check_half_against_float32_reference(name: str, inp: Inputs) -> None:
    """Output and every gradient of a 16-bit call equal the float32 reference on the same values:
    16-bit results within HALF_TOL, float32 results (module docstring) as close to their float64
    value as the float32 reference's."""
    out = call(ops, name, inp)
    assert out.dtype == (inp.features[0].dtype if name == "aggregate" else torch.float32)
    assert out.device == inp.features[0].device
    upstream = upstream_like(out)
    fused = [out, *torch.autograd.grad(out, grad_leaves(name, inp), upstream)]
    expected = _reference(name, inp, upstream, torch.float32)
    exact = _reference(name, inp, upstream, torch.float64)
    leaves = [None, *grad_leaves(name, inp)]
    labels = ["output"] + [("beta" if t is inp.beta else "student" if t is inp.student else "feature")
                           for t in leaves[1:]]
    float32 = []
    for what, got, ref, value, leaf in zip(labels, fused, expected, exact, leaves):
        assert leaf is None or (got.dtype == leaf.dtype and got.shape == leaf.shape), what
        if got.dtype == torch.float32:
            float32.append((got, ref, value, f"{name} {what}"))
            continue
        tol = dict(HALF_TOL[got.dtype])
        if leaf is inp.beta:
            tol["atol"] = tol["rtol"] * float(ref.abs().max())  # a difference of large terms, then rounded
        torch.testing.assert_close(got.float(), ref, **tol, msg=lambda m, what=what: f"{name} {what}: {m}")
    if float32:
        assert_rounding_like_control(*map(list, zip(*float32)))


def _cases():
    for dtype, (name, margins), layout, beta_half in itertools.product(
            HALF_TOL, OP_MARGINS, ("contiguous", "channels_last"), (False, True)):
        yield pytest.param(dtype, name, layout, beta_half, margins,
                           id=f"{str(dtype)[6:]}-{op_id(name, margins)}-{layout}-beta_{'half' if beta_half else 'f32'}")


@pytest.mark.parametrize("dtype,name,layout,beta_half,margins", list(_cases()))
def test_half_matches_float32_reference(dtype: torch.dtype, name: str, layout: str, beta_half: bool,
                                        margins: bool) -> None:
    """Outputs and all gradients of 16-bit calls equal the float32 reference within the stated tolerance."""
    inp = make_inputs((2, 4, 6, 5), 3, dtype=dtype, layout=layout, margins=margins,
                      beta_dtype=dtype if beta_half else torch.float32, seed=seed_of(dtype, name, layout))
    check_half_against_float32_reference(name, inp)


def test_autocast_bf16_maps_float32_beta() -> None:
    """Under autocast the ops take bf16 maps with float32 beta and margins; gradients reach beta
    (float32) and the conv weights, and equal the reference's under the same autocast."""
    check_autocast_gradients("cpu", torch.bfloat16, HALF_TOL[torch.bfloat16]["rtol"])
