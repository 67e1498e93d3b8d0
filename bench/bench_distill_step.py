"""Benchmark of one stage-2 training step (teacher forward, student forward and backward, SGD)
on the same networks and batch: DFA with the fused ops, with the eager pure-PyTorch reference and
with that reference under torch.compile, the whole step's forward compiled as ``--compile`` does
(fused DFA and vanilla), the fused step with the trainers' divergence guard
(non-finite losses and gradient norm recorded on the device), beside the vanilla (CE only), KD and OFD steps.

Reports the median time per step, the ratio to the fused DFA step, the time inside the dfa:: ops
(profiler) and the peak extra memory of a step.

    python bench/bench_distill_step.py [--device cuda --teacher resnet56 --student resnet20 --batch 128]
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_network_arguments, dfa_op_seconds, markdown_table, median_time, peak_extra_bytes  # noqa: E402

from dfa_ext import models, reference  # noqa: E402
from dfa_ext.distill import KDDistiller, VanillaDistiller, distillers, group_targets, stage_weights  # noqa: E402
from dfa_ext.distill.distillers import FeatureDistiller  # noqa: E402
from dfa_ext.margins import group_margins  # noqa: E402
from dfa_ext.training.finite import CHECK_EVERY, FiniteGuard  # noqa: E402
from dfa_ext.training.optim_step import optimizer_step  # noqa: E402

COLUMNS = ("dfa fused", "dfa fused + divergence guard", "dfa reference (eager)", "dfa reference (torch.compile)",
           "dfa fused, step compiled (--compile)", "ofd fused", "kd", "vanilla", "vanilla, step compiled (--compile)")


def _compiled_reference() -> types.SimpleNamespace:
    return types.SimpleNamespace(partial_l2=torch.compile(reference.partial_l2, dynamic=False))


def build_step(args, column: str, device: torch.device):
    """A closure running one training step of ``column`` on a fixed batch."""
    torch.manual_seed(0)
    shape = (args.channels, args.size, args.size)
    teacher = models.create(args.teacher, num_classes=args.classes, in_channels=args.channels)
    student = models.create(args.student, num_classes=args.classes, in_channels=args.channels)
    record = {"name": args.student, "num_classes": args.classes, "in_channels": args.channels}
    if column == "vanilla":
        task = VanillaDistiller(student, None, record)
    elif column == "kd":
        task = KDDistiller(student, teacher, record)
    else:
        pairs = models.pair_networks(teacher, student, shape)
        bns = [g.bns for g in teacher.eval()(torch.zeros(2, *shape), features=True).groups]
        method = "ofd" if column.startswith("ofd") else "random"  # random: a full K-layer aggregation
        task = FeatureDistiller(student, teacher, record, pairs=pairs, targets=group_targets(method, pairs),
                                margins=[group_margins(b) for b in bns], weights=stage_weights(len(pairs)),
                                kernels="reference" if "reference" in column else "fused")
    task.to(device, memory_format=torch.channels_last).train()
    # --compile: the trainers compile the task's forward (networks and losses), as here
    forward = torch.compile(task, mode=args.compile_mode) if "step compiled" in column else task
    params = list(task.trainable_parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, *shape, generator=g).to(device, memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    # as the trainers run it: each step's terms recorded on the device, read every CHECK_EVERY steps
    guard = FiniteGuard("stop", 10, device) if "guard" in column else None
    count = [0]

    def step() -> None:
        with autocast:
            _, losses = forward(images, labels)
        count[0] += 1
        allow = None if guard is None else (lambda norm: guard.observe(count[0], 0.01, {**losses, "gradient norm": norm}))
        optimizer_step(sum(losses.values()), optimizer, scaler, params, None, allow)
        if guard is not None and count[0] % CHECK_EVERY == 0:
            guard.check()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    add_network_arguments(parser)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune", "reduce-overhead"],
                        help="mode of the compiled-step columns (the trainers' --compile)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)

    columns = [c for c in COLUMNS if not (args.no_compile and "compile" in c)]
    rows, fused = [], None
    original = distillers.dfa_ops
    for column in columns:
        if column == "dfa reference (torch.compile)":
            compiled = _compiled_reference()
            distillers.dfa_ops = lambda kernels, ops=compiled: ops  # the bench only: the compiled reference
        try:
            step = build_step(args, column, device)
            seconds = median_time(step, device, warmup=3, repeats=args.repeats)
            ops = dfa_op_seconds(step, device) if "fused" in column else None
            peak = peak_extra_bytes(step, device) if device.type == "cuda" else None
        finally:
            distillers.dfa_ops = original
        if column == "dfa fused":
            fused, fused_ops = seconds, ops
        if column.startswith("dfa reference"):  # the steps differ only in the DFA ops
            ops = seconds - fused + fused_ops
        rows.append([column, f"{seconds * 1e3:.1f}", f"{seconds / fused:.2f}x",
                     "" if ops is None else f"{ops * 1e3:.1f}",
                     "" if ops is None else f"{ops / seconds:.0%}",
                     "" if peak is None else f"{peak / 2**20:.0f}"])
        print(f"{column}: {seconds * 1e3:.1f} ms", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    precision = "bf16 autocast" if args.bf16 else "float32"
    title = (f"distillation step, teacher {args.teacher} -> student {args.student}, batch {args.batch}x{args.channels}"
             f"x{args.size}x{args.size}, {precision}, {name}, torch {torch.__version__}")
    # reference columns: DFA ops time estimated as step - fused step + fused ops (the steps differ only there)
    table = markdown_table(["step", "ms / step", "vs dfa fused", "DFA ops ms (reference: estimated)", "DFA share",
                            "peak extra MiB"], rows)
    print(title)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(title + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
