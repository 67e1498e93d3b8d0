"""dfa_ext: fused ops and trainers for DFA knowledge distillation.

``dfa_ext.ops`` holds the fused operations, ``dfa_ext.reference`` their pure-PyTorch definition.
For your own networks, data and loop: ``DFALoss`` (the stage-2 feature loss as a module),
``AggregationSearch`` (stage 1 as an object your loop steps), and the whole runs ``train_teacher``,
``run_search`` and ``run_distill`` with their configs (imported on first use).
"""

from __future__ import annotations

import torch  # must be loaded before the extension (its symbols resolve against libtorch)

from . import _C  # noqa: F401  registers the dfa:: op schemas and device kernels
from . import _autograd, _fake  # noqa: F401  autograd formulas and fake kernels of those ops
from . import ops, reference

__version__ = "0.1.0"
# The public API of the upper layers, imported on first use: `import dfa_ext` stays quick.
_LAZY = {
    "DFALoss": "distill.loss", "AggregationSearch": "search.session", "SearchResult": "search.result",
    "load_search_result": "search.result", "SearchConfig": "search.config", "run_search": "search.searcher",
    "DistillConfig": "distill.config", "run_distill": "distill.trainer", "TeacherConfig": "training.teacher",
    "train_teacher": "training.teacher", "HookedNetwork": "models", "as_bundle": "data",
}
__all__ = ["ops", "reference", "kernels", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dfa_ext' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("dfa::aggregate", key)


def kernels() -> dict:
    """Which kernels this install has and can run.

    Returns a dict: ``cpu`` (CPU kernels built), ``cpu_isa`` (the build of them this process
    runs: ``"avx2"`` (AVX2 + FMA) or ``"default"`` (baseline x86-64, also under
    ``ATEN_CPU_CAPABILITY=default``); their float32 results differ in the last bits),
    ``cuda_compiled`` (CUDA kernels built into the extension), ``cuda`` (compiled *and* a GPU
    is visible, so CUDA tensors run fused) and ``cuda_kernels`` (the CUDA kernel set that runs:
    ``"new"``, the default, or ``"old"``, the set before issue 25 in a build with
    ``DFA_CUDA_OLD_KERNELS=1`` under ``DFA_CUDA_KERNELS=old``; None without CUDA kernels).
    """
    cuda_compiled = _has_kernel("CUDA")
    return {"cpu": _has_kernel("CPU"), "cpu_isa": torch.ops.dfa.cpu_kernel_isa(), "cuda_compiled": cuda_compiled,
            "cuda": cuda_compiled and torch.cuda.is_available(),
            "cuda_kernels": torch.ops.dfa.cuda_kernels() if cuda_compiled else None}
