"""The three fused DFA ops on their own, without any trainer (README: "Using the ops").

    python examples/ops_alone.py            # --batch 4 --channels 16 --size 8 --layers 3

What it does, on random float32 maps of one layer group (K teacher maps [B, C, H, W], a student map,
beta, and the OFD margins of K BatchNorms):
1. calls dfa_ext.ops.aggregate, partial_l2 and bridge_st_loss, backpropagates to the student and
   beta, and compares every value and gradient with dfa_ext.reference (the same formulas in plain
   PyTorch), asserting the differences stay within a derived float32 rounding bound;
2. shows that torch.ops.dfa.* is the same op (the dfa_ext.ops functions only check arguments);
3. times fused vs reference (forward + backward) on one medium shape (no assertion on time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import dfa_ext
from dfa_ext import ops, reference
from dfa_ext.margins import bn_margins

U32 = 2.0 ** -24  # float32 unit roundoff: one rounding moves a value by at most U32 of itself


# Why the bounds below hold. A float32 sum of n terms, added in any order, is within
# (n - 1) * U32 * sum|terms| of its exact value (Higham, "Accuracy and Stability of Numerical
# Algorithms", eq. 4.4), and a term computed with c roundings carries another c * U32 of its size.
# The fused kernels and the reference add the same terms in different orders (blocks and float64
# partial sums vs ATen's reductions), so each is within (n + c) * U32 * sum|terms| of the exact
# value, and the two within twice that:
#
#     |fused - reference| <= 2 * (n + c) * U32 * sum|terms|                                (*)
#
# The signs of the terms are not known beforehand, so sum|terms| is bounded from the magnitudes of
# the inputs, computed in float64: S = |s|, T_j = |T_j|, A = sum_j alpha_j |T_j| (>= |aggregate|,
# since the margins m <= 0 give |max(x, m)| <= |x|). alpha = softmax(beta) takes about K + 3
# roundings (exp, a K-term sum, a division), so the aggregate t carries 2K + 4 of A. Per output:
# * aggregate, per element: n = K terms alpha_j * max(T_j, m_j), c = K + 4, sum|terms| <= A.
# * partial_l2's student gradient, per element: 2 (s - t) [mask], c = 2K + 4 (t's) + 1, <= 2 (S + A).
# * partial_l2, per sample: n = C*H*W terms (s - t)^2 <= (S + A)^2.
# * beta_j's gradients: a sum over all B*C*H*W elements of dL/dt * alpha_j (T_j - t) (the softmax
#   Jacobian), each term <= |dL/dt| * alpha_j * (T_j + A).
# * bridge_st_loss, per sample: |u - v|^2 with u = s / |s|, v = A / |A|: n terms (u_i - v_i)^2,
#   whose sum of magnitudes is <= q^2 with q = 1 + |A_abs| / |A| (Minkowski), and whose u, v carry
#   the errors of the n-term norms and of the aggregate: 3 q^2 covers the three. Its gradients,
#   ds = 2 (u (u.v) - v) / |s| and dA = 2 (v (u.v) - u) / |A|, likewise with 3 q^2 per unit of
#   magnitude (ds per element depends on the n-term sums too).
# For the sums, c = 4K + 16 covers the roundings inside each term (t's, alpha's, a few products).
# The mask of partial_l2 (s > t or t > 0) can come out differently in the two only where t lies
# within the bound of s or of 0; a flip at t ~ 0 would move a loss by s^2, far past the bound, so
# these seeded inputs would show it.
# These are worst cases, for any summation order on any CPU. For the element-wise outputs (one
# K-term sum each) they are tight: a 1e-3 change of one beta moves the aggregate several hundred
# times past its bound (checked at the end of compare()). For the sums over all elements, the factor
# n makes them loose: they catch a wrong sign or a missing layer, not 1e-4 effects. The bridge
# loss's beta gradient is a difference of nearly equal sums (it is 0 when s is a multiple of A), so
# its bound is far above the gradient itself (its float32 reference loses ~1e-4 of it to
# cancellation). The package's tests bound the kernels' own summation scheme tightly
# (python_tests/test_float32_chunks.py).
def bound(n_terms: int, roundings: int, abs_sum: torch.Tensor) -> torch.Tensor:
    """(*) above: how far two float32 evaluations of a sum may lie apart."""
    return 2 * (n_terms + roundings) * U32 * abs_sum


def make_inputs(batch: int, channels: int, size: int, layers: int, seed: int = 0):
    """K teacher maps, a student map, beta and the [K, C] OFD margins of K BatchNorms."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, channels, size, size)
    features = [torch.randn(shape, generator=generator) for _ in range(layers)]
    student = torch.randn(shape, generator=generator)
    beta = torch.randn(layers, generator=generator)
    bns = [nn.BatchNorm2d(channels) for _ in range(layers)]
    with torch.no_grad():  # trained BNs have varied scales and shifts; fresh ones have 1 and 0
        for bn in bns:
            bn.weight.copy_(0.5 + torch.rand(channels, generator=generator))
            bn.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    margins = torch.stack([bn_margins(bn) for bn in bns])  # [K, C], all <= 0
    return features, student, beta, margins


def values_and_grads(impl, features, student, beta, margins, upstream):
    """Each op's value and its gradients to the student and beta, with ``impl`` (ops or reference)."""
    out = {}
    b = beta.clone().requires_grad_()
    agg = impl.aggregate(features, b, margins)
    (agg * upstream).sum().backward()  # a random upstream gradient: sum(A) alone would cancel
    out["aggregate"], out["aggregate d/beta"] = agg.detach(), b.grad
    for name, call in (("partial_l2", lambda s, b: impl.partial_l2(s, features, b, margins)),
                       ("bridge_st_loss", lambda s, b: impl.bridge_st_loss(s, features, b))):
        s, b = student.clone().requires_grad_(), beta.clone().requires_grad_()
        loss = call(s, b)
        loss.sum().backward()
        out[name], out[f"{name} d/student"], out[f"{name} d/beta"] = loss.detach(), s.grad, b.grad
    return out


def rounding_bounds(features, student, beta, margins, upstream):
    """Per compared tensor, the bound (*) on |fused - reference|, from float64 magnitudes."""
    k = len(features)
    n = features[0][0].numel()  # elements per sample
    big_n = features[0].numel()  # elements of the batch
    alpha = torch.softmax(beta.double(), 0)
    t_abs = [f.double().abs() for f in features]
    a_abs = sum(a * t for a, t in zip(alpha, t_abs))
    s_abs = student.double().abs()
    exact = reference.aggregate([f.double() for f in features], beta.double())  # no margins (bridge)

    def per_beta(grad_t_abs: torch.Tensor) -> torch.Tensor:  # sum_i |dL/dt_i| alpha_j (T_j + A)
        return torch.stack([(grad_t_abs * a * (t + a_abs)).sum() for a, t in zip(alpha, t_abs)])

    def per_sample(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)

    def norm(x: torch.Tensor) -> torch.Tensor:  # per-sample norm, broadcastable to [B, C, H, W]
        return x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))

    q2 = (1 + norm(a_abs) / norm(exact)) ** 2
    u_abs, v_abs = s_abs / norm(student.double()), a_abs / norm(exact)
    c = 4 * k + 16  # roundings inside each term of the sums (see above)
    return {
        "aggregate": bound(k, k + 4, a_abs),
        "aggregate d/beta": bound(big_n, c, per_beta(upstream.double().abs())),
        "partial_l2": bound(n, c, per_sample((s_abs + a_abs) ** 2)),
        "partial_l2 d/student": bound(1, 2 * k + 5, 2 * (s_abs + a_abs)),
        "partial_l2 d/beta": bound(big_n, c, per_beta(2 * (s_abs + a_abs))),
        "bridge_st_loss": bound(n, c, 3 * q2.flatten()),
        "bridge_st_loss d/student": bound(n, c, 3 * q2 * 2 * (u_abs + v_abs) / norm(student.double())),
        "bridge_st_loss d/beta": bound(big_n + n, c, per_beta(3 * q2 * 2 * (u_abs + v_abs) / norm(exact))),
    }


def compare(features, student, beta, margins) -> None:
    upstream = torch.randn(features[0].shape, generator=torch.Generator().manual_seed(1))
    fused = values_and_grads(ops, features, student, beta, margins, upstream)
    plain = values_and_grads(reference, features, student, beta, margins, upstream)
    bounds = rounding_bounds(features, student, beta, margins, upstream)
    print(f"{'fused vs reference':<26} {'max |diff|':>10} {'max |ref|':>10} {'max diff/bound':>15}")
    for name, value in fused.items():
        diff = (value.double() - plain[name].double()).abs()
        limit = bounds[name].expand_as(diff)
        print(f"{name:<26} {diff.max():10.2e} {plain[name].abs().max():10.2e} {(diff / limit).max():15.2e}")
        assert value.shape == plain[name].shape and value.dtype == plain[name].dtype, name
        assert bool((diff <= limit).all()), f"{name}: fused and reference differ beyond the rounding bound"
    # The negative control: the reference with one beta 1e-3 off is far outside the aggregate's bound.
    off = reference.aggregate(features, beta + torch.tensor([1e-3] + [0.0] * (len(beta) - 1)), margins)
    excess = ((fused["aggregate"].double() - off.double()).abs() / bounds["aggregate"]).max()
    print(f"control: beta[0] + 1e-3 moves the aggregate {excess:.0f}x its bound")
    assert excess > 10, "the aggregate's bound does not tell a 1e-3 change of beta from rounding"


def same_op(features, student, beta, margins) -> None:
    """dfa_ext.ops.* checks its arguments, then calls the registered op: the results are identical."""
    pairs = [
        ("aggregate", ops.aggregate(features, beta, margins), torch.ops.dfa.aggregate(features, beta, margins)),
        ("partial_l2", ops.partial_l2(student, features, beta, margins),
         torch.ops.dfa.partial_l2(student, features, beta, margins)),
        ("bridge_st_loss", ops.bridge_st_loss(student, features, beta),
         torch.ops.dfa.bridge_st_loss(student, features, beta, 1e-12)),
    ]
    for name, wrapped, registered in pairs:
        assert torch.equal(wrapped, registered), name
        print(f"torch.ops.dfa.{name} == dfa_ext.ops.{name} (bitwise): {getattr(torch.ops.dfa, name).default._schema}")


def milliseconds(step, repeats: int) -> float:
    step()  # warm-up (allocations, first-call dispatch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def timing(batch: int, channels: int, size: int, layers: int, repeats: int) -> None:
    features, student, beta, margins = make_inputs(batch, channels, size, layers, seed=2)
    print(f"\nforward + backward (student and beta), [{batch}, {channels}, {size}, {size}] x {layers} maps, "
          f"median of {repeats}, {torch.get_num_threads()} threads (inputs reused, so warm in the cache when "
          "they fit; bench/bench_ops.py measures the ops cache-cold against the copy bandwidth):")
    # Dense upstream gradients, as a loss after the op would give (an expanded one from out.sum()
    # is a stride-0 tensor: another, slower path for the fused aggregate's backward).
    grad_map, grad_loss = torch.randn(student.shape), torch.ones(batch)
    calls = {
        "aggregate": lambda impl, s, b: impl.aggregate(features, b, margins).backward(grad_map),
        "partial_l2": lambda impl, s, b: impl.partial_l2(s, features, b, margins).backward(grad_loss),
        "bridge_st_loss": lambda impl, s, b: impl.bridge_st_loss(s, features, b).backward(grad_loss),
    }
    for name, call in calls.items():
        row = []
        for impl in (ops, reference):
            def step(impl=impl, call=call):
                call(impl, student.clone().requires_grad_(), beta.clone().requires_grad_())

            row.append(milliseconds(step, repeats))
        print(f"  {name:<15} fused {row[0]:8.2f} ms   reference {row[1]:8.2f} ms   ({row[1] / row[0]:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=8, help="H = W of the compared maps")
    parser.add_argument("--layers", type=int, default=3, help="K, teacher maps in the group")
    parser.add_argument("--time-shape", type=int, nargs=4, default=(32, 64, 16, 4), metavar=("B", "C", "S", "K"),
                        help="batch, channels, size and K of the timed maps")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"dfa_ext.kernels(): {dfa_ext.kernels()}")
    inputs = make_inputs(args.batch, args.channels, args.size, args.layers)
    print(f"maps [{args.batch}, {args.channels}, {args.size}, {args.size}] x {args.layers}, "
          f"alpha = softmax(beta) = {[round(a, 3) for a in torch.softmax(inputs[2], 0).tolist()]}, "
          f"margins [K, C] from {args.layers} BatchNorms, in [{inputs[3].min():.3f}, {inputs[3].max():.3f}]\n")
    compare(*inputs)
    print()
    same_op(*inputs)
    timing(*args.time_shape, args.repeats)


if __name__ == "__main__":
    main()
