"""Argument checks of the DFA ops, shared by the public wrappers and the fake (meta) kernels.

The C++ kernels enforce the same rules (csrc/common/inputs.cpp) for direct ``torch.ops.dfa``
calls; these run first so a user of :mod:`dfa_ext.ops` (eager or under ``torch.compile``) gets a
``ValueError`` naming the argument before anything is dispatched.  Metadata only: no data access.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_MAX_FEATURES = 64  # kMaxK in csrc/cuda/map_kernels.cuh: map pointers are passed by value


def _fail(op: str, message: str) -> None:
    raise ValueError(f"dfa::{op}: {message}")


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def check_features(op: str, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Checks the K feature maps and returns the first (the reference for every other check)."""
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
        _fail(op, f"'features' must be a list or tuple of K tensors of shape [B, C, *rest], got {type(features).__name__}")
    if len(features) == 0:
        _fail(op, "'features' must hold at least one feature map, got an empty list")
    for j, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            _fail(op, f"'features[{j}]' must be a tensor, got {type(f).__name__}")
    ref = features[0]
    if ref.device.type == "cuda" and len(features) > CUDA_MAX_FEATURES:
        # Checked here as well as in C++: on the GPU machine (torch 2.11) the C++ check crashed
        # the process instead of raising (see bench/RESULTS.md), so the wrapper never calls it.
        _fail(op, f"the CUDA kernels take at most {CUDA_MAX_FEATURES} feature maps per call, got {len(features)}")
    if ref.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"'features' must be float16, bfloat16, float32 or float64, got {ref.dtype}")
    if ref.dim() < 2:
        _fail(op, f"'features' must have at least 2 dims [B, C, *rest], got shape {_shape(ref)}")
    for j, f in enumerate(features[1:], start=1):
        check_same_map(op, f"features[{j}]", f, ref)
    return ref


def check_same_map(op: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"'{name}' must be a tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        _fail(op, f"'{name}' must have the shape of the feature maps {_shape(ref)}, got {_shape(t)}")
    if t.dtype != ref.dtype:
        _fail(op, f"'{name}' must have the dtype of the feature maps ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        _fail(op, f"'{name}' must be on the device of the feature maps ({ref.device}), got {t.device}")


def check_beta(op: str, beta: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    if not isinstance(beta, torch.Tensor):
        _fail(op, f"'beta' must be a 1-D tensor of length K={k}, got {type(beta).__name__}")
    if beta.dim() != 1 or beta.shape[0] != k:
        _fail(op, f"'beta' must be a 1-D tensor of length K={k} (one weight per feature map), got shape {_shape(beta)}")
    if beta.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"'beta' must be a floating-point tensor, got {beta.dtype}")
    if beta.device != ref.device:
        _fail(op, f"'beta' must be on the device of the feature maps ({ref.device}), got {beta.device}")


def check_margins(op: str, margins: Optional[torch.Tensor], ref: torch.Tensor, k: int) -> None:
    if margins is None:
        return
    c = ref.shape[1]
    if not isinstance(margins, torch.Tensor):
        _fail(op, f"'margins' must be a [K, C] = [{k}, {c}] tensor or None, got {type(margins).__name__}")
    if margins.dim() != 2 or margins.shape[0] != k or margins.shape[1] != c:
        _fail(op, f"'margins' must have shape [K, C] = [{k}, {c}] (one margin per feature map and channel), "
                  f"got {_shape(margins)}")
    if margins.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"'margins' must be a floating-point tensor, got {margins.dtype}")
    if margins.device != ref.device:
        _fail(op, f"'margins' must be on the device of the feature maps ({ref.device}), got {margins.device}")


def check_per_sample(op: str, name: str, t: torch.Tensor, shape: Sequence[int], ref: torch.Tensor) -> None:
    if list(t.shape) != list(shape):
        _fail(op, f"'{name}' must have shape {list(shape)}, got {_shape(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"'{name}' must be floating point, got {t.dtype}")
    if t.device != ref.device:
        _fail(op, f"'{name}' must be on the device of the feature maps ({ref.device}), got {t.device}")


def check_eps(op: str, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0 < float(eps) < float("inf")):
        _fail(op, f"'eps' must be a positive finite number, got {eps!r}")


def loss_dtype(feature_dtype: torch.dtype) -> torch.dtype:
    """Per-sample losses are returned in float32 (float64 for float64 maps), like the kernels'
    accumulation type, so 16-bit maps do not round the loss to 16 bits."""
    return torch.float64 if feature_dtype == torch.float64 else torch.float32


def check_aggregate(features, beta, margins) -> torch.Tensor:
    ref = check_features("aggregate", features)
    check_beta("aggregate", beta, ref, len(features))
    check_margins("aggregate", margins, ref, len(features))
    return ref


def check_bridge_st_loss(student, features, beta, eps) -> torch.Tensor:
    ref = check_features("bridge_st_loss", features)
    check_same_map("bridge_st_loss", "student", student, ref)
    check_beta("bridge_st_loss", beta, ref, len(features))
    check_eps("bridge_st_loss", eps)
    return ref


def check_partial_l2(student, features, beta, margins) -> torch.Tensor:
    ref = check_features("partial_l2", features)
    check_same_map("partial_l2", "student", student, ref)
    check_beta("partial_l2", beta, ref, len(features))
    check_margins("partial_l2", margins, ref, len(features))
    return ref
