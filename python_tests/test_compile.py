"""torch.compile(fullgraph=True, backend="inductor") of a function using all three ops: forward
and backward match the reference evaluated eagerly (float64, rtol = atol = 1e-10).

Marked ``compile``: compiling takes tens of seconds on CPU (deselect with -m "not compile")."""

from __future__ import annotations

from typing import List, Optional

import pytest
import torch

from dfa_ext import ops, reference
from dfa_helpers import F64, make_inputs


def _objective(impl, student: torch.Tensor, features: List[torch.Tensor], beta: torch.Tensor,
               margins: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """Uses every op: the aggregation feeds a further computation, plus both losses."""
    agg = impl.aggregate(features, beta, margins)
    return ((agg * weight).sum() + impl.bridge_st_loss(student, features, beta).sum()
            + 0.5 * impl.partial_l2(student, features, beta, margins).sum())


@pytest.mark.compile
def test_compiled_forward_backward_matches_reference() -> None:
    """Compiled loss and gradients (student, beta, features) equal the reference's; one graph,
    compiled once for two calls with new values."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda *a: _objective(ops, *a), fullgraph=True, backend=counter)
    for seed in (0, 1):  # the second call reuses the compiled graph with new values
        inp = make_inputs((2, 3, 5, 4), 3, margins=True, seed=seed)
        weight = torch.randn(inp.features[0].shape, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed))
        leaves = [inp.student, inp.beta, *inp.features]
        loss = compiled(inp.student, inp.features, inp.beta, inp.margins, weight)
        grads = torch.autograd.grad(loss, leaves)
        ref_loss = _objective(reference, inp.student, inp.features, inp.beta, inp.margins, weight)
        ref_grads = torch.autograd.grad(ref_loss, leaves)
        torch.testing.assert_close(loss, ref_loss, **F64)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, **F64)
    assert counter.frame_count == 1
    graph_ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"dfa.aggregate", "dfa.bridge_st_loss", "dfa.partial_l2"} <= graph_ops, graph_ops
