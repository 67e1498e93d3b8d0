"""Autograd formulas of the DFA ops (method.md section 4).  Each backward is itself a custom op
(dfa::*_backward) so it runs fused and traces under torch.compile; gradients are computed only for
the inputs that need them.  ``margins`` are fixed buffers (OFD margins from the teacher's BN) and
get no gradient: asking for one is an error, as is differentiating a backward op (the ops are
once differentiable)."""

from __future__ import annotations

import torch


def _any(flags) -> bool:
    return any(flags) if isinstance(flags, (list, tuple)) else bool(flags)


def _feature_grads(grads, needs):
    """Per-feature gradients, None where a map does not require grad (or none were computed)."""
    if not grads:
        return [None] * len(needs)
    return [g if need else None for g, need in zip(grads, needs)]


def _or_none(t: torch.Tensor, need: bool):
    return t if need else None


def _per_input(ctx, grads: tuple) -> tuple:
    """One gradient per argument the op was called with.

    The dispatcher drops trailing arguments equal to their default (margins=None) before autograd
    sees them, so ``needs_input_grad`` is shorter then; some torch versions (2.11) require exactly
    that many gradients, newer ones also accept one per schema argument.
    """
    return grads[:len(ctx.needs_input_grad)]


def _no_margin_grad(op: str, needs_input_grad, index: int) -> None:
    # margins=None has no entry in needs_input_grad (the dispatcher drops defaulted arguments).
    if len(needs_input_grad) > index and needs_input_grad[index]:
        raise RuntimeError(f"dfa::{op}: 'margins' are constants and get no gradient; pass margins.detach()")


# aggregate(features, beta, margins) --------------------------------------------------------------

def _aggregate_setup(ctx, inputs, output):
    features, beta, margins = inputs
    ctx.num_features = len(features)
    ctx.save_for_backward(beta, margins, *features)


def _aggregate_backward(ctx, grad):
    beta, margins, *features = ctx.saved_tensors
    need_features, need_beta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _no_margin_grad("aggregate", ctx.needs_input_grad, 2)
    grad_beta, grad_features = torch.ops.dfa.aggregate_backward(
        grad, features, beta, margins, [need_beta, _any(need_features)])
    return _per_input(ctx, (_feature_grads(grad_features, need_features), _or_none(grad_beta, need_beta), None))


# bridge_st_loss_forward(student, features, beta, eps) -> (loss, stats) ---------------------------

def _bridge_setup(ctx, inputs, output):
    student, features, beta, eps = inputs
    _, stats = output
    ctx.eps = eps
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(student, beta, stats, *features)


def _bridge_backward(ctx, grad_loss, _grad_stats):
    student, beta, stats, *features = ctx.saved_tensors
    need_student, need_features, need_beta = ctx.needs_input_grad[:3]
    grad_student, grad_beta, grad_features = torch.ops.dfa.bridge_st_loss_backward(
        grad_loss, student, features, beta, stats, ctx.eps, [need_student, need_beta, _any(need_features)])
    return (_or_none(grad_student, need_student), _feature_grads(grad_features, need_features),
            _or_none(grad_beta, need_beta), None)


# partial_l2(student, features, beta, margins) ----------------------------------------------------

def _partial_l2_setup(ctx, inputs, output):
    student, features, beta, margins = inputs
    ctx.save_for_backward(student, beta, margins, *features)


def _partial_l2_backward(ctx, grad):
    student, beta, margins, *features = ctx.saved_tensors
    need_student, need_features, need_beta = ctx.needs_input_grad[:3]
    _no_margin_grad("partial_l2", ctx.needs_input_grad, 3)
    grad_student, grad_beta, grad_features = torch.ops.dfa.partial_l2_backward(
        grad, student, features, beta, margins, [need_student, need_beta, _any(need_features)])
    return _per_input(ctx, (_or_none(grad_student, need_student), _feature_grads(grad_features, need_features),
                            _or_none(grad_beta, need_beta), None))


def _not_twice_differentiable(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"dfa::{op} is not differentiable: the DFA ops support first-order gradients only "
                           f"(use dfa_ext.reference for higher-order derivatives)")
    return backward


def _no_setup(ctx, inputs, output):
    pass


for _op in ("aggregate_backward", "bridge_st_loss_backward", "partial_l2_backward"):
    torch.library.register_autograd(f"dfa::{_op}", _not_twice_differentiable(_op), setup_context=_no_setup)

torch.library.register_autograd("dfa::aggregate", _aggregate_backward, setup_context=_aggregate_setup)
torch.library.register_autograd("dfa::bridge_st_loss_forward", _bridge_backward, setup_context=_bridge_setup)
torch.library.register_autograd("dfa::partial_l2", _partial_l2_backward, setup_context=_partial_l2_setup)
