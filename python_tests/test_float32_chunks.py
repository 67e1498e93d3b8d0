"""float32 values and gradients vs the float64 reference, on samples that span several CPU kernel
chunks, in the layouts the trainers use (channels_last, contiguous, and mixes of the two).

The trainers call the ops on float32 maps with float32 beta and margins.  The other float32
comparisons (test_edge_values, test_low_precision) use samples of at most 120 elements, so in
float32 nothing reached a second 16384-element chunk (kChunk in csrc/cpu/map_job.h) or a ragged
last 512-element block (kBlock).

SHAPE = (2, 5, 61, 119) gives N = 36295 elements per sample: two whole chunks and a third of 3527
elements, which ends in a 455-element block (not a multiple of the 8-float SIMD pack nor of the
32-element 4-chain stride, so the scalar tails of every reduction run).  Contiguous channels of
7259 elements straddle the chunk borders; in channels_last the 5 channels rotate within each block.

Tolerance.  The reference runs in float64 on the same float32 values, so the difference is the
kernels' float32 rounding alone (unit roundoff u = 6e-8).  Element-wise outputs take about K + 2
float32 roundings; sums are float32 within a 512-element block (16 terms per lane of 32
accumulators, then a fixed tree of 5 levels: at most ~21 roundings per term) and float64 across
blocks and chunks, so their error is at most ~21 u = 1.3e-6 times the sum of |terms|.  That scheme
is the kernels' own, the same on every CPU and in both builds of the CPU kernels (AVX2 + FMA, and
the baseline one that ``ATEN_CPU_CAPABILITY=default`` selects; they differ only in whether a
multiply-add rounds once or twice), and the inputs are seeded: the sums of |terms| are properties
of this test, not of the CPU.  These random maps keep them within a few times the result (the beta
gradients add the softmax Jacobian's cancellation).  The largest error seen is 6.4e-7 of the
tensor's largest entry (a partial_l2 beta gradient; the same in both builds).  Each tensor is
compared with rtol = 1e-5 and atol = 1e-5 * max|reference| (~170 u, 15x the largest error seen, 7x
the worst case for terms summing to the result).  The float32 *reference* is no control here: its
bridge formula loses 7.9e-5 of beta's gradient to cancellation, 100x the kernels' error.  A chunk
or block mishandled, a channel lookup off by one, or alpha off by 1e-3 moves some entry by far
more: test_control_perturbations_fail shows that the check rejects a 1e-3 change of beta or of
one element in the ragged tail.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from dfa_ext import ops, reference
from dfa_helpers import (MARGIN_OPS, OP_MARGINS, OPS, Inputs, call, grad_leaves, inputs_in, make_inputs, op_id,
                         seed_of, to_layout, upstream_like)

CHUNK = 16384  # kChunk in csrc/cpu/map_job.h: elements per work item (one chunk of one sample)
BLOCK = 512  # kBlock in csrc/cpu/map_job.h: elements staged at a time
SHAPE = (2, 5, 61, 119)
N = SHAPE[1] * SHAPE[2] * SHAPE[3]
# K = 3 is one group of 3 maps in the CPU kernels' 4-map groups; K = 6 a group of 4 and one of 2.
KS = (3, 6)
RTOL = 1e-5  # see the module docstring

# The kernels' results do not depend on the thread count (chunks are reduced in a fixed order);
# one thread keeps these ~80k-element calls quick on a busy machine.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.rounding]


def test_shape_spans_chunks_and_a_ragged_tail() -> None:
    """The premise of this module: several chunks per sample, a partial last chunk and block."""
    assert N > 2 * CHUNK and N % CHUNK % BLOCK != 0 and N % CHUNK % 32 != 0
    assert (SHAPE[2] * SHAPE[3]) % CHUNK != 0 and CHUNK % (SHAPE[2] * SHAPE[3]) != 0  # channels straddle chunks


def _value_and_grads(impl, name: str, inp: Inputs, upstream: torch.Tensor) -> List[torch.Tensor]:
    out = call(impl, name, inp)
    return [out, *torch.autograd.grad(out, grad_leaves(name, inp), upstream.to(out.dtype))]


def _labels(name: str, inp: Inputs) -> List[str]:
    leaves = grad_leaves(name, inp)
    return ["output"] + [("student" if t is inp.student else "beta" if t is inp.beta
                          else f"features[{next(j for j, f in enumerate(inp.features) if f is t)}]")
                         for t in leaves]


def check_float32_against_float64_reference(name: str, inp: Inputs, ref_inp: Optional[Inputs] = None,
                                            upstream: Optional[torch.Tensor] = None) -> None:
    """Output and every gradient of a float32 call equal the float64 reference on the same values
    (or on ``ref_inp``, for the controls): dtype float32, same shape, within the module's tolerance."""
    out = call(ops, name, inp)
    upstream = upstream_like(out) if upstream is None else upstream
    fused = _value_and_grads(ops, name, inp, upstream)
    expected = _value_and_grads(reference, name, inputs_in(inp) if ref_inp is None else ref_inp, upstream)
    assert len(fused) == len(expected)
    for what, actual, exp in zip(_labels(name, inp), fused, expected):
        assert actual.dtype == torch.float32, (what, actual.dtype)
        assert actual.shape == exp.shape, (what, actual.shape, exp.shape)
        exp = exp.detach()
        torch.testing.assert_close(actual.detach().double(), exp, rtol=RTOL, atol=RTOL * float(exp.abs().max()),
                                   msg=lambda m, what=what: f"{name} {what}: {m}")


def _float32_inputs(k: int, margins: bool, layout: str, seed: int) -> Inputs:
    """float32 maps, student, beta and margins of SHAPE, every map in ``layout``."""
    return make_inputs(SHAPE, k, dtype=torch.float32, layout=layout, margins=margins, seed=seed)


def _cases():
    for k, layout, (name, margins) in itertools.product(KS, ("contiguous", "channels_last"), OP_MARGINS):
        yield pytest.param(name, margins, layout, k, id=f"{op_id(name, margins)}-{layout}-K{k}")


@pytest.mark.parametrize("name,margins,layout,k", list(_cases()))
def test_float32_matches_float64_reference(name: str, margins: bool, layout: str, k: int) -> None:
    """float32 output, student, beta and feature gradients across three chunks per sample equal
    the float64 reference within float32 accumulation error."""
    inp = _float32_inputs(k, margins, layout, seed=seed_of(name, margins, layout, k))
    check_float32_against_float64_reference(name, inp)


# Layout mixes that the trainers produce: channels_last teacher maps with a contiguous connector
# output (the student is kept contiguous when oneDNN would get its convolutions wrong in
# channels_last, see dfa_ext/training/run_options.py), some teacher layers contiguous among
# channels_last ones, and the reverse.
MIXES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "features_cl-student_contiguous": (("channels_last",) * 4, "contiguous"),
    "features_mixed-student_cl": (("channels_last", "contiguous", "channels_last", "contiguous"), "channels_last"),
    "features_contiguous_first-student_cl": (("contiguous", "channels_last", "channels_last", "channels_last"),
                                             "channels_last"),
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("name", OPS)
def test_float32_mixed_layouts(name: str, mix: str) -> None:
    """Maps of one call in different layouts (the kernels bring them to the first map's layout)
    give the float64 reference's values and gradients; the gradients keep each input's layout."""
    features_layouts, student_layout = MIXES[mix]
    base = _float32_inputs(len(features_layouts), name in MARGIN_OPS, "contiguous", seed=seed_of(name, mix))
    inp = Inputs(to_layout(base.student, student_layout).requires_grad_(),
                 [to_layout(f, lay).requires_grad_() for f, lay in zip(base.features, features_layouts)],
                 base.beta, base.margins)
    check_float32_against_float64_reference(name, inp)
    out = call(ops, name, inp)
    grads = torch.autograd.grad(out, grad_leaves(name, inp), upstream_like(out))
    for g, leaf in zip(grads, grad_leaves(name, inp)):
        if leaf is not inp.beta:
            assert g.stride() == leaf.stride()


@pytest.mark.parametrize("margins", (False, True), ids=("nom", "m"))
def test_float32_upstream_gradient_in_another_layout(margins: bool) -> None:
    """A contiguous upstream gradient of a channels_last aggregation (autograd hands over whatever
    layout the next op produced) is brought to the maps' layout: the float32 gradients still equal
    the reference's."""
    inp = _float32_inputs(4, margins, "channels_last", seed=seed_of("upstream", margins))
    upstream = upstream_like(call(ops, "aggregate", inp)).contiguous()
    assert not upstream.is_contiguous(memory_format=torch.channels_last)
    check_float32_against_float64_reference("aggregate", inp, upstream=upstream)


def _perturbed(inp: Inputs, where: str) -> Inputs:
    """A float64 copy of ``inp`` with beta[0], or one element of features[1] or of the student, moved
    by 1e-3.  The element is the first one of the last (ragged) block of the last sample where the
    change enters the result: a map element above its margin, a student element inside the partial
    L2 mask."""
    ref = inputs_in(inp)
    with torch.no_grad():
        if where == "beta":
            ref.beta[0] += 1e-3
            return ref
        target = ref.features[1] if where == "feature" else ref.student
        sample = target[1].flatten()  # logical (contiguous) element order of sample 1
        enters = torch.ones_like(sample, dtype=torch.bool)
        if where == "feature" and ref.margins is not None:
            enters = sample > ref.margins[1].repeat_interleave(N // SHAPE[1]) + 1e-3
        if where == "student":
            t = reference.aggregate(ref.features, ref.beta, ref.margins)[1].flatten()
            enters = (sample > t) | (t > 0)
        last_block_start = N - N % CHUNK % BLOCK
        flat_index = last_block_start + int(torch.nonzero(enters[last_block_start:])[0])
        idx = torch.unravel_index(torch.tensor(flat_index), SHAPE[1:])
        target[(1, *(int(i) for i in idx))] += 1e-3
    return ref


CONTROLS = [(name, margins, "beta") for name, margins in OP_MARGINS] + [
    ("aggregate", False, "feature"), ("aggregate", True, "feature"), ("partial_l2", True, "student")]


@pytest.mark.parametrize("name,margins,where", CONTROLS,
                         ids=[f"{op_id(n, m)}-{w}" for n, m, w in CONTROLS])
def test_control_perturbations_fail(name: str, margins: bool, where: str) -> None:
    """Control for the tolerance: the float32 results compared with the reference on inputs where
    beta[0] or one element moved by 1e-3 must fail the check (so the tolerance is tight enough to
    see a wrong alpha or one wrong element in the ragged tail)."""
    inp = _float32_inputs(3, margins, "channels_last", seed=seed_of(name, margins, "channels_last", 3))
    check_float32_against_float64_reference(name, inp)  # the unperturbed comparison passes
    with pytest.raises(AssertionError):
        check_float32_against_float64_reference(name, inp, ref_inp=_perturbed(inp, where))
