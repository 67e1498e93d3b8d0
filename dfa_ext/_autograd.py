"""The once-differentiable guard of the DFA backward ops: differentiating dfa::*_backward (a
second-order gradient) raises a clear error.  The autograd formulas of the ops themselves are C++
(csrc/autograd.cpp): registered from Python they cost ~0.3 ms of pytree handling per call."""

from __future__ import annotations

import torch


def _not_twice_differentiable(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"dfa::{op} is not differentiable: the DFA ops support first-order gradients only "
                           f"(use dfa_ext.reference for higher-order derivatives)")
    return backward


def _no_setup(ctx, inputs, output):
    pass


for _op in ("aggregate_backward", "bridge_st_loss_backward", "partial_l2_backward"):
    torch.library.register_autograd(f"dfa::{_op}", _not_twice_differentiable(_op), setup_context=_no_setup)

