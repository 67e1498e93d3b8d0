"""Invalid arguments raise a ValueError whose message names the argument, through dfa_ext.ops
(Python checks) and directly through torch.ops.dfa.* (C++ checks)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

from dfa_ext import ops

D = torch.ops.dfa
MAPS = (2, 3, 4)  # [B, C, L], K = 2


def _valid() -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return dict(student=torch.randn(MAPS, generator=gen),
                features=[torch.randn(MAPS, generator=gen) for _ in range(2)],
                beta=torch.randn(2, generator=gen), margins=None, eps=1e-12)


def _call(path: str, op: str, a: Dict[str, Any]) -> torch.Tensor:
    """Calls ``op`` through dfa_ext.ops ("ops") or torch.ops.dfa ("torch.ops") with arguments ``a``."""
    if op == "aggregate":
        args: Tuple = (a["features"], a["beta"], a["margins"])
    elif op == "bridge_st_loss":
        args = (a["student"], a["features"], a["beta"], a["eps"])
    else:
        args = (a["student"], a["features"], a["beta"], a["margins"])
    return getattr(ops if path == "ops" else D, op)(*args)


@dataclasses.dataclass
class Bad:
    """One invalid call: the argument it names, the ops it applies to, and the overrides."""

    id: str
    arg: str  # regex the message must contain, e.g. "'beta'"
    ops: Tuple[str, ...]
    overrides: Callable[[Dict[str, Any]], Dict[str, Any]]


ALL = ("aggregate", "bridge_st_loss", "partial_l2")
WITH_STUDENT = ("bridge_st_loss", "partial_l2")
WITH_MARGINS = ("aggregate", "partial_l2")

BAD: List[Bad] = [
    Bad("empty_features", "'features'", ALL, lambda a: dict(features=[])),
    Bad("features_shapes_differ", r"'features\[1\]'", ALL,
        lambda a: dict(features=[a["features"][0], torch.randn(2, 3, 5)])),
    Bad("features_dtypes_differ", r"'features\[1\]'", ALL,
        lambda a: dict(features=[a["features"][0], a["features"][1].double()])),
    Bad("features_integer", "'features'", ALL,
        lambda a: dict(features=[torch.ones(MAPS, dtype=torch.int32)] * 2,
                       student=torch.ones(MAPS, dtype=torch.int32))),
    Bad("features_1d", "'features'", ALL, lambda a: dict(features=[torch.randn(3)] * 2, student=torch.randn(3))),
    Bad("beta_2d", "'beta'", ALL, lambda a: dict(beta=a["beta"][None])),
    Bad("beta_0d", "'beta'", ALL, lambda a: dict(beta=torch.tensor(0.5))),
    Bad("beta_too_long", "'beta'", ALL, lambda a: dict(beta=torch.randn(3))),
    Bad("beta_too_short", "'beta'", ALL, lambda a: dict(beta=torch.randn(1))),
    Bad("beta_integer", "'beta'", ALL, lambda a: dict(beta=torch.ones(2, dtype=torch.int64))),
    Bad("beta_other_device", "'beta'", ALL, lambda a: dict(beta=a["beta"].to("meta"))),
    Bad("student_shape", "'student'", WITH_STUDENT, lambda a: dict(student=torch.randn(2, 3, 5))),
    Bad("student_dtype", "'student'", WITH_STUDENT, lambda a: dict(student=a["student"].double())),
    Bad("margins_wrong_c", "'margins'", WITH_MARGINS, lambda a: dict(margins=torch.randn(2, 4))),
    Bad("margins_wrong_k", "'margins'", WITH_MARGINS, lambda a: dict(margins=torch.randn(3, 3))),
    Bad("margins_1d", "'margins'", WITH_MARGINS, lambda a: dict(margins=torch.randn(6))),
    Bad("margins_integer", "'margins'", WITH_MARGINS, lambda a: dict(margins=torch.ones(2, 3, dtype=torch.int64))),
    Bad("eps_zero", "'eps'", ("bridge_st_loss",), lambda a: dict(eps=0.0)),
    Bad("eps_negative", "'eps'", ("bridge_st_loss",), lambda a: dict(eps=-1e-12)),
    Bad("eps_nan", "'eps'", ("bridge_st_loss",), lambda a: dict(eps=float("nan"))),
    Bad("eps_inf", "'eps'", ("bridge_st_loss",), lambda a: dict(eps=float("inf"))),
]

CASES = [pytest.param(bad, op, path, id=f"{bad.id}-{op}-{path}")
         for bad in BAD for op, path in itertools.product(bad.ops, ("ops", "torch.ops"))]


@pytest.mark.parametrize("bad,op,path", CASES)
def test_bad_argument_raises_value_error(bad: Bad, op: str, path: str) -> None:
    """The call raises ValueError naming the argument."""
    args = _valid()
    args.update(bad.overrides(args))
    with pytest.raises(ValueError, match=bad.arg):
        _call(path, op, args)


@pytest.mark.parametrize("op", WITH_MARGINS)
def test_margins_requiring_grad_rejected(op: str) -> None:
    """Margins are constants: dfa_ext.ops refuses margins that require grad (when grad is enabled)."""
    args = _valid()
    args["margins"] = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="'margins'"):
        _call("ops", op, args)
    with torch.no_grad():
        _call("ops", op, args)  # no graph is built: accepted


def test_features_not_a_list() -> None:
    """A stacked tensor instead of a list of maps is rejected, naming 'features'."""
    args = _valid()
    with pytest.raises(ValueError, match="'features'"):
        ops.aggregate(torch.stack(args["features"]), args["beta"])


def _backward_args(op: str, **overrides: Any) -> Tuple:
    a = _valid()
    s, f, b = a["student"], a["features"], a["beta"]
    grad_b = overrides.get("grad", torch.randn(2))
    if op == "aggregate_backward":
        return (overrides.get("grad", torch.randn(MAPS)), f, b, overrides.get("margins"), [True, True])
    if op == "bridge_st_loss_backward":
        stats = overrides.get("stats", D.bridge_st_loss_forward(s, f, b, 1e-12)[1])
        return (grad_b, s, f, b, stats, overrides.get("eps", 1e-12), [True, True, True])
    return (grad_b, overrides.get("student", s), f, b, None, [True, True, True])


BACKWARD_BAD: List[Tuple[str, str, Dict[str, Any]]] = [
    ("aggregate_backward", "'grad'", dict(grad=torch.randn(2, 3, 5))),
    ("aggregate_backward", "'grad'", dict(grad=torch.randn(MAPS, dtype=torch.float64))),
    ("aggregate_backward", "'margins'", dict(margins=torch.randn(2, 4))),
    ("bridge_st_loss_backward", "'grad'", dict(grad=torch.randn(3))),
    ("bridge_st_loss_backward", "'stats'", dict(stats=torch.randn(2, 4))),
    ("bridge_st_loss_backward", "'stats'", dict(stats=torch.ones(2, 5, dtype=torch.int64))),
    ("bridge_st_loss_backward", "'eps'", dict(eps=0.0)),
    ("partial_l2_backward", "'grad'", dict(grad=torch.randn(2, 1))),
    ("partial_l2_backward", "'student'", dict(student=torch.randn(2, 3, 5))),
]


@pytest.mark.parametrize("op,arg,overrides", BACKWARD_BAD,
                         ids=[f"{op}-{arg.strip(chr(39))}-{i}" for i, (op, arg, _) in enumerate(BACKWARD_BAD)])
def test_backward_op_bad_argument(op: str, arg: str, overrides: Dict[str, Any]) -> None:
    """The backward ops check their arguments too (direct torch.ops.dfa calls)."""
    args = _backward_args(op, **overrides)
    with pytest.raises(ValueError, match=arg):
        getattr(D, op)(*args)
