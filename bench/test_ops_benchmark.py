"""Microbenchmarks of the three ops: fused vs the eager pure-PyTorch reference vs the reference
under torch.compile, for each op x shape x dtype x device, forward alone and forward+backward.

Each combination is one pytest-benchmark group, so one table compares the three implementations:

    pytest bench --benchmark-only                          # the tables (make bench)
    pytest bench --benchmark-only --benchmark-json=ops.json
    pytest bench --benchmark-only --benchmark-compare      # against the last saved run (--benchmark-autosave)
    pytest bench --benchmark-disable -m "not compile"      # one call each: a smoke test (make test)

Inputs are cache-cold: each call takes the next of several input sets that together hold 4x the
last-level cache (``harness.cold_copies``). ``extra_info`` holds the roofline columns of
bench_ops.py: achieved GB/s (bytes a minimal fused implementation moves / median time), % of the
copy bandwidth measured in the same session, and the peak memory allocated beyond the inputs (MiB).
"""

from __future__ import annotations

import pytest
import torch
from bench_ops import make_case, parse_shape
from harness import peak_extra_bytes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = ["64x64x16x16x6", "128x128x8x8x9"]  # B x C x H x W x K: the trainers' feature maps
IMPLS = ["fused", "eager", pytest.param("compiled", marks=pytest.mark.compile)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("op", ["aggregate", "bridge_st_loss", "partial_l2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_op(benchmark, copy_bytes_per_second, impl, op, passes, shape, dtype, device):
    device = torch.device(device)
    # Timed cache-cold (input sets rotated past the last-level cache); one set for the untimed smoke run.
    impls, nbytes = make_case(op, parse_shape(shape), getattr(torch, dtype), device, margins=True,
                              backward=passes == "forward+backward", copies=1 if benchmark.disabled else None)
    run = impls[impl]
    if device.type == "cuda":
        def timed():
            run()
            torch.cuda.synchronize(device)
    else:
        timed = run
    benchmark.group = f"{op} {passes} {shape} {dtype} {device.type}"
    benchmark.name = impl
    timed()  # warm-up (and compilation) outside the timing
    benchmark(timed)
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update({
            "GB/s": round(nbytes / seconds / 1e9, 2),
            "% of copy": round(100 * nbytes / seconds / copy_bytes_per_second(device), 1),
            "peak extra MiB": round(peak_extra_bytes(run, device) / 2**20, 2),
        })
