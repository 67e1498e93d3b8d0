"""Build information: dfa_ext.kernels() and importing without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import dfa_ext


def test_cpu_kernels_present() -> None:
    assert dfa_ext.kernels()["cpu"] is True


def test_kernels_keys_and_types() -> None:
    info = dfa_ext.kernels()
    assert set(info) == {"cpu", "cuda_compiled", "cuda"}
    assert all(isinstance(v, bool) for v in info.values())


def test_cuda_false_without_gpu() -> None:
    """kernels()['cuda'] needs both compiled CUDA kernels and a visible GPU."""
    info = dfa_ext.kernels()
    if not torch.cuda.is_available():
        assert info["cuda"] is False
    if not info["cuda_compiled"]:
        assert info["cuda"] is False


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
