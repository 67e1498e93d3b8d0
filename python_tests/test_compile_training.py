"""``--compile``: the training step's forward and losses under torch.compile. The distillers'
forward is one graph in which the dfa:: ops are single nodes (no graph break), a compiled step
gives the eager step's losses and gradients, and a compiled run trains, stops and resumes as an
eager one does.

Marked ``compile``: inductor compiles for tens of seconds on the CPU."""

from __future__ import annotations

import csv
import os
import signal

import pytest
import torch

from dfa_ext import models
from dfa_ext.distill import FeatureDistiller, KDDistiller, group_targets, stage_weights
from dfa_ext.errors import ConfigError
from dfa_ext.margins import group_margins
from dfa_ext.training import TeacherConfig, TrainingInterrupted, load_checkpoint, train_teacher

pytestmark = pytest.mark.compile

SHAPE = (1, 8, 8)


def _distiller(method: str, kernels: str = "fused") -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = models.create("resnet14", num_classes=10, in_channels=1).eval()
    student = models.create("resnet8", num_classes=10, in_channels=1)
    record = {"name": "resnet8", "num_classes": 10, "in_channels": 1}
    if method == "kd":
        return KDDistiller(student, teacher, record).train()
    pairs = models.pair_networks(teacher, student, SHAPE)
    bns = [g.bns for g in teacher(torch.zeros(2, *SHAPE), features=True).groups]
    return FeatureDistiller(student, teacher, record, pairs=pairs, targets=group_targets(method, pairs),
                            margins=[group_margins(b) for b in bns], weights=stage_weights(len(pairs)),
                            kernels=kernels).train()


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, *SHAPE, generator=generator), torch.randint(0, 10, (16,), generator=generator)


@pytest.mark.parametrize("method", ["random", "ofd", "kd"])
def test_distiller_forward_is_one_graph_with_the_dfa_ops_as_nodes(method):
    # random: a K-layer aggregation per group (aggregate + partial_l2); explain() traces without
    # compiling, so this is cheap.
    torch._dynamo.reset()
    images, labels = _batch()
    explanation = torch._dynamo.explain(_distiller(method))(images, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    targets = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes
               if node.op == "call_function"}
    if method != "kd":
        assert "dfa.partial_l2" in " ".join(targets), targets


def test_compiled_step_gives_the_eager_losses_and_gradients():
    torch._dynamo.reset()
    images, labels = _batch()
    eager, compiled = _distiller("random"), _distiller("random")
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        _, losses = eager(images, labels)
        _, compiled_losses = step(images, labels)
        assert losses.keys() == compiled_losses.keys()
        for name in losses:  # float32, the same operations in another order: 1e-5 relative
            torch.testing.assert_close(compiled_losses[name], losses[name], rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(sum(losses.values()), list(eager.trainable_parameters()))
        compiled_grads = torch.autograd.grad(sum(compiled_losses.values()), list(compiled.trainable_parameters()))
        for g, cg in zip(grads, compiled_grads, strict=True):
            torch.testing.assert_close(cg, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-7)


def test_compiled_teacher_run_stops_resumes_and_follows_the_eager_run(tmp_path):
    def config(name: str, mode: str) -> TeacherConfig:
        return TeacherConfig(model="resnet8", data="digits", epochs=1, batch_size=64, lr=0.05, seed=11,
                             progress=False, tensorboard=False, compile=mode, out=str(tmp_path / name))

    def stop_at_7(step: int) -> None:
        if step == 7:  # Ctrl-C: the run saves at the step boundary
            os.kill(os.getpid(), signal.SIGINT)

    torch._dynamo.reset()
    eager = train_teacher(config("eager", "off"))
    with pytest.raises(TrainingInterrupted):
        train_teacher(config("compiled", "default"), on_step=stop_at_7)
    assert load_checkpoint(tmp_path / "compiled" / "last.pt")["step"] == 7
    compiled = train_teacher(config("compiled", "default"))
    assert load_checkpoint(tmp_path / "compiled" / "last.pt")["step"] == 22
    rows = {name: next(csv.DictReader(open(tmp_path / name / "metrics.csv"))) for name in ("eager", "compiled")}
    # 22 SGD steps from the same start on the same batches: float reordering alone separates them.
    assert float(rows["compiled"]["train_ce"]) == pytest.approx(float(rows["eager"]["train_ce"]), rel=2e-2)
    assert abs(compiled.last_top1 - eager.last_top1) < 3.0  # 359 test digits: a few images


def test_unknown_compile_mode_is_named():
    with pytest.raises(ConfigError, match="compile must be one of off, default, max-autotune, reduce-overhead"):
        TeacherConfig(compile="fast").validate()


def test_compiled_search_follows_the_eager_search(tmp_path):
    from dfa_ext.search import SearchConfig, run_search
    from dfa_ext.training.checkpoint import model_record, save_checkpoint

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, {"kind": "teacher", "model": model_record(
        models.create("resnet14", num_classes=10, in_channels=1), "resnet14", 10, 1)})

    def alphas(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Group 1's alpha after the first (warm-up) step, i.e. its initial value, and at the end."""
        run_search(SearchConfig(teacher=str(teacher), student="resnet8", data="digits", steps_per_group=4,
                                warmup_steps=2, batch_size=32, arch_lr=0.05, seed=5, progress=False,
                                groups=(1,), compile=mode, out=str(tmp_path / mode)))
        state = load_checkpoint(tmp_path / mode / "last.pt")
        first = torch.tensor([row["alpha"] for row in state["trajectory"] if row["step"] == 1])
        return first, torch.softmax(state["betas"][1].double(), 0)

    torch._dynamo.reset()
    (start, eager), (_, compiled) = alphas("off"), alphas("default")
    moved = float((eager - start).abs().max())
    assert moved > 1e-4 and float((compiled - eager).abs().max()) < 1e-2 * moved


def test_compiled_teacher_runs_under_torchrun_like_the_eager_one(tmp_path):
    """--compile under torchrun (2 processes, gloo, global-batch BatchNorm): torch.compile wraps the
    DistributedDataParallel module, whose gradient all-reduce dynamo's DDP optimiser splits the
    graph around. The compiled run finishes, writes once, and follows the eager 2-process run."""
    import subprocess
    import sys

    def run(name: str, mode: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "dfa_ext", "train-teacher", "--model", "resnet8", "--data", "digits",
                               "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--seed", "11", "--sync-bn",
                               "--device", "cpu", "--compile", mode, "--no-progress", "--no-tensorboard",
                               "--out", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=600)

    eager, compiled = run("eager", "off"), run("compiled", "default")
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert compiled.stdout.count("best test top-1") == 1, compiled.stdout  # rank 0 alone reports
    states = {name: load_checkpoint(tmp_path / name / "last.pt") for name in ("eager", "compiled")}
    assert states["compiled"]["step"] == states["eager"]["step"] == 1438 // 64
    rows = {name: next(csv.DictReader(open(tmp_path / name / "metrics.csv"))) for name in states}
    # 22 SGD steps from the same start on the same batches: float reordering alone separates them
    # (as in the one-process comparison above).
    assert float(rows["compiled"]["train_ce"]) == pytest.approx(float(rows["eager"]["train_ce"]), rel=2e-2)
    # The weights: measured <= 0.02 of a tensor's largest entry (a BatchNorm bias; float32 drift
    # over 22 steps at lr 0.05); per-process BatchNorm put two processes 1.16 away from one in
    # test_distributed.py.
    weights = {name: states[name]["model"]["state_dict"] for name in states}
    for key, value in weights["eager"].items():
        if value.is_floating_point() and ".running_" not in key:
            moved = float((value - weights["compiled"][key]).abs().max())
            assert moved <= 0.05 * max(float(value.abs().max()), 1e-2), (key, moved)


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_compiled_narrow_resnet_gets_the_eager_gradients_on_the_cpu(mode):
    """A ResNet narrower than 8 channels has 1x1 stride-2 shortcut convolutions, whose weight
    gradient oneDNN computes wrongly in channels_last (``onednn_unsafe_convs``). Inductor turns
    convolutions channels_last on its own (layout optimisation): without ``compiled`` switching
    that off, the gradients of the mnist-1k preset's width-2 student were 180x off (of their
    largest entry), and the search's compiled step never returned. Measured with it: 2e-6."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10, in_channels=1, width=2)
    images, labels = torch.randn(32, *SHAPE), torch.randint(0, 10, (32,))

    def gradients(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        loss = torch.nn.functional.cross_entropy(module(images), labels)
        return torch.autograd.grad(loss, list(model.parameters()))

    step = TeacherConfig(compile=mode).compiled(model)
    assert step is not model
    for got, expected in zip(gradients(step), gradients(model), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-7)
