"""The GPU under torchrun: the commands run as `torchrun --standalone --nproc_per_node 1 -m dfa_ext
... --device cuda` (one process, one GPU), and the process group dfa_ext joins on a GPU is NCCL,
whose collectives carry DistContext's float64 sums.

With one process init_from_env joins no group at all (launched_world_size() <= 1: nothing to
synchronise), so the torchrun runs cannot show the backend; the in-process test joins the group as
a second process would, and reads torch.distributed.get_backend(). Several processes need several
GPUs under NCCL (two ranks on one GPU are refused), so this machine's one H200 tests world size 1;
test_distributed.py covers several processes with gloo.

Skipped when no GPU is visible; run by bench/gpu_check.sh on the GPU machine. The device is
``DFA_GPU_TEST_DEVICE`` (default "cuda"); ``DFA_GPU_TEST_DEVICE=cpu`` runs the same tests on the
CPU, where the group is gloo, to check this file's logic without a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dfa_ext import models
from dfa_ext.training import load_checkpoint
from dfa_ext.training import distributed
from dfa_ext.training.checkpoint import model_record, save_checkpoint
from dfa_ext.training.distributed import DistContext, current_context, init_from_env, shutdown

DEVICE = os.environ.get("DFA_GPU_TEST_DEVICE", "cuda")
ON_GPU = torch.device(DEVICE).type == "cuda"
BACKEND = "nccl" if ON_GPU else "gloo"  # what init_from_env must pick for DEVICE

pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (DFA_GPU_TEST_DEVICE=cpu runs it on the CPU with gloo)")

COMMON_ARGS = ["--data", "digits", "--device", DEVICE, "--no-progress", "--no-tensorboard"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised resnet14 teacher for the 8x8 digits (3 groups of 2 layers): these
    tests are about the launch, not about what is learned."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, {"kind": "teacher",
                           "model": model_record(models.create("resnet14", num_classes=10, in_channels=1), "resnet14",
                                                 10, 1)})
    return str(path)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 1 -m dfa_ext ARGS`, as a user launches it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "dfa_ext", *args, *COMMON_ARGS], capture_output=True, text=True, env=env, timeout=300)


def test_distill_runs_under_torchrun_on_one_gpu(tmp_path: Path, teacher: str) -> None:
    out = tmp_path / "kd"
    done = torchrun("distill", "--method", "kd", "--teacher", teacher, "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("distill kd: resnet8 on digits: best test top-1") == 1, done.stdout
    state = load_checkpoint(out / "last.pt", kind="distill")
    assert state["epoch"] == 1 and state["method"] == "kd"
    assert json.loads((out / "config.json").read_text())["device"] == DEVICE


def test_search_runs_under_torchrun_on_one_gpu(tmp_path: Path, teacher: str) -> None:
    out = tmp_path / "search"
    done = torchrun("search", "--teacher", teacher, "--steps-per-group", "2", "--batch-size", "32", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("search resnet14 -> resnet8 on digits") == 1, done.stdout
    assert load_checkpoint(out / "last.pt", kind="search")["step"] == 6  # 3 groups x 2 steps
    groups = json.loads((out / "search.json").read_text())["groups"]
    assert len(groups) == 3 and all(abs(sum(g["alpha"]) - 1) < 1e-5 for g in groups)


def test_process_group_on_the_gpu_is_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """init_from_env as a torchrun rank 0 of a GPU run: NCCL, this process on GPU LOCAL_RANK; and
    DistContext's collectives (float64 copies, moved to the GPU under NCCL) work over it."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert init_from_env(DEVICE) == DistContext() and not dist.is_initialized()  # one process: no group
    # join as every rank of a larger launch does (the group itself has the one process)
    monkeypatch.setattr(distributed, "launched_world_size", lambda: 2)
    try:
        context = init_from_env(DEVICE)
        assert dist.is_initialized() and dist.get_backend() == BACKEND
        assert context == current_context() == DistContext(rank=0, world_size=1)
        if ON_GPU:
            assert torch.cuda.current_device() == 0
        # A context that counts two processes in this group of one: every all-reduce sums the one
        # contribution, so the sums come back unchanged (float64, on the CPU) and the averages halve,
        # in each tensor's own dtype and device.
        claimed = DistContext(rank=0, world_size=2)
        values = torch.tensor([1.5, -2.0, 1e-300, 3.0], dtype=torch.float64)
        total = claimed.all_reduce_sum(values)
        assert total.dtype == torch.float64 and total.device.type == "cpu" and torch.equal(total, values)
        assert torch.equal(claimed.all_reduce_max(values), values)
        on_device = [torch.tensor([4.0, -6.0], device=DEVICE), torch.tensor([[2.0], [8.0]], device=DEVICE).double()]
        claimed.average_(on_device)
        assert on_device[0].dtype == torch.float32 and on_device[0].device.type == torch.device(DEVICE).type
        assert on_device[0].tolist() == [2.0, -3.0] and on_device[1].tolist() == [[1.0], [4.0]]
        claimed.barrier()
    finally:
        shutdown()
    assert not dist.is_initialized()
