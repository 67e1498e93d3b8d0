"""Old vs new CUDA kernels of the fused ops on the same inputs, in one process (issue 25's A/B).

Needs an extension built with ``DFA_CUDA_OLD_KERNELS=1`` (bench/gpu_check.sh builds it so): each
case is timed with ``torch.ops.dfa.cuda_kernels("old")`` and ``("new")`` in turn, on the same
cache-cold input sets, forward alone and forward + backward (the gradients bench_ops.py takes), and
printed as one Markdown table with each set's time and share of a copy's bandwidth.

    python bench/bench_cuda_ab.py                          # the issue's shapes, fp32 bf16 fp16
    python bench/bench_cuda_ab.py --dtypes float32 --ops aggregate --repeats 5
    python bench/bench_cuda_ab.py --device cpu --shapes 2x8x4x4x3 --repeats 1   # mechanics only

The default shapes: the large one (B=256, C=256, 32x32, K=8, NCHW) and the three stage pairs of
ResNet-56 -> ResNet-20 on CIFAR at batch 128 (K = 9 teacher blocks per stage, channels_last as the
trainers run them). On the CPU both sets are the CPU kernels (the switch only picks CUDA kernels).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import make_case, parse_shape  # noqa: E402
from harness import copy_bandwidth, emit_table, markdown_table, median_time  # noqa: E402

LARGE = ["256x256x32x32x8"]
RESNET56_TO_20 = ["128x16x32x32x9", "128x32x16x16x9", "128x64x8x8x9"]  # channels_last in training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=LARGE, help="BxCxHxWxK, NCHW")
    parser.add_argument("--cl-shapes", nargs="+", default=RESNET56_TO_20, help="BxCxHxWxK, channels_last")
    parser.add_argument("--ops", nargs="+", default=["aggregate", "bridge_st_loss", "partial_l2"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    import dfa_ext  # after sys.path: the extension of this checkout

    start = dfa_ext.kernels()["cuda_kernels"]
    if start is None:
        raise SystemExit("bench_cuda_ab: this extension has no CUDA kernels")
    try:
        torch.ops.dfa.cuda_kernels("old")
    except ValueError as e:
        raise SystemExit(f"bench_cuda_ab: {e}")
    copy_bps = copy_bandwidth(device)
    layouts = [(s, torch.contiguous_format, "") for s in args.shapes] + \
              [(s, torch.channels_last, " cl") for s in args.cl_shapes]
    header = ["op", "shape BxCxHxWxK", "dtype", "pass", "old ms", "new ms", "new vs old", "old % of copy",
              "new % of copy"]
    rows = []
    try:
        for op in args.ops:
            for shape_text, layout, tag in layouts:
                for dtype_name in args.dtypes:
                    for backward in (False, True):
                        fns, nbytes = make_case(op, parse_shape(shape_text), getattr(torch, dtype_name), device,
                                                margins=True, backward=backward, memory_format=layout)
                        secs = {}
                        for kernels in ("old", "new"):
                            torch.ops.dfa.cuda_kernels(kernels)
                            secs[kernels] = median_time(fns["fused"], device, repeats=args.repeats)
                        rows.append([op, shape_text + tag, dtype_name, "fwd+bwd" if backward else "fwd",
                                     f"{secs['old'] * 1e3:.3f}", f"{secs['new'] * 1e3:.3f}",
                                     f"{secs['old'] / secs['new']:.2f}x",
                                     f"{100 * nbytes / secs['old'] / copy_bps:.0f}%",
                                     f"{100 * nbytes / secs['new'] / copy_bps:.0f}%"])
                        print(" ".join(rows[-1]), file=sys.stderr, flush=True)
                        del fns
    finally:
        torch.ops.dfa.cuda_kernels(start)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (mechanics only: both sets are the CPU kernels)"
    title = (f"Old vs new CUDA kernels on {where}; torch {torch.__version__}; copy bandwidth "
             f"{copy_bps / 1e9:.1f} GB/s (read+write, same run); inputs cache-cold; margins on; 'cl' = channels_last.")
    emit_table(title, markdown_table(header, rows), args.markdown)


if __name__ == "__main__":
    main()
