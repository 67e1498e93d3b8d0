"""bfloat16 and float16 maps vs the float32 reference evaluated on the same values upcast to float32,
and the autocast combination (bf16 maps from a conv, float32 beta and margins).

Tolerances (the kernels compute in float32 like the reference; only summation order differs and
16-bit results are rounded once):
* 16-bit results (aggregate output, student and feature gradients): rtol = 2 ulp of the format
  (bfloat16 2**-7, float16 2**-9), atol = 1e-5.
* float32 results (the losses, and beta gradients when beta is float32): rtol = atol = 1e-4.
* beta gradients in a 16-bit beta dtype: the 16-bit tolerance, atol scaled by the largest entry.
* autocast (bf16 convolutions on both paths, float32 beta): both paths get the same bf16 maps.
  The beta gradient is summed in float32 from them on both sides (the reference upcasts, the
  kernels accumulate in float32), so it gets the float32 tolerance, 1e-4 relative to its largest
  entry (measured, op by op: <= 5e-6 over 30 seeds, <= 7e-7 on the test's); a gradient 1 % off
  must fail it. The conv weights' gradients come through the bf16 conv backward from 16-bit
  feature gradients that may round to the neighbouring bf16 value (1 ulp, 2**-8): 2 ulp of
  bfloat16 relative to the largest entry (measured: <= 3e-3 over 30 seeds, 0 on the test's).
"""

from __future__ import annotations

import itertools
from typing import Dict

import pytest
import torch

from dfa_ext import ops, reference
from dfa_helpers import (OP_MARGINS, Inputs, call, check_autocast_gradients, grad_leaves, make_inputs, op_id, seed_of,
                         upstream_like)

HALF_TOL: Dict[torch.dtype, Dict[str, float]] = {
    torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-5),
    torch.float16: dict(rtol=2.0 ** -9, atol=1e-5),
}
F32_TOL = dict(rtol=1e-4, atol=1e-4)
AUTOCAST_BETA_RTOL = 1e-4  # float32 beta gradient from bf16 maps (module docstring)


def _upcast(inp: Inputs) -> Inputs:
    """The same values in float32, as fresh leaves with the same requires_grad flags."""
    def up(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().requires_grad_(t.requires_grad)

    return Inputs(up(inp.student), [up(f) for f in inp.features], up(inp.beta),
                  None if inp.margins is None else inp.margins.float())


def _tol(t: torch.Tensor) -> Dict[str, float]:
    return HALF_TOL[t.dtype] if t.dtype in HALF_TOL else F32_TOL


def check_half_against_float32_reference(name: str, inp: Inputs) -> None:
    """Output and every gradient of a 16-bit call equal the float32 reference on the same values."""
    out = call(ops, name, inp)
    assert out.dtype == (inp.features[0].dtype if name == "aggregate" else torch.float32)
    assert out.device == inp.features[0].device
    upstream = upstream_like(out)
    grads = torch.autograd.grad(out, grad_leaves(name, inp), upstream)

    ref_inp = _upcast(inp)
    ref_out = call(reference, name, ref_inp)
    ref_grads = torch.autograd.grad(ref_out, grad_leaves(name, ref_inp), upstream.float())

    torch.testing.assert_close(out.float(), ref_out, **_tol(out))
    for g, rg, leaf in zip(grads, ref_grads, grad_leaves(name, inp)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        tol = dict(_tol(g))
        if leaf is inp.beta and g.dtype in HALF_TOL:
            tol["atol"] = tol["rtol"] * float(rg.abs().max())  # a difference of large terms, then rounded
        torch.testing.assert_close(g.float(), rg, **tol)


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
    check_autocast_gradients("cpu", torch.bfloat16, AUTOCAST_BETA_RTOL, HALF_TOL[torch.bfloat16]["rtol"])
