"""dfa_ext: fused ops and trainers for DFA knowledge distillation.

``dfa_ext.ops`` holds the fused operations, ``dfa_ext.reference`` their pure-PyTorch definition.
"""

from __future__ import annotations

import torch  # must be loaded before the extension (its symbols resolve against libtorch)

from . import _C  # noqa: F401  registers the dfa:: op schemas and device kernels
from . import _autograd, _fake  # noqa: F401  autograd formulas and fake kernels of those ops
from . import ops, reference

__version__ = "0.1.0"
__all__ = ["ops", "reference", "kernels", "__version__"]


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("dfa::aggregate", key)


def kernels() -> dict:
    """Which kernels this install has and can run.

    Returns a dict: ``cpu`` (CPU kernels built), ``cpu_isa`` (the build of them this process
    runs: ``"avx2"`` (AVX2 + FMA) or ``"default"`` (baseline x86-64, also under
    ``ATEN_CPU_CAPABILITY=default``); their float32 results differ in the last bits),
    ``cuda_compiled`` (CUDA kernels built into the extension) and ``cuda`` (compiled *and* a GPU
    is visible, so CUDA tensors run fused).
    """
    cuda_compiled = _has_kernel("CUDA")
    return {"cpu": _has_kernel("CPU"), "cpu_isa": torch.ops.dfa.cpu_kernel_isa(), "cuda_compiled": cuda_compiled,
            "cuda": cuda_compiled and torch.cuda.is_available()}
