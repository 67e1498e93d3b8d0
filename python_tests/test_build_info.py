"""Build information: dfa_ext.kernels() and importing without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfa_ext


def test_cpu_kernels_present() -> None:
    assert dfa_ext.kernels()["cpu"] is True


def test_kernels_keys_and_types() -> None:
    info = dfa_ext.kernels()
    assert set(info) == {"cpu", "cpu_isa", "cuda_compiled", "cuda", "cuda_kernels"}
    assert info["cpu_isa"] in ("avx2", "default")
    assert info["cuda_kernels"] in (("new", "old") if info["cuda_compiled"] else (None,))
    assert all(isinstance(v, bool) for k, v in info.items() if k not in ("cpu_isa", "cuda_kernels"))


def _cpu_has_avx2_and_fma() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    return "avx2" in flags and "fma" in flags


@pytest.mark.parametrize("capability", [None, "default", "avx2"])
def test_cpu_kernel_build_follows_the_cpu_and_aten_cpu_capability(capability) -> None:
    """The AVX2 build of the CPU kernels runs on a CPU with AVX2 and FMA unless
    ATEN_CPU_CAPABILITY=default asks for ATen's baseline kernels, which then selects the baseline
    build here too (so one machine can test what a CPU without AVX2 runs)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    code = "import dfa_ext; print(dfa_ext.kernels()['cpu_isa'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    avx2 = _cpu_has_avx2_and_fma() and sys.platform == "linux" and os.uname().machine == "x86_64"
    assert result.stdout.split()[-1] == ("avx2" if avx2 and capability != "default" else "default")


def test_cuda_means_compiled_and_a_gpu_visible() -> None:
    """kernels()['cuda'] needs both compiled CUDA kernels and a visible GPU, on every build."""
    info = dfa_ext.kernels()
    assert info["cuda"] is (info["cuda_compiled"] and torch.cuda.is_available())


def test_cuda_compiled_agrees_with_the_binary() -> None:
    """kernels() asks the dispatcher; the extension's own bytes must say the same: CUDA kernels
    link it against libc10_cuda (a dynamic-section name), a CPU-only build does not."""
    library = Path(dfa_ext._C.__file__).read_bytes()
    assert (b"libc10_cuda.so" in library) is dfa_ext.kernels()["cuda_compiled"]


def test_force_cuda_build_has_cuda_kernels() -> None:
    """A build with FORCE_CUDA=1 (what CI does) and an nvcc under CUDA_HOME must contain the CUDA
    kernels, GPU or not: kernels()['cuda_compiled'] proves the .cu files were compiled in."""
    if os.environ.get("FORCE_CUDA") != "1":
        pytest.skip("FORCE_CUDA is not '1': a build without it may legitimately be CPU-only")
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        pytest.skip(f"no nvcc at {nvcc}: setup.py builds CPU kernels only without a CUDA toolkit")
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: setup.py cannot build CUDA kernels against it")
    if os.environ.get("FORCE_CPU", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("FORCE_CPU is set: setup.py builds CPU kernels only")
    assert dfa_ext.kernels()["cuda_compiled"] is True, (
        f"FORCE_CUDA=1 and {nvcc} exists, but dfa_ext was built without CUDA kernels: rebuild "
        f"(pip install --no-build-isolation -e . with FORCE_CUDA=1 CUDA_HOME={cuda_home}) and check that "
        f"setup.py printed 'building kernels: cpu + cuda'")


def test_import_with_no_gpu_visible() -> None:
    """A fresh interpreter with every GPU hidden imports dfa_ext and runs an op on CPU."""
    code = ("import torch, dfa_ext; assert not torch.cuda.is_available(); "
            "k = dfa_ext.kernels(); assert k['cpu'] and not k['cuda'], k; "
            "f = [torch.randn(2, 3), torch.randn(2, 3)]; b = torch.randn(2); "
            "torch.testing.assert_close(dfa_ext.ops.aggregate(f, b), dfa_ext.reference.aggregate(f, b))")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_version() -> None:
    assert isinstance(dfa_ext.__version__, str) and dfa_ext.__version__
