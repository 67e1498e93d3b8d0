"""Benchmark of the fused DFA ops against the pure-PyTorch reference, eager and torch.compile'd.

For each op, shape, dtype and pass (forward alone, forward + backward) it times, on the same inputs: the fused op
(dfa_ext.ops), the reference in eager mode and the reference under torch.compile, and prints a
Markdown table with the median time, the fused op's speed-up over both, the achieved bandwidth of
each (bytes a minimal fused implementation must move, divided by time) against a copy measured in
the same run, and the peak memory each allocates beyond its inputs.

Gradients are taken where the method needs them: beta for aggregate (the search's teacher-to-
student path), student and beta for bridge_st_loss and partial_l2; teacher maps never need grad.

    python bench/bench_ops.py                       # CPU, float32, the issue's shapes
    python bench/bench_ops.py --device cuda --dtypes float32 bfloat16 --shapes 256x256x32x32x8
    python bench/bench_ops.py --passes both           # forward + backward only
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dfa_ext  # noqa: E402
from dfa_ext import ops, reference  # noqa: E402
from harness import (cold_copies, copy_bandwidth, emit_table, last_level_cache_bytes, markdown_table, median_time,  # noqa: E402
                     peak_extra_bytes)

DEFAULT_SHAPES = ["64x64x16x16x6", "128x128x8x8x9"]  # B x C x H x W x K


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    b, c, h, w, k = (int(v) for v in text.lower().split("x"))
    return b, c, h, w, k


def make_case(op: str, shape, dtype, device, margins: bool, backward: bool = True, copies: int | None = None,
              memory_format: torch.memory_format = torch.contiguous_format):
    """Inputs and the forward+backward step (``backward=False``: the forward alone) for each
    implementation of one op, and the bytes a minimal fused implementation moves for it.

    ``copies`` independent input sets are made and each call of a step takes the next one, so that
    its inputs are out of the last-level cache (None: as many as ``harness.cold_copies`` says; 1:
    the same inputs every call, which then stay cached when they fit). The maps are laid out in
    ``memory_format`` (the trainers run channels_last)."""
    b, c, h, w, k = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def a_map():
        return torch.randn(b, c, h, w, generator=gen).to(device, dtype, memory_format=memory_format)

    def input_set():
        features = [a_map() for _ in range(k)]
        beta = torch.randn(k, generator=gen).to(device).requires_grad_()
        student = a_map().requires_grad_()
        m = (0.5 * torch.randn(k, c, generator=gen) - 1).to(device) if margins else None
        grad_map = a_map()
        grad_loss = torch.rand(b, generator=gen).to(device)
        if op == "aggregate":
            return (features, beta, m), [beta], grad_map
        if op == "bridge_st_loss":
            return (student, features, beta), [student, beta], grad_loss
        return (student, features, beta, m), [student, beta], grad_loss

    map_bytes = b * c * h * w * torch.empty((), dtype=dtype).element_size()
    if copies is None:
        copies = cold_copies((k + 2) * map_bytes, torch.device(device))  # K maps, student, map-sized gradient
    sets = [input_set() for _ in range(copies)]
    if op == "aggregate":
        maps_moved = 2 * (k + 1)  # fwd: K in + 1 out; bwd: grad + K maps in
    else:
        maps_moved = 2 * (k + 1) + 1  # fwd: K + s in; bwd: K + s in, ds out
    if not backward:
        maps_moved = k + 1  # K maps (and the student) in; aggregate: K in + 1 out
    nbytes = maps_moved * map_bytes

    def step(fn: Callable) -> Callable[[], object]:
        turn = itertools.cycle(sets)

        def run():
            args, wrt, grad = next(turn)
            out = fn(*args)
            return torch.autograd.grad(out, wrt, grad)

        def run_forward():
            args, _, _ = next(turn)
            with torch.no_grad():
                return fn(*args)
        return run if backward else run_forward

    ref_fn = getattr(reference, op)
    compiled = torch.compile(ref_fn, dynamic=False, fullgraph=True)
    return {"fused": step(getattr(ops, op)), "eager": step(ref_fn), "compiled": step(compiled)}, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxCxHxWxK")
    parser.add_argument("--ops", nargs="+", default=["aggregate", "bridge_st_loss", "partial_l2"])
    parser.add_argument("--passes", nargs="+", choices=["forward", "both"], default=["forward", "both"],
                        help="forward alone and/or forward + backward")
    parser.add_argument("--no-margins", action="store_true", help="aggregate/partial_l2 without margins")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warm", action="store_true", help="the same inputs every call (cached when they fit; "
                        "default: rotate input sets larger than the last-level cache)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    copy_bps = copy_bandwidth(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = ["op", "pass", "shape BxCxHxWxK", "dtype", "fused ms", "eager ms", "compiled ms", "vs eager", "vs compiled",
              "fused GB/s", "% of copy", "compiled GB/s", "fused extra MB", "eager extra MB", "compiled extra MB"]
    rows = []
    for op in args.ops:
        for shape_text in args.shapes:
            shape = parse_shape(shape_text)
            for dtype_name, passes in itertools.product(args.dtypes, args.passes):
                dtype = getattr(torch, dtype_name)
                impls, nbytes = make_case(op, shape, dtype, device, margins=not args.no_margins,
                                          backward=passes == "both", copies=1 if args.warm else None)
                secs = {name: median_time(fn, device, repeats=args.repeats) for name, fn in impls.items()}
                extra = {name: peak_extra_bytes(fn, device) / 2**20 for name, fn in impls.items()}
                rows.append([
                    op, "fwd+bwd" if passes == "both" else "fwd", shape_text, dtype_name,
                    f"{secs['fused'] * 1e3:.2f}", f"{secs['eager'] * 1e3:.2f}", f"{secs['compiled'] * 1e3:.2f}",
                    f"{secs['eager'] / secs['fused']:.2f}x", f"{secs['compiled'] / secs['fused']:.2f}x",
                    f"{nbytes / secs['fused'] / 1e9:.1f}", f"{100 * nbytes / secs['fused'] / copy_bps:.0f}%",
                    f"{nbytes / secs['compiled'] / 1e9:.1f}",
                    f"{extra['fused']:.1f}", f"{extra['eager']:.1f}", f"{extra['compiled']:.1f}",
                ])
                print(" ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    cache = last_level_cache_bytes(device)
    title = (f"{' and '.join(args.passes).replace('both', 'forward+backward').capitalize()} on {where}; torch {torch.__version__}, dfa_ext {dfa_ext.__version__}; "
             f"copy bandwidth {copy_bps / 1e9:.1f} GB/s (read+write, same run); "
             + ("inputs reused (warm)." if args.warm else
                f"inputs cache-cold (rotated sets totalling >= 4x the {cache / 2**20:.0f} MiB last-level cache)."))
    emit_table(title, markdown_table(header, rows), args.markdown)


if __name__ == "__main__":
    main()
