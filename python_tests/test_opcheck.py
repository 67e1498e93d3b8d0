"""torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch) of every
torch.ops.dfa op, forward and backward, on several sample inputs."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import dfa_ext
from dfa_helpers import Inputs, make_inputs, seed_of

EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample input: map dtype and shape, layout, whether leaves require grad, margins, and
    whether the backward ops are asked for every gradient or only some."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    layout: str
    requires_grad: bool
    margins: bool
    all_grads: bool
    beta_dtype: torch.dtype = None  # defaults to the map dtype

    def id(self) -> str:
        return (f"{str(self.dtype)[6:]}-{'x'.join(map(str, self.shape))}-{self.layout}-"
                f"{'rg' if self.requires_grad else 'norg'}-{'m' if self.margins else 'nom'}-"
                f"{'all' if self.all_grads else 'some'}")


SAMPLES = [
    Sample(torch.float64, (2, 3, 4, 5), "contiguous", True, True, True),
    Sample(torch.float64, (2, 3, 5), "contiguous", False, False, False),
    Sample(torch.float32, (2, 3, 4, 5), "channels_last", True, False, False),
    Sample(torch.float32, (2, 3, 4, 5), "channels_last", False, True, True),
    Sample(torch.float32, (3, 4), "contiguous", True, True, False),
    Sample(torch.bfloat16, (2, 3, 2, 3), "contiguous", True, True, True, beta_dtype=torch.float32),
]


def _inputs(s: Sample) -> Inputs:
    requires = ("student", "beta", "features") if s.requires_grad else ()
    return make_inputs(s.shape, 3, dtype=s.dtype, layout=s.layout, margins=s.margins, beta_dtype=s.beta_dtype,
                       requires_grad=requires, seed=seed_of(s.id()))


def _mask(n: int, all_grads: bool) -> List[bool]:
    return [True] * n if all_grads else [i % 2 == 1 for i in range(n)]


def _map_grad(inp: Inputs) -> torch.Tensor:
    return torch.randn_like(inp.features[0])


def _loss_grad(inp: Inputs) -> torch.Tensor:
    return torch.randn(inp.student.shape[0], dtype=torch.float64 if inp.student.dtype == torch.float64
                       else torch.float32)


def _stats(inp: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.dfa.bridge_st_loss_forward(inp.student, inp.features, inp.beta, EPS)[1]


# op name -> (op, function building its args from the inputs and the sample)
OPS: Dict[str, Tuple[Callable, Callable[[Inputs, Sample], tuple]]] = {
    "aggregate": (torch.ops.dfa.aggregate.default, lambda i, s: (i.features, i.beta, i.margins)),
    "bridge_st_loss": (torch.ops.dfa.bridge_st_loss.default, lambda i, s: (i.student, i.features, i.beta, EPS)),
    "bridge_st_loss_forward": (torch.ops.dfa.bridge_st_loss_forward.default,
                               lambda i, s: (i.student, i.features, i.beta, EPS)),
    "partial_l2": (torch.ops.dfa.partial_l2.default, lambda i, s: (i.student, i.features, i.beta, i.margins)),
    "aggregate_backward": (torch.ops.dfa.aggregate_backward.default,
                           lambda i, s: (_map_grad(i), i.features, i.beta, i.margins, _mask(2, s.all_grads))),
    "bridge_st_loss_backward": (torch.ops.dfa.bridge_st_loss_backward.default,
                                lambda i, s: (_loss_grad(i), i.student, i.features, i.beta, _stats(i), EPS,
                                              _mask(3, s.all_grads))),
    "partial_l2_backward": (torch.ops.dfa.partial_l2_backward.default,
                            lambda i, s: (_loss_grad(i), i.student, i.features, i.beta, i.margins,
                                          _mask(3, s.all_grads))),
}


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id() for s in SAMPLES])
@pytest.mark.parametrize("name", list(OPS))
def test_opcheck(name: str, sample: Sample) -> None:
    """opcheck passes for every op and sample.  The backward ops are once-differentiable only
    (their autograd formula raises), so they are checked on inputs that do not require grad."""
    op, build = OPS[name]
    if name.endswith("_backward"):
        sample = dataclasses.replace(sample, requires_grad=False)
    torch.library.opcheck(op, build(_inputs(sample), sample))


def test_backward_ops_refuse_double_backward() -> None:
    """Differentiating through a backward op raises a clear error instead of returning None."""
    inp = make_inputs((2, 3, 4), 2, dtype=torch.float64, requires_grad=("student", "beta"), seed=3)
    loss = torch.ops.dfa.partial_l2(inp.student, inp.features, inp.beta, None).sum()
    (grad_student,) = torch.autograd.grad(loss, inp.student, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(grad_student.sum(), inp.student)


def test_every_dfa_op_is_checked() -> None:
    """Every tensor operator of the dfa namespace appears in OPS (a new op must get an opcheck);
    ``cpu_kernel_isa`` and, in CUDA builds, ``cuda_kernels`` only report build information
    (test_build_info checks them)."""
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("dfa::")}
    info = {"cpu_kernel_isa"} | ({"cuda_kernels"} if dfa_ext.kernels()["cuda_compiled"] else set())
    assert registered == set(OPS) | info


@pytest.mark.parametrize("op", ["aggregate", "partial_l2"])
def test_margins_get_no_gradient(op: str) -> None:
    """A gradient asked of the margins is refused at backward in one line naming them (the C++
    autograd formula, csrc/autograd.cpp); detached margins pass (the control)."""
    inp = make_inputs((2, 3, 4), 2, dtype=torch.float64, requires_grad=("beta",), seed=5)
    margins = -torch.rand(2, 3, dtype=torch.float64)
    call = {"aggregate": lambda m: torch.ops.dfa.aggregate(inp.features, inp.beta, m),
            "partial_l2": lambda m: torch.ops.dfa.partial_l2(inp.student, inp.features, inp.beta, m)}[op]
    with pytest.raises(RuntimeError, match=r"^dfa::\w+: 'margins' are constants and get no gradient; pass margins.detach\(\)$"):
        call(margins.clone().requires_grad_()).sum().backward()
    (grad_beta,) = torch.autograd.grad(call(margins).sum(), inp.beta)
    assert torch.isfinite(grad_beta).all()
