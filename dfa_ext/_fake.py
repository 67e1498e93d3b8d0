"""Fake (meta) kernels of every DFA op: output shapes, dtypes and strides without touching data,
so the ops trace under torch.compile / export.  Strides follow ``torch.empty_like`` exactly as the
real kernels do (csrc/common/inputs.cpp, MapOutput)."""

from __future__ import annotations

import torch

from . import _checks


def _empty_grads(like, needed: bool):
    return [torch.empty_like(t) for t in like] if needed else []


def _maybe_empty_like(t: torch.Tensor, needed: bool) -> torch.Tensor:
    return torch.empty_like(t) if needed else t.new_empty((0,))


@torch.library.register_fake("dfa::aggregate")
def _aggregate_fake(features, beta, margins=None):
    ref = _checks.check_aggregate(features, beta, margins)
    return torch.empty_like(ref)


@torch.library.register_fake("dfa::aggregate_backward")
def _aggregate_backward_fake(grad, features, beta, margins, output_mask):
    ref = _checks.check_aggregate(features, beta, margins)
    _checks.check_same_map("aggregate_backward", "grad", grad, ref)
    need_beta, need_features = output_mask
    return _maybe_empty_like(beta, need_beta), _empty_grads(features, need_features)


@torch.library.register_fake("dfa::bridge_st_loss_forward")
def _bridge_st_loss_forward_fake(student, features, beta, eps):
    ref = _checks.check_bridge_st_loss(student, features, beta, eps)
    dtype = _checks.loss_dtype(ref.dtype)
    b, k = ref.shape[0], len(features)
    return ref.new_empty((b,), dtype=dtype), ref.new_empty((b, 2 * k + 1), dtype=dtype)


@torch.library.register_fake("dfa::bridge_st_loss_backward")
def _bridge_st_loss_backward_fake(grad, student, features, beta, stats, eps, output_mask):
    ref = _checks.check_bridge_st_loss(student, features, beta, eps)
    b, k = ref.shape[0], len(features)
    _checks.check_per_sample("bridge_st_loss_backward", "grad", grad, [b], ref)
    _checks.check_per_sample("bridge_st_loss_backward", "stats", stats, [b, 2 * k + 1], ref)
    need_student, need_beta, need_features = output_mask
    return (_maybe_empty_like(student, need_student), _maybe_empty_like(beta, need_beta),
            _empty_grads(features, need_features))


@torch.library.register_fake("dfa::partial_l2")
def _partial_l2_fake(student, features, beta, margins=None):
    ref = _checks.check_partial_l2(student, features, beta, margins)
    return ref.new_empty((ref.shape[0],), dtype=_checks.loss_dtype(ref.dtype))


@torch.library.register_fake("dfa::partial_l2_backward")
def _partial_l2_backward_fake(grad, student, features, beta, margins, output_mask):
    ref = _checks.check_partial_l2(student, features, beta, margins)
    _checks.check_per_sample("partial_l2_backward", "grad", grad, [ref.shape[0]], ref)
    need_student, need_beta, need_features = output_mask
    return (_maybe_empty_like(student, need_student), _maybe_empty_like(beta, need_beta),
            _empty_grads(features, need_features))
