"""``--kernels fused|reference``: the DFA ops as fused kernels or as their pure-PyTorch definition.

Both namespaces have the same functions and signatures (``aggregate``, ``bridge_st_loss``,
``partial_l2``), so a trainer takes one of them and A/B runs differ only in the kernels.
"""

from __future__ import annotations

from types import ModuleType

from . import ops, reference
from .errors import ConfigError

KERNEL_CHOICES = ("fused", "reference")


def dfa_ops(kernels: str) -> ModuleType:
    """``dfa_ext.ops`` for "fused", ``dfa_ext.reference`` for "reference"."""
    if kernels == "fused":
        return ops
    if kernels == "reference":
        return reference
    raise ConfigError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
