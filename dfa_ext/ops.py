"""The fused DFA operations (method.md section 4) as differentiable PyTorch ops.

All three take the K teacher maps of one layer group as a list (never stacked), ``beta`` of length
K (``alpha = softmax(beta)``) and work for any map shape ``[B, C, *rest]`` in float16, bfloat16,
float32 or float64, contiguous or channels_last.  They are differentiable in ``student``, ``beta``
and ``features`` (feature gradients are computed only when a map requires grad); ``margins`` are
constants.  The same ops are ``torch.ops.dfa.aggregate``, ``torch.ops.dfa.bridge_st_loss`` and
``torch.ops.dfa.partial_l2``; :mod:`dfa_ext.reference` is their pure-PyTorch definition.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks

__all__ = ["aggregate", "bridge_st_loss", "partial_l2"]


def _as_list(features: Sequence[torch.Tensor]) -> list:
    return list(features) if isinstance(features, (list, tuple)) else features


def _check_constant_margins(op: str, margins: Optional[torch.Tensor]) -> None:
    if margins is not None and margins.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"dfa::{op}: 'margins' are constants (OFD margins of the teacher's BN layers) and get "
                         f"no gradient; pass margins.detach()")


def aggregate(features: Sequence[torch.Tensor], beta: torch.Tensor,
              margins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted aggregation of one group's teacher maps.

    A = sum_j softmax(beta)_j * sigma_j(T_j), where sigma_j(x) = max(x, margins[j, c]) per channel c
    (OFD margin ReLU) when ``margins`` is given, else the identity.

    Args:
        features: K tensors [B, C, *rest] of one shape, dtype and device.
        beta: [K] architecture parameters (any float dtype, e.g. float32 under autocast).
        margins: optional [K, C] per-layer, per-channel margins.

    Returns:
        A: [B, C, *rest] in the features' dtype and memory layout.
    """
    features = _as_list(features)
    _checks.check_aggregate(features, beta, margins)
    _check_constant_margins("aggregate", margins)
    return torch.ops.dfa.aggregate(features, beta, margins)


def bridge_st_loss(student: torch.Tensor, features: Sequence[torch.Tensor], beta: torch.Tensor,
                   eps: float = 1e-12) -> torch.Tensor:
    """Student-to-teacher bridge loss (DFA paper eq. 11), per sample.

    loss_b = | s_b / max(|s_b|, eps) - A_b / max(|A_b|, eps) |^2  (= 2 - 2 cos(s_b, A_b) away from
    eps), with A = sum_j softmax(beta)_j T_j and norms over all of a sample's elements.  A is never
    materialised.

    Args:
        student: [B, C, *rest], the ST connector's output (same shape and dtype as the maps).
        features: K tensors [B, C, *rest].
        beta: [K].
        eps: lower bound of the norms (> 0); keeps zero maps finite.

    Returns:
        [B] per-sample loss, float32 (float64 for float64 inputs).
    """
    features = _as_list(features)
    _checks.check_bridge_st_loss(student, features, beta, eps)
    return torch.ops.dfa.bridge_st_loss(student, features, beta, float(eps))


def partial_l2(student: torch.Tensor, features: Sequence[torch.Tensor], beta: torch.Tensor,
               margins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OFD partial L2 between the student and the margin-transformed aggregation, per sample.

    With t = aggregate(features, beta, margins):
    loss_b = sum over the elements of sample b of (s - t)^2 * [(s > t) or (t > 0)].

    Args:
        student: [B, C, *rest], the ST connector's output in teacher channels.
        features: K tensors [B, C, *rest].
        beta: [K].
        margins: optional [K, C] margins.

    Returns:
        [B] per-sample loss (a sum over elements, not a mean), float32 (float64 for float64 inputs).
    """
    features = _as_list(features)
    _checks.check_partial_l2(student, features, beta, margins)
    _check_constant_margins("partial_l2", margins)
    return torch.ops.dfa.partial_l2(student, features, beta, margins)
