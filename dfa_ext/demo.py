"""A small demonstration of the fused DFA ops (``python -m dfa_ext.demo``).

A synthetic "teacher group" has K layers; the "student" reproduces one of them (plus noise).
Gradient descent on beta with the bridge loss (DFA's student-to-teacher path) must then put most of
alpha = softmax(beta) on that layer.  The search runs twice, once with the fused ops and once with
the pure-PyTorch reference, and the demo prints both alphas, their largest difference, and the time
each took.  The full pipeline (teacher, search, distillation on MNIST) replaces this in later work.
"""

from __future__ import annotations

import argparse
import time

import torch

import dfa_ext
from dfa_ext import ops, reference


def make_group(batch: int, channels: int, size: int, layers: int, target: int, seed: int):
    """K teacher maps [B, C, H, W] and a student map that matches layer `target` up to noise."""
    gen = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, channels, size, size, generator=gen) for _ in range(layers)]
    student = features[target] + 0.3 * torch.randn(batch, channels, size, size, generator=gen)
    return student, features


def search(impl, student, features, steps: int, lr: float) -> tuple[torch.Tensor, float]:
    """Adam on beta minimising the mean bridge loss; returns (alpha, seconds)."""
    beta = torch.zeros(len(features), requires_grad=True)
    opt = torch.optim.Adam([beta], lr=lr)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        impl.bridge_st_loss(student, features, beta).mean().backward()
        opt.step()
    return torch.softmax(beta.detach(), 0), time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=16, help="spatial size H = W")
    parser.add_argument("--layers", type=int, default=6, help="K, feature maps in the group")
    parser.add_argument("--target", type=int, default=3, help="the layer the student reproduces")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.target < args.layers:
        parser.error(f"--target must be in [0, {args.layers - 1}], got {args.target}")

    print(f"dfa_ext {dfa_ext.__version__}, torch {torch.__version__}, kernels: {dfa_ext.kernels()}")
    student, features = make_group(args.batch, args.channels, args.size, args.layers, args.target, args.seed)
    print(f"group: K={args.layers} maps of shape {list(student.shape)}; the student copies layer {args.target}")
    alpha_fused, t_fused = search(ops, student, features, args.steps, args.lr)
    alpha_ref, t_ref = search(reference, student, features, args.steps, args.lr)
    fmt = lambda a: "[" + ", ".join(f"{v:.3f}" for v in a.tolist()) + "]"  # noqa: E731
    print(f"alpha (fused ops):  {fmt(alpha_fused)}  {args.steps} steps in {t_fused:.2f} s")
    print(f"alpha (reference):  {fmt(alpha_ref)}  {args.steps} steps in {t_ref:.2f} s")
    print(f"largest difference: {(alpha_fused - alpha_ref).abs().max().item():.2e}; "
          f"fused search {t_ref / t_fused:.1f}x faster")
    leader = int(alpha_fused.argmax())
    print(f"leading layer: {leader} (alpha {alpha_fused[leader].item():.3f}) -> "
          + ("found the layer the student copies" if leader == args.target else "did NOT find the copied layer"))


if __name__ == "__main__":
    main()
