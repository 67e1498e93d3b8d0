"""The suite's float tolerances, each derived or calibrated here, in one place.

CPUs round differently: oneDNN and ATen pick kernels by instruction set (SSE4.1, AVX2, AVX-512;
``ONEDNN_MAX_CPU_ISA`` and ``ATEN_CPU_CAPABILITY`` let one machine run a lesser one's), and so do
the dfa CPU kernels (``dfa_ext.kernels()["cpu_isa"]``). A tolerance measured on one CPU holds that
CPU's rounding, not the computation's, so every comparison of two float computations that are not
expected to agree bitwise uses one of these:

* :data:`F64`: two float64 evaluations of the same formula (error analysis below).
* :data:`FLOAT64_RUN_BOUND`: two float64 *training runs* that compute the same sums in another
  order (processes vs one process, compiled vs eager, fused vs reference kernels).
* :func:`assert_rounding_like_control`: a float32 computation compared with its float64 value,
  calibrated in the same run by a float32 control of the same computation (eager vs compiled,
  reference vs fused), with the negative control that a 1 % error fails by far.
* Tolerances derived from the unit roundoff of a 16-bit format (test_low_precision.py) or from an
  op's float32 accumulation scheme (test_float32_chunks.py), stated where they are used.

Unit roundoffs u (half the distance from 1 to the next number): float64 2**-53 = 1.1e-16,
float32 2**-24 = 6.0e-8, bfloat16 2**-8 = 3.9e-3, float16 2**-11 = 4.9e-4. IEEE-754 rounds each
operation to nearest on every CPU; what differs between CPUs is which operations there are (the
order of a sum, whether a multiply-add is fused), never the size of one rounding.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

U64 = 2.0 ** -53
U32 = 2.0 ** -24

# Float64 results of one formula computed in two ways (fused vs reference kernels, another
# summation order). An element-wise result takes a few roundings: ~10 u = 1e-15 relative. A sum of
# n terms computed in any order is within (n - 1) u sum|t| of the exact sum (Higham, "Accuracy and
# Stability of Numerical Algorithms", 2002, eq. 4.4), and with high probability within
# lambda sqrt(n) u sum|t|, lambda ~ 3 (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019). The
# suite's float64 sums have n <= 4e4 products of standard-normal values: sum|t| ~ 0.64 n, and
# |sum| ~ sqrt(n) (random signs) or ~ n (squares). So the error is <= 3 * 200 * 1.1e-16 * 2.6e4 / 200
# = 9e-12 of a random-sign sum (with high probability) and <= 4e4 u = 4.4e-12 of a sum of squares
# (always). rtol = 1e-10 is 10x the first; atol = 1e-10 covers results near 0. A wrong formula (a
# missing term, alpha off by 1e-6) moves a result by >= 1e-6 of itself: 1e4 x the tolerance.
F64 = dict(rtol=1e-10, atol=1e-10)

# Two float64 training runs that compute the same sums in another order (two processes sum half
# batches that one process sums whole; a compiled step fuses what eager runs op by op; the fused
# kernels reduce in blocks what the reference reduces with ATen). Their float32 versions drift
# apart by an amount no bound can hold: once a ReLU input rounds to the other side of 0 in one
# run, a whole element's contribution changes, and how often that happens depends on the CPU's
# kernels (the teacher runs of test_distributed.py end 9.3e-4 of a tensor's largest entry apart
# on an AVX2 CPU, 5.8e-3 on an AVX-512 one). In float64:
# * one step's sums differ by < (n - 1) u sum|t| (see F64) with n < 1e5 terms (a convolution's
#   weight gradient over batch and positions): < 1e5 u = 1.1e-11 of their terms' size;
# * a ReLU input flips between the runs only if it lies that close to 0: with ~1e7 inputs per run
#   spread over O(1), ~1e7 x 1e-11 = 1e-4 flips are expected, i.e. none; without flips training
#   is a smooth map of the weights, which carries a difference along without jumps;
# * the bound, 1e-8 of a tensor's largest entry, is 1e3 x one step's worst-case rounding: it
#   allows a run to amplify rounding a thousandfold. The suite's runs (<= 44 steps) end 5e-15
#   (teacher, 2 processes vs 1) to 9e-14 (distillation) apart, measured: below one step's worst
#   case, i.e. no amplification at all.
# Bugs of the kinds these comparisons exist for are 1e-6 (a beta gradient 1e-6 off) to 1.6
# (per-process BatchNorm) away: each test asserts its negative control.
FLOAT64_RUN_BOUND = 1e-8

# How much further from the exact (float64) value a float32 computation may be than a float32
# control of the same computation, calibrated in the same run: both round the same terms, in
# another order or another fusion (measured: up to 3.1x for compiled vs eager steps and fused vs
# reference distillers, 5.4x for the emulated CUDA kernels vs the CPU ones). A 30x allowance; and a
# control error below 32 u of the largest entry counts as 32 u: a float32 sum of n terms in
# another order moves by ~sqrt(n) u of its terms, ~32 u for the n ~ 1e3 of these tests, so a
# control that happens to be closer (or exact) must not set the scale.
ROUNDING_FACTOR = 30.0
ROUNDING_FLOOR = 32 * U32


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Builds and trains in ``dtype`` (networks, data and the dfa ops follow torch's default
    dtype), restoring the previous default afterwards."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


# DFA_ROUNDING_REPORT=FILE: every check below appends a line to FILE (test, what, error, bound), so
# a run on another CPU shows each bound's margin there (python_tests/report_rounding.py sums up).
REPORT = os.environ.get("DFA_ROUNDING_REPORT")


def record(what: str, error: float, bound: float) -> None:
    """Appends one check to the DFA_ROUNDING_REPORT file, when set."""
    if REPORT:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(REPORT, "a") as f:
            f.write(f"{test}\t{what}\t{error:.3e}\t{bound:.3e}\n")


FLOAT32_TINY = torch.finfo(torch.float32).tiny  # 1.2e-38: below it float32 flushes what float64 keeps


def relative_error(actual: torch.Tensor, exact: torch.Tensor, scale: float = FLOAT32_TINY) -> float:
    """max |actual - exact| / max(max |exact|, ``scale``): rounding is relative to a tensor's terms,
    not to an entry that nearly cancels, so errors are measured against the tensor's largest entry.
    ``scale`` is the size below which a tensor is compared absolutely: float32's smallest normal
    number by default (a float64 value of 1e-70 is 0 in float32), the size of its terms for a
    tensor that is 0 in exact arithmetic (it holds only rounding noise)."""
    exact = exact.detach().double()
    largest = float(exact.abs().max()) if exact.numel() else 0.0
    return float((actual.detach().double() - exact).abs().max()) / max(largest, scale)


def assert_rounding_like_control(candidates: Sequence[torch.Tensor], controls: Sequence[torch.Tensor],
                                 exact: Sequence[torch.Tensor], names: Sequence[str],
                                 factor: float = ROUNDING_FACTOR, scale: float = FLOAT32_TINY) -> tuple[float, float]:
    """Asserts that every float32 ``candidates[i]`` is within ``factor`` x ``controls[i]``'s
    :func:`relative_error` of ``exact[i]``, their value computed in float64, where ``controls[i]``
    is the same computation in float32 by a trusted path (eager, the reference kernels) and its
    error counts as at least :data:`ROUNDING_FLOOR` (``scale``: see :func:`relative_error`).

    Also asserts the negative control: every bound is below 2e-3, so that a tensor 1 % off (a
    wrong scale, a dropped term) fails by at least 5x. Returns (largest candidate error, largest
    bound)."""
    assert len(candidates) == len(controls) == len(exact) == len(names)
    worst, largest = 0.0, 0.0
    for name, candidate, control, value in zip(names, candidates, controls, exact):
        reference_error = max(relative_error(control, value, scale), ROUNDING_FLOOR)
        bound = factor * reference_error
        assert bound < 2e-3, (f"{name}: the float32 control is {reference_error:.2e} from float64, too far "
                              "for a 1 % error to show")
        error = relative_error(candidate, value, scale)
        record(name, error, bound)
        assert error <= bound, (f"{name}: {error:.3e} of its largest entry from the float64 value, more than "
                                f"{factor:g} x the float32 control's {reference_error:.3e}")
        worst, largest = max(worst, error), max(largest, bound)
    return worst, largest


def assert_float64_runs_agree(got: torch.Tensor, want: torch.Tensor, what: str, scale: float = FLOAT32_TINY) -> float:
    """Asserts that a result of a float64 run is within :data:`FLOAT64_RUN_BOUND` of the same
    result of another float64 run that computes the same sums in another order, relative to the
    tensor's largest entry (``scale``: see :func:`relative_error`); returns the error."""
    error = relative_error(got, want, scale)
    record(what, error, FLOAT64_RUN_BOUND)
    assert error <= FLOAT64_RUN_BOUND, f"{what}: {error:.3e} of its largest entry apart (bound {FLOAT64_RUN_BOUND:g})"
    return error
