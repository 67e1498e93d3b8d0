"""The CUDA kernels: the CPU suite's checks repeated on CUDA tensors, plus what only CUDA has.

* float64 values and gradients vs the reference (rtol = atol = 1e-10) on the CPU suite's random
  cases and on shapes chosen for the CUDA kernels: 16-byte vector path (every map pointer 16-byte
  aligned and elements per sample a multiple of 16 / sizeof(T)) and scalar path (odd sizes,
  storage-offset views), several 4096-element chunks per sample, K = 64 (the most per call) and
  K = 65 (a ValueError);
* float32 CUDA vs CPU, bfloat16/float16 vs the float32 reference (the CPU low-precision
  tolerances), autocast("cuda") with float32 beta and margins;
* gradcheck, opcheck of every dfa op, torch.compile(fullgraph=True), bitwise determinism, a
  non-default stream, bad devices, B = 0 and NaN.

Every test is skipped when no GPU is visible.  With a GPU visible but an extension built without
CUDA kernels, every test fails saying so.
"""

from __future__ import annotations

import itertools
import re
from typing import Dict, Iterator, List, Optional, Sequence, Set

import pytest
import torch

import dfa_ext
from dfa_ext import ops, reference
from dfa_helpers import (F64, LAYOUTS, MARGIN_OPS, OP_MARGINS, OPS, STUDENT_OPS, Inputs, assert_close_to_reference,
                         away_from_kinks, call, check_against_reference, check_autocast_gradients, grad_leaves,
                         inputs_in, make_inputs, memory_layout_of, op_id, seed_of, upstream_like, value_and_grads)
from rounding import assert_rounding_like_control
# The CPU tests' cases and helpers, reused so both devices run the same checks.
from test_compile import _objective
from test_determinism import SHAPE as DETERMINISM_SHAPE
from test_determinism import _assert_same_bits, _run
from test_edge_values import NAN_AT, _nan_cases
from test_gradcheck import _flat_fn
from test_layout import SHAPE_OF
from test_low_precision import HALF_TOL, check_half_against_float32_reference
from test_opcheck import OPS as OPCHECK_OPS
from test_opcheck import SAMPLES as OPCHECK_SAMPLES
from test_opcheck import Sample
from test_values_and_grads import CHUNKED_SHAPES, KS, SMALL_SHAPES, SUBSETS

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA GPU visible: CUDA kernels compiled but not run"),
    pytest.mark.cuda,
]

DEV = "cuda"
CHUNK = 4096  # elements per CUDA block: kThreads * kItems in csrc/cuda/map_kernels.cuh
MAX_K = 64  # kMaxK in csrc/cuda/map_kernels.cuh


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_built() -> None:
    """A visible GPU with an extension built without CUDA kernels is a build error, not a skip."""
    if not dfa_ext.kernels()["cuda_compiled"]:
        pytest.fail("a CUDA GPU is visible but dfa_ext was built without CUDA kernels "
                    "(dfa_ext.kernels()['cuda_compiled'] is False): rebuild with CUDA_HOME pointing at the "
                    "toolkit (and FORCE_CUDA=1 if the build machine has no GPU); setup.py prints which kernels "
                    "it built", pytrace=False)


def test_kernels_report_cuda() -> None:
    info = dfa_ext.kernels()
    assert info["cuda_compiled"] is True and info["cuda"] is True, info


# --------------------------------------------------------------------------------------------------
# helpers

def _compare_with_reference(name: str, inp: Inputs, upstream: Optional[torch.Tensor] = None, **tol) -> None:
    """Like dfa_helpers.check_against_reference, with an optional upstream gradient; also checks
    that every result stays on the GPU."""
    out, grads = value_and_grads(ops, name, inp, upstream)
    ref_out, ref_grads = value_and_grads(reference, name, inp, upstream=upstream_like(out) if upstream is None
                                         else upstream)
    assert out.device.type == "cuda" and all(g.device.type == "cuda" for g in grads)
    assert_close_to_reference(out, ref_out, **tol)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert_close_to_reference(g, rg, **tol)


def _offset_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data pointer sits one element past a 16-byte boundary
    (storage offset 1), so the CUDA kernels must take their scalar path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    with torch.no_grad():
        view.copy_(t)
    assert view.is_contiguous() and view.storage_offset() == 1 and view.data_ptr() % 16 != 0
    return view.detach().requires_grad_(t.requires_grad)


# --------------------------------------------------------------------------------------------------
# float64 values and gradients vs the reference

# Shapes for the CUDA kernels (K = 2 and 5): elements per sample N decide the path and the chunks.
CUDA_SHAPES = [
    ((4, 8, 16, 16), "contiguous"),          # N = 2048: 16-byte vectors for every dtype, one chunk
    ((4, 8, 16, 16), "channels_last"),
    ((3, 4, 64, 65), "contiguous"),          # N = 16640: vectors, 4 full chunks + a 256-element one
    ((3, 4, 64, 65), "channels_last"),
    ((2, 4, 32, 32, 5), "channels_last_3d"),  # N = 20480: exactly 5 full chunks
    ((3, 8200), "contiguous"),               # 2-D, N = 8200: vectors, 3 chunks
    ((2, 5, 67, 63), "channels_last"),       # N = 21105 (odd): scalar path, 6 chunks
]
CUDA_KS = (2, 5)


def _value_cases() -> Iterator:
    combos = itertools.chain(itertools.product(SMALL_SHAPES, KS), itertools.product(CHUNKED_SHAPES, (3,)),
                             itertools.product(CUDA_SHAPES, CUDA_KS))
    for ((shape, layout), k), (name, margins) in itertools.product(combos, OP_MARGINS):
        yield pytest.param(name, shape, layout, k, margins,
                           id=f"{op_id(name, margins)}-{'x'.join(map(str, shape))}-{layout}-K{k}")


@pytest.mark.parametrize("name,shape,layout,k,margins", list(_value_cases()))
def test_matches_reference(name: str, shape: Sequence[int], layout: str, k: int, margins: bool) -> None:
    """Output and gradients (student, beta, every feature map) equal the reference's, on CUDA."""
    inp = make_inputs(shape, k, layout=layout, margins=margins, seed=seed_of(name, shape, layout, k, margins),
                      device=DEV)
    _compare_with_reference(name, inp, **F64)
    if name == "aggregate":
        assert call(ops, name, inp).stride() == memory_layout_of(inp.features[0])


def _subset_cases() -> Iterator:
    for (name, margins), requires, shape in itertools.product(OP_MARGINS, SUBSETS, ((2, 3, 5, 7), (2, 4, 8, 8))):
        if "student" in requires and name not in STUDENT_OPS:
            continue
        yield pytest.param(name, requires, margins, shape,
                           id=f"{op_id(name, margins)}-{'+'.join(requires)}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("name,requires,margins,shape", list(_subset_cases()))
def test_some_inputs_require_grad(name: str, requires: Sequence[str], margins: bool, shape) -> None:
    """Only some inputs require grad (the kernels skip the other outputs): the gradients that are
    computed equal the reference's and the others stay None.  (2, 4, 8, 8): vector path."""
    inp = make_inputs(shape, 3, margins=margins, requires_grad=requires, seed=seed_of(name, requires, shape),
                      device=DEV)
    check_against_reference(name, inp, **F64)
    call(ops, name, inp).sum().backward()
    for t in inp.leaves():
        assert (t.grad is not None) == t.requires_grad


@pytest.mark.parametrize("layout,name,margins", [pytest.param(lay, n, m, id=f"{lay}-{op_id(n, m)}")
                                                 for lay in LAYOUTS for n, m in OP_MARGINS])
def test_every_layout(layout: str, name: str, margins: bool) -> None:
    """Every layout of the CPU layout tests (views with steps and permutations are copied to a
    kernel layout first): values, gradients and the strides of empty_like for map outputs."""
    inp = make_inputs(SHAPE_OF[layout], 3, layout=layout, margins=margins, seed=seed_of(layout, name, "cuda"),
                      device=DEV)
    _compare_with_reference(name, inp, **F64)
    out, grads = value_and_grads(ops, name, inp)
    if name == "aggregate":
        assert out.stride() == memory_layout_of(inp.features[0])
    for g, leaf in zip(grads, grad_leaves(name, inp)):
        if leaf is not inp.beta:
            assert g.stride() == memory_layout_of(leaf)


def _offset_cases() -> Iterator:
    for (name, margins), where, shape in itertools.product(OP_MARGINS, ("features[1]", "student", "upstream"),
                                                           ((4, 8, 16, 16), (2, 4, 64, 65))):
        if where == "student" and name not in STUDENT_OPS:
            continue  # aggregate takes no student
        if where == "upstream" and name != "aggregate":
            continue  # only aggregate's upstream gradient is a map (the losses' is [B])
        yield pytest.param(name, margins, where, shape,
                           id=f"{op_id(name, margins)}-offset_{where}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("name,margins,where,shape", list(_offset_cases()))
def test_storage_offset_breaks_alignment(name: str, margins: bool, where: str, shape) -> None:
    """A map whose data starts one element past a 16-byte boundary (a contiguous view with storage
    offset 1, used in place) sends the call down the scalar path, whose results equal the
    reference's; N = 16640 spans five chunks."""
    inp = make_inputs(shape, 3, margins=margins, seed=seed_of(name, margins, where, shape), device=DEV)
    upstream = None
    if where == "features[1]":
        inp.features[1] = _offset_view(inp.features[1])
    elif where == "student":
        inp.student = _offset_view(inp.student)
    else:
        with torch.no_grad():
            upstream = _offset_view(upstream_like(call(ops, name, inp)))
    _compare_with_reference(name, inp, upstream=upstream, **F64)


# --------------------------------------------------------------------------------------------------
# which path runs (read from the kernel names the profiler records)

def _kernel_vector_widths(fn) -> Set[int]:
    """The VEC template argument of every aggregate_forward_kernel<T, VEC> launched by fn()."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    names = {e.name for e in events} | {k.name for e in events for k in getattr(e, "kernels", [])}
    # demangled "aggregate_forward_kernel<float, 4>(...)" or mangled "aggregate_forward_kernelIfLi4EE..."
    pattern = re.compile(r"aggregate_forward_kernel(?:<[^,<>]+,\s*|I\w+?Li)(\d+)[>E]")
    widths = {int(m.group(1)) for n in names for m in [pattern.search(n)] if m}
    if not widths:
        kernels = sorted(n for n in names if "kernel" in n.lower())[:10]
        pytest.skip(f"the profiler recorded no aggregate_forward_kernel launch (CUPTI unavailable?): {kernels}")
    return widths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", ["aligned", "aligned_channels_last", "odd_n", "offset"])
def test_vector_or_scalar_path(case: str, dtype: torch.dtype) -> None:
    """Aligned maps with N % (16 / sizeof(T)) == 0 run the 16-byte kernels; odd N or one misaligned
    map runs the scalar ones (VEC = 1)."""
    shape = (3, 5, 7, 9) if case == "odd_n" else (4, 8, 16, 16)
    layout = "channels_last" if case == "aligned_channels_last" else "contiguous"
    inp = make_inputs(shape, 3, dtype=dtype, layout=layout, margins=True, requires_grad=(), seed=2, device=DEV)
    if case == "offset":
        inp.features[2] = _offset_view(inp.features[2])
    widths = _kernel_vector_widths(lambda: ops.aggregate(inp.features, inp.beta, inp.margins))
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    assert widths == ({vec} if case.startswith("aligned") else {1}), widths


# --------------------------------------------------------------------------------------------------
# K = 64 (the most one CUDA call takes) and K = 65

@pytest.mark.parametrize("name,margins", OP_MARGINS, ids=[op_id(n, m) for n, m in OP_MARGINS])
def test_max_feature_maps(name: str, margins: bool) -> None:
    """K = 64 maps (bridge_st_loss reduces 2K + 1 = 129 sums per block): values and gradients
    equal the reference's, over two chunks per sample."""
    inp = make_inputs((2, 3, 40, 40), MAX_K, margins=margins, seed=seed_of(name, margins, MAX_K), device=DEV)
    _compare_with_reference(name, inp, **F64)


@pytest.mark.parametrize("name", OPS)
def test_too_many_feature_maps(name: str) -> None:
    """K = 65 maps on CUDA: a ValueError saying at most 64 maps per call (not a crash or garbage)."""
    inp = make_inputs((2, 3, 4), MAX_K + 1, dtype=torch.float32, margins=name in MARGIN_OPS, requires_grad=(),
                      seed=1, device=DEV)
    with pytest.raises(ValueError, match=f"at most {MAX_K}"):
        call(ops, name, inp)
    torch.cuda.synchronize()  # nothing was launched that could fail later


@pytest.mark.parametrize("name", OPS)
def test_too_many_feature_maps_through_torch_ops(name: str) -> None:
    """The same through torch.ops.dfa (the C++ check), in a child process: on the H200 with torch
    2.11 this call once killed the process (SIGSEGV) instead of raising, which must not take the
    rest of the suite with it (bench/RESULTS.md)."""
    import subprocess
    import sys

    margins = f"torch.zeros({MAX_K + 1}, 3, device='cuda')" if name in MARGIN_OPS else "None"
    student = "torch.zeros(2, 3, 4, device='cuda'), " if name in STUDENT_OPS else ""
    tail = f", {margins}" if name in MARGIN_OPS else ""
    script = (f"import torch, dfa_ext\n"
              f"f = [torch.zeros(2, 3, 4, device='cuda') for _ in range({MAX_K + 1})]\n"
              f"try:\n"
              f"    torch.ops.dfa.{name}({student}f, torch.zeros({MAX_K + 1}, device='cuda'){tail})\n"
              f"except ValueError as e:\n"
              f"    print('ValueError:', e)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the process died (status {done.returncode}): {done.stderr[-2000:]}"
    assert f"at most {MAX_K}" in done.stdout, done.stdout + done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# float32 CUDA vs CPU; bfloat16 / float16 vs the float32 reference; autocast

F32_CASES = [((4, 8, 16, 16), "contiguous"), ((4, 8, 16, 16), "channels_last"), ((3, 5, 7, 9), "contiguous"),
             ((2, 3, 101, 61), "contiguous"), ((3, 4, 64, 64), "channels_last")]


@pytest.mark.parametrize("name,margins", OP_MARGINS, ids=[op_id(n, m) for n, m in OP_MARGINS])
@pytest.mark.parametrize("shape,layout", F32_CASES, ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in F32_CASES])
def test_float32_cuda_matches_cpu(name: str, margins: bool, shape, layout: str) -> None:
    """float32 outputs and gradients on CUDA are as close to their float64 value (the CPU kernels on
    the same values in float64) as the CPU kernels' float32 ones, within rounding.ROUNDING_FACTOR
    (the GPU's reductions run in another order; a fixed tolerance would hold one device's
    rounding); dtypes and strides match the CPU's."""
    seed = seed_of(name, margins, shape, layout)
    cpu = make_inputs(shape, 3, dtype=torch.float32, layout=layout, margins=margins, seed=seed)
    gpu = make_inputs(shape, 3, dtype=torch.float32, layout=layout, margins=margins, seed=seed, device=DEV)
    out_cpu, grads_cpu = value_and_grads(ops, name, cpu)
    out_gpu, grads_gpu = value_and_grads(ops, name, gpu)
    upstream = upstream_like(out_cpu).double()
    out_exact, grads_exact = value_and_grads(ops, name, inputs_in(cpu), upstream=upstream)
    for a, e in zip((out_gpu, *grads_gpu), (out_cpu, *grads_cpu)):
        assert a.device.type == "cuda" and a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride()
    names = ["output"] + [f"gradient {i}" for i in range(len(grads_cpu))]
    assert_rounding_like_control([t.cpu() for t in (out_gpu, *grads_gpu)], [out_cpu, *grads_cpu],
                                 [out_exact, *grads_exact], names)


def _half_cases() -> Iterator:
    for dtype, (name, margins), layout, beta_half, shape in itertools.product(
            HALF_TOL, OP_MARGINS, ("contiguous", "channels_last"), (False, True), ((2, 4, 6, 5), (2, 3, 5, 7))):
        yield pytest.param(dtype, name, layout, beta_half, margins, shape,
                           id=f"{str(dtype)[6:]}-{op_id(name, margins)}-{layout}-beta_{'half' if beta_half else 'f32'}"
                              f"-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("dtype,name,layout,beta_half,margins,shape", list(_half_cases()))
def test_half_matches_float32_reference(dtype: torch.dtype, name: str, layout: str, beta_half: bool, margins: bool,
                                        shape) -> None:
    """16-bit maps on CUDA vs the float32 reference on the same values, with the tolerances of the
    CPU low-precision tests.  N = 120 takes the vector path (8 halves per 16 bytes), N = 105 the
    scalar one."""
    inp = make_inputs(shape, 3, dtype=dtype, layout=layout, margins=margins,
                      beta_dtype=dtype if beta_half else torch.float32, seed=seed_of(dtype, name, layout, shape),
                      device=DEV)
    check_half_against_float32_reference(name, inp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_half_maps_float32_beta(dtype: torch.dtype) -> None:
    """Under autocast("cuda") the ops take 16-bit conv outputs with float32 beta and margins;
    gradients reach beta (float32) and the conv weights and equal the reference's under the same
    autocast, op by op (beta: against its float64 value from the same maps, calibrated by the
    reference's float32 gradient; conv weights through 16-bit backward: 3e-2 of the largest
    entry): dfa_helpers.check_autocast_gradients."""
    check_autocast_gradients(DEV, dtype, 3e-2)


# --------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile

def _smooth_inputs(name: str, shape, k: int, margins: bool, layout: str) -> Inputs:
    """float64 CUDA inputs redrawn until no element is within 1e-3 of a kink (as test_gradcheck)."""
    for attempt in range(100):
        inp = make_inputs(shape, k, margins=margins, layout=layout,
                          seed=seed_of(name, shape, margins, attempt, "cuda"), device=DEV)
        if away_from_kinks(inp, name):
            return inp
    raise AssertionError("no kink-free draw found")


GRADCHECK_SHAPES = [((2, 3, 2, 3), "contiguous"), ((2, 3, 2, 3), "channels_last"), ((3, 4), "contiguous"),
                    ((2, 4, 4, 4), "contiguous")]


@pytest.mark.parametrize("name,margins", OP_MARGINS, ids=[op_id(n, m) for n, m in OP_MARGINS])
@pytest.mark.parametrize("shape,layout", GRADCHECK_SHAPES, ids=["4d", "channels_last", "2d", "4d_vector_path"])
def test_gradcheck(name: str, margins: bool, shape, layout: str) -> None:
    """Analytical gradients (student, beta, every feature map) on CUDA match finite differences."""
    inp = _smooth_inputs(name, shape, 3, margins, layout)
    fn = _flat_fn(name, 3, inp.margins)
    assert torch.autograd.gradcheck(fn, (inp.student, inp.beta, *inp.features))


def _opcheck_args(name: str, sample: Sample) -> tuple:
    requires = ("student", "beta", "features") if sample.requires_grad else ()
    inp = make_inputs(sample.shape, 3, dtype=sample.dtype, layout=sample.layout, margins=sample.margins,
                      beta_dtype=sample.beta_dtype, requires_grad=requires, seed=seed_of(sample.id(), "cuda"),
                      device=DEV)
    args = OPCHECK_OPS[name][1](inp, sample)
    # the builders of test_opcheck draw the per-sample upstream gradient on CPU: move it over
    return torch.utils._pytree.tree_map(
        lambda t: t.to(DEV) if isinstance(t, torch.Tensor) and t.device.type != "cuda" else t, args)


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=[s.id() for s in OPCHECK_SAMPLES])
@pytest.mark.parametrize("name", list(OPCHECK_OPS))
def test_opcheck(name: str, sample: Sample) -> None:
    """torch.library.opcheck of every dfa op with CUDA inputs (backward ops on inputs that do not
    require grad: they are once-differentiable)."""
    import dataclasses

    if name.endswith("_backward"):
        sample = dataclasses.replace(sample, requires_grad=False)
    args = _opcheck_args(name, sample)
    assert all(t.device.type == "cuda" for t in torch.utils._pytree.tree_leaves(args)
               if isinstance(t, torch.Tensor))
    torch.library.opcheck(OPCHECK_OPS[name][0], args)


@pytest.mark.compile
def test_compiled_matches_eager() -> None:
    """torch.compile(fullgraph=True) with inductor on CUDA: one graph holding the three dfa ops,
    compiled once for two calls; loss and gradients equal eager fused and the reference."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.utils._triton import has_triton

    if not has_triton():
        pytest.skip("triton is not installed: inductor cannot compile for CUDA")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda *a: _objective(ops, *a), fullgraph=True, backend=counter)
    for seed in (0, 1):
        inp = make_inputs((2, 3, 5, 4), 3, margins=True, seed=seed, device=DEV)
        weight = torch.randn(inp.features[0].shape, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed)).to(DEV)
        leaves = [inp.student, inp.beta, *inp.features]
        loss = compiled(inp.student, inp.features, inp.beta, inp.margins, weight)
        grads = torch.autograd.grad(loss, leaves)
        for impl in (ops, reference):
            eager_loss = _objective(impl, inp.student, inp.features, inp.beta, inp.margins, weight)
            eager_grads = torch.autograd.grad(eager_loss, leaves)
            torch.testing.assert_close(loss, eager_loss, **F64)
            for g, eg in zip(grads, eager_grads):
                assert g.device.type == "cuda"
                torch.testing.assert_close(g, eg, **F64)
    assert counter.frame_count == 1
    graph_ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"dfa.aggregate", "dfa.bridge_st_loss", "dfa.partial_l2"} <= graph_ops, graph_ops


# --------------------------------------------------------------------------------------------------
# determinism and streams

@pytest.fixture(scope="module")
def determinism_inputs() -> List[Inputs]:
    """float32 maps of 12 chunks per sample (with/without margins, contiguous/channels_last), an
    odd-sized scalar-path case and a bfloat16 one."""
    inputs = [make_inputs(DETERMINISM_SHAPE, 3, dtype=torch.float32, margins=m, layout=layout, seed=11, device=DEV)
              for m in (False, True) for layout in ("contiguous", "channels_last")]
    inputs.append(make_inputs((8, 3, 97, 61), 3, dtype=torch.float32, margins=True, seed=12, device=DEV))
    inputs.append(make_inputs(DETERMINISM_SHAPE, 3, dtype=torch.bfloat16, margins=True, seed=13, device=DEV))
    return inputs


@pytest.mark.parametrize("name", OPS)
def test_repeated_calls_same_bits(name: str, determinism_inputs: List[Inputs]) -> None:
    """Two identical calls on CUDA give bitwise identical outputs and gradients (no atomics)."""
    assert DETERMINISM_SHAPE[1] * DETERMINISM_SHAPE[2] * DETERMINISM_SHAPE[3] > 2 * CHUNK
    for inp in determinism_inputs:
        _assert_same_bits(_run(name, inp), _run(name, inp))


@pytest.mark.parametrize("name,margins", OP_MARGINS, ids=[op_id(n, m) for n, m in OP_MARGINS])
def test_non_default_stream(name: str, margins: bool) -> None:
    """The kernels run on the current stream: on a fresh stream whose inputs are produced after a
    long sleep queued on that stream, the results equal the default stream's bit for bit (a launch
    on another stream would read the inputs before they are written)."""
    inp = make_inputs((4, 8, 32, 33), 3, dtype=torch.float32, margins=margins, seed=seed_of(name, margins, "stream"),
                      device=DEV)
    expected = _run(name, inp)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    assert side != torch.cuda.default_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before anything else on this stream

        def fresh(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)

        copy = Inputs(fresh(inp.student), [fresh(f) for f in inp.features], fresh(inp.beta), fresh(inp.margins))
        got = _run(name, copy)
    torch.cuda.synchronize()
    _assert_same_bits(expected, got)


# --------------------------------------------------------------------------------------------------
# bad inputs and edge values

def _valid_cuda() -> Dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    return dict(student=torch.randn(2, 3, 4, generator=gen).to(DEV),
                features=[torch.randn(2, 3, 4, generator=gen).to(DEV) for _ in range(2)],
                beta=torch.randn(2, generator=gen).to(DEV), margins=torch.randn(2, 3, generator=gen).to(DEV))


def _call_args(path: str, name: str, a: Dict[str, object]) -> torch.Tensor:
    impl = ops if path == "ops" else torch.ops.dfa
    if name == "aggregate":
        return impl.aggregate(a["features"], a["beta"], a["margins"])
    if name == "bridge_st_loss":
        return impl.bridge_st_loss(a["student"], a["features"], a["beta"])
    return impl.partial_l2(a["student"], a["features"], a["beta"], a["margins"])


def _device_cases() -> Iterator:
    for arg, names in (("beta", OPS), ("student", STUDENT_OPS), ("margins", MARGIN_OPS), ("features[1]", OPS),
                       ("features_on_cpu", OPS)):
        for name, path in itertools.product(names, ("ops", "torch.ops")):
            yield pytest.param(arg, name, path, id=f"{arg}-{name}-{path}")


@pytest.mark.parametrize("arg,name,path", list(_device_cases()))
def test_argument_on_wrong_device(arg: str, name: str, path: str) -> None:
    """Maps on CUDA with beta, student, margins or one map on CPU (or maps on CPU with beta on
    CUDA) raise a ValueError naming the argument, through dfa_ext.ops and torch.ops.dfa."""
    a = _valid_cuda()
    if arg == "features[1]":
        a["features"] = [a["features"][0], a["features"][1].cpu()]
        expected = r"'features\[1\]'"
    elif arg == "features_on_cpu":  # everything on CPU but beta
        a = {key: ([f.cpu() for f in v] if key == "features" else v if key == "beta" else v.cpu())
             for key, v in a.items()}
        expected = "'beta'"
    else:
        a[arg] = a[arg].cpu()
        expected = f"'{arg}'"
    if name not in MARGIN_OPS:
        a["margins"] = None
    with pytest.raises(ValueError, match=expected):
        _call_args(path, name, a)


def test_backward_ops_argument_on_wrong_device() -> None:
    """The backward ops name a per-sample gradient, saved statistics or map gradient left on CPU."""
    a = _valid_cuda()
    s, f, b, m = a["student"], a["features"], a["beta"], a["margins"]
    D = torch.ops.dfa
    stats = D.bridge_st_loss_forward(s, f, b, 1e-12)[1]
    with pytest.raises(ValueError, match="'grad'"):
        D.aggregate_backward(torch.randn(2, 3, 4), f, b, m, [True, True])
    with pytest.raises(ValueError, match="'grad'"):
        D.bridge_st_loss_backward(torch.randn(2), s, f, b, stats, 1e-12, [True, True, True])
    with pytest.raises(ValueError, match="'stats'"):
        D.bridge_st_loss_backward(torch.randn(2, device=DEV), s, f, b, stats.cpu(), 1e-12, [True, True, True])
    with pytest.raises(ValueError, match="'grad'"):
        D.partial_l2_backward(torch.randn(2), s, f, b, m, [True, True, True])


@pytest.mark.parametrize("name,margins", OP_MARGINS, ids=[op_id(n, m) for n, m in OP_MARGINS])
@pytest.mark.parametrize("shape,layout", [((0, 3, 4, 5), "contiguous"), ((0, 3, 4, 5), "channels_last"),
                                          ((2, 3, 0), "contiguous"), ((2, 0, 4), "contiguous")],
                         ids=["B0", "B0-channels_last", "N0", "C0"])
def test_empty(name: str, margins: bool, shape, layout: str) -> None:
    """B = 0 (no blocks at all) and empty samples (N = 0): results of the right shape on CUDA,
    equal to the reference's (zero losses, zero beta gradient), and a working backward."""
    inp = make_inputs(shape, 3, margins=margins, layout=layout, device=DEV)
    out, grads = value_and_grads(ops, name, inp)
    assert out.device.type == "cuda"
    assert out.shape == (tuple(shape) if name == "aggregate" else (shape[0],))
    for g, leaf in zip(grads, grad_leaves(name, inp)):
        assert g.shape == leaf.shape and g.device.type == "cuda"
    _compare_with_reference(name, inp, **F64)
    torch.cuda.synchronize()


def _with_nan(name: str, margins: bool, where: str) -> Inputs:
    inp = make_inputs((3, 4, 5, 6), 3, margins=margins, seed=5, device=DEV)
    with torch.no_grad():
        (inp.features[1] if where == "feature" else inp.student)[NAN_AT] = float("nan")
    return inp


@pytest.mark.parametrize("name,margins,where", _nan_cases())
def test_nan_propagates(name: str, margins: bool, where: str) -> None:
    """A NaN in a feature map or the student gives NaN where the reference has NaN, in the output
    and in the gradients (the poisoned element itself left out of map gradients, as on CPU)."""
    inp = _with_nan(name, margins, where)
    out, grads = value_and_grads(ops, name, inp)
    ref_out, ref_grads = value_and_grads(reference, name, inp, upstream=upstream_like(out))
    assert out.isnan().any()
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert_close_to_reference(out, ref_out, **F64)
    for g, rg in zip(grads, ref_grads):
        if g.dim() == 4:
            g, rg = g.clone(), rg.clone()
            g[NAN_AT] = rg[NAN_AT] = 0.0
        assert_close_to_reference(g, rg, **F64)
