"""Benchmark of one stage-1 search step (architecture step + weight step) on the same network and
batch with the DFA ops as fused kernels, as the eager pure-PyTorch reference, and as that
reference under torch.compile.

Reports the median time per step, the ratios, and the share of the fused step spent inside the
DFA kernels (profiler self time of the dfa:: ops, forward and backward). The reference's share is
derived from it: the steps differ only in the DFA ops, so reference share =
(reference step - fused step + fused DFA time) / reference step.

    python bench/bench_search_step.py [--teacher resnet56 --student resnet20 --batch 64 --order first]
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_network_arguments, dfa_op_seconds, median_time  # noqa: E402

from dfa_ext import models, reference  # noqa: E402
from dfa_ext.search import Architect, Batch, SearchNetwork, network, teacher_features  # noqa: E402


def _compiled_reference() -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: torch.compile(getattr(reference, name), dynamic=False)
                                    for name in ("aggregate", "bridge_st_loss", "partial_l2")})


def build_step(args, kernels: str):
    """A closure running one search step of group ``args.group`` with the given DFA ops."""
    torch.manual_seed(0)
    shape = (args.channels, args.size, args.size)
    teacher = models.create(args.teacher, num_classes=args.classes, in_channels=args.channels).eval()
    student = models.create(args.student, num_classes=args.classes, in_channels=args.channels)
    pairs = models.pair_networks(teacher, student, shape)
    net = SearchNetwork(student, pairs, kernels="fused" if kernels == "compiled" else kernels)
    memory_format = torch.channels_last
    teacher.to(memory_format=memory_format)
    net.to(memory_format=memory_format)
    betas = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(p.num_layers)) for p in pairs)
    architect = Architect(net, betas, second_order=args.order == "second")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    g = torch.Generator().manual_seed(1)

    def batch() -> Batch:
        images = torch.randn(args.batch, *shape, generator=g).contiguous(memory_format=memory_format)
        labels = torch.randint(0, args.classes, (args.batch,), generator=g)
        return Batch(images, labels, teacher_features(teacher, images))

    train, val = batch(), batch()
    group = args.group

    def step() -> None:
        net.train()
        architect.step(group, train, val, optimizer)
        _, losses = net(train.images, train.labels, train.teacher[group], betas[group].detach(), group, True)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step, pairs[group].num_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    parser.add_argument("--group", type=int, default=0, help="group searched (0 has the largest maps)")
    parser.add_argument("--order", choices=("first", "second"), default="first")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args()

    device = torch.device("cpu")
    times, k = {}, None
    modes = ["fused", "reference"] + ([] if args.no_compile else ["compiled"])
    original = network.dfa_ops
    for mode in modes:
        if mode == "compiled":
            compiled = _compiled_reference()
            network.dfa_ops = lambda kernels, ops=compiled: ops  # the bench only: swap in the compiled reference
        try:
            step, k = build_step(args, mode)
            times[mode] = median_time(step, device, warmup=2, repeats=args.repeats)
            if mode == "fused":
                dfa_seconds = dfa_op_seconds(step, device)
        finally:
            network.dfa_ops = original
    fused = times["fused"]
    print(f"search step ({args.order} order), teacher {args.teacher} -> student {args.student}, "
          f"batch {args.batch}x{args.channels}x{args.size}x{args.size}, group {args.group} (K={k}), "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print("| kernels | ms / step | step vs fused | DFA ops ms | DFA share |")
    print("|---|---|---|---|---|")
    for mode in modes:
        t = times[mode]
        dfa_ms = (dfa_seconds if mode == "fused" else t - fused + dfa_seconds) * 1e3
        print(f"| {mode} | {t * 1e3:.1f} | {t / fused:.2f}x | {dfa_ms:.1f} | {dfa_ms / (t * 1e3):.0%} |")


if __name__ == "__main__":
    main()
