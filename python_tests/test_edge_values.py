"""Edge values: empty batches and samples (N = 0, C = 0), NaN inputs, extreme beta, all-zero maps and
K = 64 maps, each vs the reference."""

from __future__ import annotations

import pytest
import torch

from dfa_ext import ops, reference
from dfa_helpers import (F64, OP_MARGINS, Inputs, assert_close_to_reference, call, check_against_reference,
                         check_float32_against_reference, grad_leaves, make_inputs, op_id, upstream_like,
                         value_and_grads)
from rounding import FLOAT32_TINY

pytestmark = pytest.mark.rounding  # float bounds that must hold on any CPU (rounding.py)


def _check(name: str, inp: Inputs, scale: float = FLOAT32_TINY) -> None:
    """float64 calls against the reference within F64; float32 ones against their float64 value,
    calibrated by the float32 reference (dfa_helpers.check_float32_against_reference; ``scale``:
    see rounding.relative_error)."""
    if inp.student.dtype == torch.float64:
        check_against_reference(name, inp, **F64)
    else:
        check_float32_against_reference(name, inp, scale)


def _margin_cases():
    return [pytest.param(name, m, id=op_id(name, m)) for name, m in OP_MARGINS]


@pytest.mark.parametrize("name,margins", _margin_cases())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch(name: str, margins: bool, layout: str) -> None:
    """B = 0 gives an empty result ([0, ...] for aggregate, [0] for the losses) and a working
    backward: empty map gradients and the reference's (zero) beta gradient."""
    inp = make_inputs((0, 3, 4, 5), 3, margins=margins, layout=layout)
    out, grads = value_and_grads(ops, name, inp)
    assert out.shape == ((0, 3, 4, 5) if name == "aggregate" else (0,))
    check_against_reference(name, inp, **F64)
    for g, leaf in zip(grads, grad_leaves(name, inp)):
        assert g.shape == leaf.shape


NAN_AT = (1, 2, 3, 4)  # the poisoned element: sample 1



def _nan_cases():
    cases = []
    for name, margins in OP_MARGINS:
        for where in ("feature", "student"):
            if where == "student" and name == "aggregate":
                continue  # aggregate takes no student
            cases.append(pytest.param(name, margins, where,
                                      id=f"{op_id(name, margins)}-nan_in_{where}"))
    return cases


def _with_nan(name: str, margins: bool, where: str) -> Inputs:
    inp = make_inputs((3, 4, 5, 6), 3, margins=margins, seed=5)
    with torch.no_grad():
        (inp.features[1] if where == "feature" else inp.student)[NAN_AT] = float("nan")
    return inp


@pytest.mark.parametrize("name,margins,where", _nan_cases())
def test_nan_output(name: str, margins: bool, where: str) -> None:
    """A NaN in a feature map or the student gives NaN exactly where the reference has NaN (the
    element for aggregate, the sample for the losses), not a crash or a finite value."""
    inp = _with_nan(name, margins, where)
    out = call(ops, name, inp)
    ref = call(reference, name, inp)
    assert out.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close_to_reference(out, ref, **F64)


@pytest.mark.parametrize("name,margins,where", _nan_cases())
def test_nan_gradients(name: str, margins: bool, where: str) -> None:
    """Backward runs and its gradients equal the reference's, NaN where the reference has NaN.
    Only the poisoned element itself is left out of map gradients (the derivative at a NaN input
    is undefined: NaN * 0 there may give NaN or 0)."""
    inp = _with_nan(name, margins, where)
    out, grads = value_and_grads(ops, name, inp)
    _, ref_grads = value_and_grads(reference, name, inp, upstream=upstream_like(out))
    for g, rg in zip(grads, ref_grads):
        if g.dim() == 4:
            g, rg = g.clone(), rg.clone()
            g[NAN_AT] = rg[NAN_AT] = 0.0
        assert_close_to_reference(g, rg, **F64)


@pytest.mark.parametrize("name,margins", _margin_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_beta(name: str, margins: bool, dtype: torch.dtype) -> None:
    """softmax of beta = [80, -80, 79] does not overflow: finite values and gradients equal to the
    reference's."""
    inp = make_inputs((2, 3, 4, 5), 3, dtype=dtype, margins=margins, seed=9)
    with torch.no_grad():
        inp.beta.copy_(torch.tensor([80.0, -80.0, 79.0]))
    out, grads = value_and_grads(ops, name, inp)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    _check(name, inp)


@pytest.mark.parametrize("zero", ["features", "student", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bridge_zero_maps(zero: str, dtype: torch.dtype) -> None:
    """bridge_st_loss with all-zero feature maps (or student) gives a finite loss and finite
    gradients for student and beta, equal to the reference's (eps bounds the norms)."""
    inp = make_inputs((2, 3, 4, 5), 3, dtype=dtype, requires_grad=("student", "beta"), seed=2)
    with torch.no_grad():
        if zero in ("features", "both"):
            for f in inp.features:
                f.zero_()
        if zero in ("student", "both"):
            inp.student.zero_()
    out, grads = value_and_grads(ops, "bridge_st_loss", inp)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # Gradients that are 0 in exact arithmetic (the loss is 1 whatever a zero side's partner)
    # hold only rounding noise of their O(1) terms: compared at that scale.
    _check("bridge_st_loss", inp, scale=1.0)


def test_bridge_scale_invariance() -> None:
    """bridge_st_loss is a cosine loss: scaling the student by 1e-3 or 1e3 does not change it
    (checked against the reference on the unscaled input)."""
    inp = make_inputs((2, 3, 4, 5), 2, requires_grad=(), seed=4)
    expected = call(reference, "bridge_st_loss", inp)
    for scale in (1e-3, 1e3):
        scaled = Inputs(inp.student * scale, inp.features, inp.beta, None)
        torch.testing.assert_close(call(ops, "bridge_st_loss", scaled), expected, rtol=1e-10, atol=1e-10)


# Empty samples with B > 0: N = 0 through an empty spatial dim, and C = 0 (margins [K, 0]).
EMPTY_SAMPLE_SHAPES = {"N0": (2, 3, 0, 5), "C0": (2, 0, 4, 5)}


@pytest.mark.parametrize("name,margins", _margin_cases())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("empty", list(EMPTY_SAMPLE_SHAPES))
def test_empty_samples(name: str, margins: bool, layout: str, empty: str) -> None:
    """Samples without elements (N = 0, or C = 0) in a non-empty batch: the kernels get no work
    items yet must return the reference's per-sample losses (exactly 0 for each of the B samples,
    not uninitialised memory: checked on three calls, as leftover memory is often 0 or a denormal
    within any tolerance), an empty aggregation, empty map gradients and a zero beta gradient."""
    shape = EMPTY_SAMPLE_SHAPES[empty]
    inp = make_inputs(shape, 3, margins=margins, layout=layout, seed=7)
    out, grads = value_and_grads(ops, name, inp)
    assert out.shape == (shape if name == "aggregate" else (2,))
    check_against_reference(name, inp, **F64)
    if name != "aggregate":
        for _ in range(3):
            assert torch.equal(call(ops, name, inp), torch.zeros(2, dtype=torch.float64))
    for g, leaf in zip(grads, grad_leaves(name, inp)):
        assert g.shape == leaf.shape
        if leaf is inp.beta:
            assert torch.equal(g, torch.zeros_like(g))


MAX_K = 64  # the most maps per call on CUDA (kMaxK in csrc/cuda/map_kernels.cuh); CPU has no limit


@pytest.mark.parametrize("name,margins", _margin_cases())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_feature_maps(name: str, margins: bool, layout: str) -> None:
    """K = 64 maps (16 of the CPU kernels' 4-map groups; the CUDA limit) give the reference's values
    and gradients for every map."""
    inp = make_inputs((2, 3, 4, 5), MAX_K, margins=margins, layout=layout, seed=8)
    check_against_reference(name, inp, **F64)


@pytest.mark.parametrize("name,margins", _margin_cases())
def test_cpu_takes_more_maps_than_the_cuda_limit(name: str, margins: bool) -> None:
    """The 64-map limit is the CUDA kernels' alone (their map pointers are passed by value): K = 65
    maps on CPU, through torch.ops.dfa directly, give the reference's values.  (On CUDA the C++ check
    raises a ValueError: cpp_tests/test_cuda_emulation.cpp and python_tests/test_cuda.py.)"""
    inp = make_inputs((2, 3, 4), MAX_K + 1, margins=margins, requires_grad=(), seed=9)
    if name == "aggregate":
        out = torch.ops.dfa.aggregate(inp.features, inp.beta, inp.margins)
    elif name == "bridge_st_loss":
        out = torch.ops.dfa.bridge_st_loss(inp.student, inp.features, inp.beta, 1e-12)
    else:
        out = torch.ops.dfa.partial_l2(inp.student, inp.features, inp.beta, inp.margins)
    assert_close_to_reference(out, call(reference, name, inp), **F64)
