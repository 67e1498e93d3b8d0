"""Pure-PyTorch reference of the three DFA operations (method.md section 4).

The single source of truth for correctness tests and the baseline every benchmark beats.  It
follows the formulas literally with ordinary tensor ops (so autograd derives the gradients), and
shares the numerical conventions of the fused kernels:

* 16-bit maps are computed in float32 (the kernels accumulate in float32); ``aggregate`` returns the
  maps' dtype, the losses are float32 (float64 for float64 maps).
* the margin ReLU is ``where(x < m, m, x)``: a NaN stays NaN and the gradient reaches x where x >= m.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._checks import loss_dtype


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def alpha(beta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """alpha = softmax(beta), [K], computed in ``dtype`` (max-shifted by torch.softmax)."""
    return torch.softmax(beta.to(dtype), dim=0)


def margin_relu(x: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's sigma_m(x) = max(x, m) with one margin per channel (dim 1); margin: [C]."""
    m = margin.to(x.dtype).reshape([1, -1] + [1] * (x.dim() - 2))
    return torch.where(x < m, m, x)


def aggregate(features: Sequence[torch.Tensor], beta: torch.Tensor,
              margins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A = sum_j alpha_j sigma_j(T_j): [B, C, *rest] in the features' dtype."""
    return _aggregate(features, beta, margins).to(features[0].dtype)


def _aggregate(features, beta, margins):
    dtype = _compute_dtype(features[0])
    a = alpha(beta, dtype)
    total = None
    for j, f in enumerate(features):
        f = f.to(dtype)
        if margins is not None:
            f = margin_relu(f, margins[j])
        term = a[j] * f
        total = term if total is None else total + term
    return total


def bridge_st_loss(student: torch.Tensor, features: Sequence[torch.Tensor], beta: torch.Tensor,
                   eps: float = 1e-12) -> torch.Tensor:
    """Per-sample |s/max(|s|,eps) - A/max(|A|,eps)|^2 with A = sum_j alpha_j T_j: [B]."""
    s = student.to(_compute_dtype(student)).flatten(1)
    agg = _aggregate(features, beta, None).flatten(1)
    u = s / s.norm(dim=1, keepdim=True).clamp_min(eps)
    v = agg / agg.norm(dim=1, keepdim=True).clamp_min(eps)
    return (u - v).pow(2).sum(dim=1).to(loss_dtype(student.dtype))


def partial_l2(student: torch.Tensor, features: Sequence[torch.Tensor], beta: torch.Tensor,
               margins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample sum of (s - t)^2 over elements where s > t or t > 0, t = aggregate(...): [B]."""
    s = student.to(_compute_dtype(student))
    t = _aggregate(features, beta, margins)
    mask = ((s > t) | (t > 0)).to(s.dtype)
    return ((s - t).pow(2) * mask).flatten(1).sum(dim=1).to(loss_dtype(student.dtype))
