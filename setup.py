"""Build script for dfa_ext's native kernels.

CPU kernels are always built.  CUDA kernels (csrc/cuda/*.cu, when present) are built when
CUDA_HOME points at a toolkit and either a GPU is visible or FORCE_CUDA=1; FORCE_CPU=1 skips them.
With no GPU visible, TORCH_CUDA_ARCH_LIST defaults to DEFAULT_CUDA_ARCHS.  Set MAX_JOBS to bound
parallel compile jobs and DFA_DEBUG=1 for an unoptimised build with symbols.  DFA_CUDA_OLD_KERNELS=1
also builds the CUDA kernels before issue 25 (csrc/cuda/old/, one more translation unit), selectable
at run time for A/B timing (DFA_CUDA_KERNELS=old or torch.ops.dfa.cuda_kernels("old")).

    pip install --no-build-isolation -e .        # uses the torch already installed
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME as TORCH_CUDA_HOME
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Turing through Hopper, plus PTX so newer GPUs can JIT the kernels.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, else /usr/local/cuda, else what torch guessed.

    torch's own guess follows `which nvcc`, which is wrong when nvcc is a wrapper script outside
    the toolkit, so an explicit or standard location wins.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", TORCH_CUDA_HOME):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/common/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    old_kernels = _flag("DFA_CUDA_OLD_KERNELS")  # not by default: it would double the CUDA compile time
    cuda_defines = ["-DDFA_WITH_CUDA"] + (["-DDFA_CUDA_OLD_KERNELS"] if old_kernels else [])
    debug = _flag("DFA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -Wno-psabi: the baseline build passes 32-byte packs between inline helpers (no ABI boundary).
    cxx_flags = opt + ["-fopenmp-simd", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare", "-Wno-psabi"]
    # at::parallel_for is header code: with torch's OpenMP backend it only runs in parallel when
    # the extension itself is compiled with -fopenmp (it then shares torch's libgomp).
    link_flags = []
    if torch._C.has_openmp:
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cuda_home = _cuda_home()
    gpu_visible = torch.cuda.is_available()
    build_cuda = (
        bool(cuda_sources)
        and not _flag("FORCE_CPU")
        and cuda_home is not None
        and torch.version.cuda is not None
        and (gpu_visible or _flag("FORCE_CUDA"))
    )
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_extension

        cpp_extension.CUDA_HOME = cuda_home  # torch reads its module-level guess when building
        if not gpu_visible and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        nvcc_flags = opt + ["-lineinfo", "--threads", "2"]
        if old_kernels:
            cuda_sources += _sources("csrc/cuda/old/*.cu")
        ext = CUDAExtension(
            "dfa_ext._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + cuda_defines, "nvcc": nvcc_flags + cuda_defines},
            extra_link_args=link_flags,
        )
        built = (f"cpu + cuda{' + old cuda kernels' if old_kernels else ''} (CUDA_HOME={cuda_home}, "
                 f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})")
    else:
        ext = CppExtension("dfa_ext._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
        if not cuda_sources:
            why = "no CUDA sources in csrc/cuda"
        elif _flag("FORCE_CPU"):
            why = "FORCE_CPU=1"
        elif cuda_home is None or torch.version.cuda is None:
            why = "no CUDA toolkit or a CPU-only torch"
        else:
            why = "no GPU visible; set FORCE_CUDA=1 to build them anyway"
        built = f"cpu only ({why})"
    print(f"dfa_ext: building kernels: {built}", file=sys.stderr)
    return ext


setup(
    packages=find_packages(include=["dfa_ext", "dfa_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
