"""The CUDA kernels' resources, from the compiler (bench/cuda_resources.py), checked without a GPU:
the hot map kernels do not spill (except the spills already known, which issue 25 is to remove),
load 128-bit vectors in their vectorised variants, and keep at least 2 blocks per SM."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import cuda_resources  # noqa: E402

NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
pytestmark = pytest.mark.skipif(not NVCC.exists() and shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc)")

# Spills measured in bench/RESULTS.md ("CUDA resources"): (kernel, dtype, VEC) -> (store, load) bytes.
KNOWN_SPILLS = {("aggregate_forward_kernel", "bf16", 8): (8, 12), ("aggregate_forward_kernel", "fp16", 8): (8, 12)}


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    home = str(NVCC.parents[1]) if NVCC.exists() else str(Path(shutil.which("nvcc")).resolve().parents[1])
    return cuda_resources.report("90", home, tmp_path_factory.mktemp("sm90"))


def test_every_hot_kernel_is_reported_in_every_dtype(sm90):
    hot = {(r.kernel, r.dtype) for r in sm90 if r.kernel in cuda_resources.MAP_KERNELS and r.vec and r.vec > 1}
    assert hot == {(k, d) for k in cuda_resources.MAP_KERNELS for d in ("fp32", "fp64", "bf16", "fp16")}
    assert all(r.registers > 0 for r in sm90)


def test_no_new_spills_and_vector_loads_in_the_hot_kernels(sm90):
    for r in sm90:
        if r.kernel not in cuda_resources.MAP_KERNELS or r.dtype == "fp64":
            continue
        spills = (r.spill_stores, r.spill_loads)
        assert spills == KNOWN_SPILLS.get((r.kernel, r.dtype, r.vec), (0, 0)), (r.kernel, r.dtype, r.vec, spills)
        assert r.blocks_per_sm >= 2, (r.kernel, r.dtype, r.vec, r.registers)
        if r.vec > 1:  # the vectorised variant streams the maps in 16-byte loads
            assert r.loads.get(128, 0) > 0, (r.kernel, r.dtype, r.loads)


def test_occupancy_arithmetic():
    # 128 registers: 4,096 per warp, 16 warps per SM, two 8-warp blocks; 64: four; shared memory limits too
    assert cuda_resources.blocks_per_sm(128, 0, 256, "90") == 2
    assert cuda_resources.blocks_per_sm(64, 0, 256, "90") == 4
    assert cuda_resources.blocks_per_sm(100, 0, 256, "90") == 2  # 104 after rounding: 3,328 per warp
    assert cuda_resources.blocks_per_sm(32, 100 * 1024, 256, "90") == 2
