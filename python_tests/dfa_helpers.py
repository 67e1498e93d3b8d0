"""Shared helpers of the dfa_ext test suite: input builders, memory layouts, op calls and gradients.

Every test compares the fused ops (:mod:`dfa_ext.ops`) against the pure-PyTorch reference
(:mod:`dfa_ext.reference`); both modules have the same call signatures, so :func:`call` takes either.
"""

from __future__ import annotations

import dataclasses
import zlib
from types import ModuleType
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from dfa_ext import ops, reference
from rounding import F64, FLOAT32_TINY, assert_rounding_like_control, relative_error  # noqa: F401 (F64 re-exported)

OPS: Tuple[str, ...] = ("aggregate", "bridge_st_loss", "partial_l2")
MARGIN_OPS: Tuple[str, ...] = ("aggregate", "partial_l2")  # the ops that take margins
STUDENT_OPS: Tuple[str, ...] = ("bridge_st_loss", "partial_l2")  # the ops that take a student

# Memory layouts a map can be given in.  "sliced" is a view with step 2 along the last dim and
# "permuted" a dense view whose dim order is neither contiguous nor channels_last.
LAYOUTS: Tuple[str, ...] = ("contiguous", "channels_last", "channels_last_3d", "sliced", "permuted")


def margin_options(name: str) -> Tuple[bool, ...]:
    """(False, True) for the ops that take margins, (False,) for bridge_st_loss."""
    return (False, True) if name in MARGIN_OPS else (False,)


# Every (op, margins) combination, and a short test id for it.
OP_MARGINS: List[Tuple[str, bool]] = [(name, m) for name in OPS for m in margin_options(name)]


def op_id(name: str, margins: bool) -> str:
    return f"{name}-{'m' if margins else 'nom'}"


@dataclasses.dataclass
class Inputs:
    """The arguments of one call: a student map, K feature maps, beta [K] and optional margins [K, C]."""

    student: torch.Tensor
    features: List[torch.Tensor]
    beta: torch.Tensor
    margins: Optional[torch.Tensor]

    def leaves(self) -> List[torch.Tensor]:
        """All tensors that may take a gradient: student, beta, then the features."""
        return [self.student, self.beta, *self.features]


def seed_of(*parts: object) -> int:
    """A stable seed derived from a test's parameters (unlike hash(), the same in every run)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Returns a tensor equal to ``t`` stored in ``layout`` (see :data:`LAYOUTS`)."""
    t = t.detach()
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        assert t.dim() == 4
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        assert t.dim() == 5
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        view = big[..., ::2]
        assert not view.is_contiguous()
        return view
    if layout == "permuted":
        # storage order (C, B, last, ..., 2): a transpose then a permute of a contiguous buffer
        order = [1, 0] + list(range(t.dim() - 1, 1, -1))
        buf = torch.empty([t.shape[d] for d in order], dtype=t.dtype)
        view = buf.permute([order.index(d) for d in range(t.dim())])
        view.copy_(t)
        assert view.shape == t.shape and not view.is_contiguous()
        if t.dim() == 4:
            assert not view.is_contiguous(memory_format=torch.channels_last)
        return view
    raise ValueError(layout)


def randn(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal values drawn in float64 (so every dtype sees the same numbers), cast to dtype."""
    return torch.randn(list(shape), generator=gen, dtype=torch.float64).to(dtype)


def make_inputs(shape: Sequence[int], k: int, *, dtype: torch.dtype = torch.float64, layout: str = "contiguous",
                student_layout: Optional[str] = None, margins: bool = False,
                beta_dtype: Optional[torch.dtype] = None, seed: int = 0,
                requires_grad: Sequence[str] = ("student", "beta", "features"),
                device: Optional[torch.device | str] = None) -> Inputs:
    """Random inputs of one call.

    Maps are standard normal; margins are drawn from the same distribution as the maps, so elements
    fall on both sides of their margin.  ``requires_grad`` names the leaves that require grad
    ("student", "beta", "features", or "features[j]" for single maps).  ``device`` (default CPU)
    places every tensor there with the same values and strides as on CPU for the same seed.
    """
    gen = torch.Generator().manual_seed(seed)
    student_layout = layout if student_layout is None else student_layout
    device = torch.device("cpu") if device is None else torch.device(device)

    def leaf(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.device != device:  # same strides (and so the same layout) on the target device
            t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)
        return t.detach().requires_grad_(name in requires_grad)

    features = [leaf(to_layout(randn(shape, gen, dtype), layout),
                     "features" if "features" in requires_grad else f"features[{j}]") for j in range(k)]
    student = leaf(to_layout(randn(shape, gen, dtype), student_layout), "student")
    beta = leaf(randn([k], gen, beta_dtype or dtype), "beta")
    m = randn([k, shape[1]], gen, dtype).to(device) if margins else None
    return Inputs(student, features, beta, m)


def call(impl: ModuleType, name: str, inp: Inputs) -> torch.Tensor:
    """Calls op ``name`` of ``impl`` (dfa_ext.ops or dfa_ext.reference) on ``inp``."""
    if name == "aggregate":
        return impl.aggregate(inp.features, inp.beta, inp.margins)
    if name == "bridge_st_loss":
        assert inp.margins is None, "bridge_st_loss takes no margins"
        return impl.bridge_st_loss(inp.student, inp.features, inp.beta)
    if name == "partial_l2":
        return impl.partial_l2(inp.student, inp.features, inp.beta, inp.margins)
    raise ValueError(name)


def grad_leaves(name: str, inp: Inputs) -> List[torch.Tensor]:
    """The inputs of op ``name`` that require grad (the student only for ops that take one)."""
    leaves = ([inp.student] if name in STUDENT_OPS else []) + [inp.beta, *inp.features]
    return [t for t in leaves if t.requires_grad]


def upstream_like(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A random upstream gradient of ``out``'s shape, dtype and strides."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.empty_like(out)
    g.copy_(torch.randn(out.shape, generator=gen, dtype=torch.float64))
    return g


def value_and_grads(impl: ModuleType, name: str, inp: Inputs,
                    upstream: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The op's output and the gradients of <upstream, output> w.r.t. :func:`grad_leaves`."""
    out = call(impl, name, inp)
    leaves = grad_leaves(name, inp)
    if not leaves:
        return out, ()
    g = upstream_like(out) if upstream is None else upstream
    return out, torch.autograd.grad(out, leaves, g)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    """Values (NaN where the reference is NaN) and dtype must match the reference; shape too."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


def check_against_reference(name: str, inp: Inputs, **tol) -> None:
    """Output and every gradient of the fused op equal the reference's (same upstream gradient)."""
    out, grads = value_and_grads(ops, name, inp)
    ref_out, ref_grads = value_and_grads(reference, name, inp, upstream=upstream_like(out))
    assert_close_to_reference(out, ref_out, **tol)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert_close_to_reference(g, rg, **tol)


def inputs_in(inp: Inputs, dtype: torch.dtype = torch.float64) -> Inputs:
    """The same values in ``dtype`` (exact when widening: 16-bit -> float32 -> float64), as fresh
    leaves with the same requires_grad flags."""
    def up(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype).requires_grad_(t.requires_grad)

    return Inputs(up(inp.student), [up(f) for f in inp.features], up(inp.beta),
                  None if inp.margins is None else inp.margins.to(dtype))


def check_float32_against_reference(name: str, inp: Inputs, scale: float = FLOAT32_TINY) -> None:
    """Output and every gradient of a float32 call are as close to their float64 value (the
    reference on the same values in float64) as the float32 reference's
    (rounding.assert_rounding_like_control: within 30x, and a result 1 % off fails; ``scale``:
    see rounding.relative_error)."""
    out, grads = value_and_grads(ops, name, inp)
    upstream = upstream_like(out)
    ref_out, ref_grads = value_and_grads(reference, name, inp, upstream=upstream)
    exact_out, exact_grads = value_and_grads(reference, name, inputs_in(inp), upstream=upstream.double())
    assert out.dtype == ref_out.dtype == torch.float32 and len(grads) == len(ref_grads) == len(exact_grads)
    names = ["output"] + [f"gradient {i}" for i in range(len(grads))]
    assert_rounding_like_control([out, *grads], [ref_out, *ref_grads], [exact_out, *exact_grads], names, scale=scale)


def memory_layout_of(t: torch.Tensor) -> Tuple[int, ...]:
    """The strides ``torch.empty_like`` gives a tensor shaped and laid out like ``t``."""
    return torch.empty_like(t).stride()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (for bitwise comparisons: distinguishes -0.0 from 0.0, NaN payloads)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def allocated_bytes(fn: Callable[[], object]) -> Tuple[object, List[int]]:
    """Runs ``fn`` under the profiler with memory tracking and returns its result and the size of
    every allocation the (CPU) caching allocator made during the call, in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
             if e.name() == "[memory]" and e.nbytes() > 0]
    return result, sizes


def away_from_kinks(inp: Inputs, name: str, delta: float = 1e-3) -> bool:
    """True when no element lies within ``delta`` of a point where the op is not differentiable
    (a map at its margin; for partial_l2 also t = 0 or s = t), so finite differences are valid."""
    with torch.no_grad():
        if inp.margins is not None:
            for j, f in enumerate(inp.features):
                m = inp.margins[j].reshape([1, -1] + [1] * (f.dim() - 2))
                if (f - m).abs().min() < delta:
                    return False
        if name == "partial_l2":
            t = reference.aggregate(inp.features, inp.beta, inp.margins)
            if t.abs().min() < delta or (inp.student - t).abs().min() < delta:
                return False
    return True


def randomize_bn(model: torch.nn.Module, seed: int = 0, weight_spread: float = 1.5) -> None:
    """Non-trivial BN affine parameters and running stats, so BN mistakes change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * weight_spread + 0.25)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def autocast_terms(impl: ModuleType, device_type: str, dtype: torch.dtype, x: torch.Tensor,
                   convs: torch.nn.ModuleList, beta: torch.Tensor, margins: torch.Tensor) -> dict:
    """Each op's scalar under ``torch.autocast(device_type, dtype)``: 16-bit conv outputs with
    float32 beta and margins. One scalar per op, compared one by one: in a sum, the partial-L2
    term dominates beta's gradient and would hide a wrong gradient of the other two."""
    with torch.autocast(device_type, dtype=dtype):
        student = convs[0](x)
        features = [conv(x) for conv in convs[1:]]
        assert student.dtype == dtype and all(f.dtype == dtype for f in features)
        assert beta.dtype == torch.float32 and margins.dtype == torch.float32
        agg = impl.aggregate(features, beta, margins)
        assert agg.dtype == dtype
        losses = (impl.bridge_st_loss(student, features, beta), impl.partial_l2(student, features, beta, margins))
        assert all(loss.dtype == torch.float32 for loss in losses)
        return {"aggregate": (agg.float() * aggregate_weight(agg)).sum(), "bridge_st_loss": losses[0].sum(),
                "partial_l2": losses[1].sum()}


def aggregate_weight(agg: torch.Tensor) -> torch.Tensor:
    """Fixed random weights of the aggregate term (float32, ``agg``'s shape and device): its
    upstream gradient does not depend on the 16-bit A, whose rounding may differ by an ulp
    between the paths (a gradient 2A / n of mean(A**2) would carry that difference into beta's)."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(agg.shape, generator=gen).to(agg.device)


def exact_autocast_beta_gradients(device_type: str, dtype: torch.dtype, x: torch.Tensor, convs: torch.nn.ModuleList,
                                  beta: torch.Tensor, margins: torch.Tensor) -> dict:
    """Beta's gradient of each :func:`autocast_terms` scalar computed in float64 from the same
    16-bit maps and the same upstream gradient the ops receive there (for the aggregate term, its
    weights cast to the 16-bit A's dtype, as autograd does)."""
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
        student = convs[0](x)
        features = [conv(x) for conv in convs[1:]]
    upstream = aggregate_weight(features[0]).to(dtype).double()
    s, f = student.double(), [t.double() for t in features]
    b, m = beta.detach().double().requires_grad_(), margins.double()
    return {"aggregate": torch.autograd.grad(reference.aggregate(f, b, m), b, upstream)[0],
            "bridge_st_loss": torch.autograd.grad(reference.bridge_st_loss(s, f, b).sum(), b)[0],
            "partial_l2": torch.autograd.grad(reference.partial_l2(s, f, b, m).sum(), b)[0]}


def check_autocast_gradients(device: str, dtype: torch.dtype, weight_rtol: float) -> None:
    """Under autocast the fused ops' gradients reach beta (float32) and the conv weights and equal
    the reference's under the same autocast, op by op.

    Both paths get the same 16-bit maps and sum beta's gradient from them in float32 (the kernels
    accumulate in float32, the reference upcasts), so beta's gradient is compared with its float64
    value from the same maps (:func:`exact_autocast_beta_gradients`), calibrated by the
    reference's float32 gradient (rounding.assert_rounding_like_control: a gradient 1 % off fails
    by >= 5x; also checked explicitly). The conv weights' gradients come through the 16-bit conv
    backward from 16-bit feature gradients, each of which may round to the neighbouring 16-bit
    value on one path (1 ulp): ``weight_rtol`` (2 ulp of the format) relative to the largest entry."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    k = 3
    convs = torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3, padding=1) for _ in range(k + 1)]).to(device)
    x = torch.randn(2, 3, 7, 9, generator=gen).to(device)
    beta = torch.nn.Parameter(torch.randn(k, generator=gen).to(device))
    margins = (0.3 * torch.randn(k, 4, generator=gen)).to(device)  # conv outputs fall on both sides
    params: List[torch.Tensor] = [beta, *convs.parameters()]
    device_type = torch.device(device).type
    terms = autocast_terms(ops, device_type, dtype, x, convs, beta, margins)
    ref_terms = autocast_terms(reference, device_type, dtype, x, convs, beta, margins)
    exact = exact_autocast_beta_gradients(device_type, dtype, x, convs, beta, margins)
    for name in terms:
        grads = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
        ref_grads = torch.autograd.grad(ref_terms[name], params, retain_graph=True, allow_unused=True)
        assert grads[0].dtype == torch.float32
        _, bound = assert_rounding_like_control([grads[0]], [ref_grads[0]], [exact[name]], [f"{name}: d/dbeta"])
        # Negative control: the bound tells a gradient 1 % off (a wrong scale) from the right one.
        assert relative_error(1.01 * grads[0], exact[name]) > bound, f"{name}: a beta gradient 1 % off passes"
        for g, rg, p in zip(grads[1:], ref_grads[1:], params[1:]):
            if rg is None:  # the student's conv in the aggregate term
                assert g is None, name
                continue
            assert g.dtype == p.dtype and g.device.type == device_type and torch.isfinite(g).all()
            assert g.abs().max() > 0, name
            torch.testing.assert_close(g, rg, rtol=weight_rtol, atol=weight_rtol * float(rg.abs().max()),
                                       msg=lambda m: f"{name}: {m}")


def masked_squared_error(student: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 per sample, written out: (s - t)^2 summed where s > t or t > 0; [B]."""
    keep = (student > t) | (t > 0)
    return ((student - t) ** 2 * keep).flatten(1).sum(1)


def independent_partial_l2(student: torch.Tensor, maps, beta: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """method.md section 6 written out: t = sum_j alpha_j max(T_j, m_j); masked squared error; [B]."""
    alpha = torch.exp(beta) / torch.exp(beta).sum()
    t = sum(a * torch.maximum(m, mg.view(1, -1, 1, 1)) for a, m, mg in zip(alpha, maps, margins))
    return masked_squared_error(student, t)


def assert_top1_near_ties(logits: torch.Tensor, labels: torch.Tensor, reported: float) -> None:
    """``reported`` (a trainer's test top-1, %) is the top-1 of ``logits`` [N, classes] computed here
    in one batch, up to the samples whose two largest logits lie within 1e-4 of their size: the
    trainer evaluates in batches and in its own layout, so its logits differ by float32 rounding (a
    few u of their size, far below 1e-4), which can flip only such near-ties (none, as a rule)."""
    top = logits.topk(2, 1).values
    ties = int(((top[:, 0] - top[:, 1]) <= 1e-4 * top.abs().amax(1)).sum())
    mine = 100.0 * (logits.argmax(1) == labels).double().mean().item()
    assert abs(mine - reported) <= 100.0 * ties / len(labels) + 1e-9, (mine, reported, ties)
