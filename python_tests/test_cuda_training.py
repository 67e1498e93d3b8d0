"""The trainers on a GPU: teacher, search and distillation run on CUDA, and the fused CUDA kernels
log the same search alpha and distillation losses as the pure-PyTorch reference there.

Skipped when no GPU is visible (CI); run by bench/gpu_check.sh on the GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch

from dfa_ext.distill import DistillConfig, run_distill
from dfa_ext.search import SearchConfig, run_search
from dfa_ext.training import TeacherConfig, load_checkpoint, train_teacher
from dfa_ext.training.evaluate_checkpoint import EvaluateConfig, evaluate_checkpoint
from rounding import FLOAT64_RUN_BOUND, assert_float64_runs_agree, default_dtype

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COMMON = dict(data="digits", device="cuda", progress=False, tensorboard=False, batch_size=64)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    result = train_teacher(TeacherConfig(**COMMON, model="resnet14", epochs=3, out=str(out)))
    assert result.last_top1 > 50.0  # 10 classes: it learned on the GPU
    return str(out / "last.pt")


def _search(tmp_path, teacher, kernels, dtype=torch.float32):
    with default_dtype(dtype):
        return run_search(SearchConfig(**COMMON, teacher=teacher, student="resnet8", steps_per_group=5, arch_lr=0.05,
                                       kernels=kernels, out=str(tmp_path / f"search_{kernels}_{dtype}")))


def test_search_on_cuda_fused_matches_reference(tmp_path, teacher):
    """In float64 (rounding.FLOAT64_RUN_BOUND: in float32 the runs drift apart by an amount that
    depends on the device's rounding)."""
    fused = _search(tmp_path, teacher, "fused", torch.float64)
    ref = _search(tmp_path, teacher, "reference", torch.float64)
    for a, b in zip(fused.groups, ref.groups):
        assert_float64_runs_agree(torch.tensor(a.alpha), torch.tensor(b.alpha), f"alpha of group {a.index}")
        assert_float64_runs_agree(torch.tensor(a.beta), torch.tensor(b.beta), f"beta of group {a.index}")
        assert a.alpha != (0.5, 0.5)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_distillation_on_cuda_fused_matches_reference(tmp_path, teacher, amp):
    """Without autocast in float64 (rounding.FLOAT64_RUN_BOUND); under bf16 autocast (which casts
    float32 only) in float32, where bf16's rounding (2**-8) of the maps separates the runs,
    identically on every device up to float32 rounding: 2e-2 relative on the logged losses, ~5
    bf16 roundings."""
    dtype = torch.float64 if amp == "none" else torch.float32
    _search(tmp_path, teacher, "fused")
    rows = []
    for kernels in ("fused", "reference"):
        out = tmp_path / f"distill_{kernels}"
        with default_dtype(dtype):
            run_distill(DistillConfig(**COMMON, teacher=teacher,
                                      aggregation=str(tmp_path / f"search_fused_{torch.float32}" / "search.json"),
                                      method="dfa", epochs=2, kernels=kernels, amp=amp, out=str(out)))
        header, *values = (out / "metrics.csv").read_text().splitlines()
        rows.append([dict(zip(header.split(","), map(float, v.split(",")))) for v in values])
    tolerance = FLOAT64_RUN_BOUND if amp == "none" else 2e-2
    for fused, ref in zip(*rows):
        for key in ("train_ce", "train_fd", "test_loss"):
            assert math.isclose(fused[key], ref[key], rel_tol=tolerance), (key, fused[key], ref[key])
    assert rows[0][-1]["test_top1"] > 30.0
    assert load_checkpoint(tmp_path / "distill_fused" / "last.pt")["method"] == "dfa"


def test_evaluate_on_cuda_matches_cpu(teacher):
    on_gpu = evaluate_checkpoint(EvaluateConfig(checkpoint=teacher, device="cuda"))
    on_cpu = evaluate_checkpoint(EvaluateConfig(checkpoint=teacher, device="cpu"))
    assert on_gpu["top1"] == pytest.approx(on_cpu["top1"], abs=0.3)
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-3)


def test_data_on_the_gpu_gives_the_loaders_batches():
    # auto puts an in-memory dataset on the GPU; its batches are the CPU loader's (the gather is
    # exact; the normalising multiply-add may round differently on the GPU, by an ulp at most).
    from dfa_ext.data import load_data, make_loader
    from dfa_ext.data.device_batches import DeviceImages, data_on_device

    train = load_data("digits", seed=3, padding=1, flip=True).train
    on_device = data_on_device("auto", train, torch.device("cuda"))
    assert isinstance(on_device, DeviceImages) and on_device.pixels.device.type == "cuda"
    kwargs = dict(train=True, seed=5, epoch=2, start_batch=1, rank=1, world_size=2)
    expected = list(make_loader(train, 32, **kwargs))
    got = list(make_loader(train, 32, on_device=on_device, **kwargs))
    assert len(got) == len(expected) > 0
    for (images, labels), (gpu_images, gpu_labels) in zip(expected, got):
        assert gpu_images.device.type == "cuda" and torch.equal(gpu_labels.cpu(), labels)
        torch.testing.assert_close(gpu_images.cpu(), images, rtol=1e-6, atol=1e-6)


def test_teacher_trains_with_data_on_the_gpu(tmp_path):
    result = train_teacher(TeacherConfig(**COMMON, model="resnet8", epochs=2, data_on_device="on",
                                         out=str(tmp_path / "on")))
    assert result.last_top1 > 50.0
