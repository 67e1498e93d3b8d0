"""Several processes (gloo on the CPU): every trainer under DistributedDataParallel gives the same
parameters on every rank, matches a single process on the same global batch (with global-batch
BatchNorm), writes files from rank 0 only, and resumes with another number of processes; the
command line runs under torchrun.

Precision of the comparisons.  Two processes and one compute the same sums in another order (each
process sums its half of the batch, then the halves are added). In float32 the teacher runs below
end 9.3e-4 of a tensor's largest entry apart on an AVX2 CPU and 5.8e-3 on an AVX-512 one, a drift
no bound can hold on every CPU; so the compared runs train in float64 (``torch.set_default_dtype``
in every process: networks, data and the dfa ops follow it), where rounding stays below the
derived FLOAT64_RUN_BOUND (python_tests/rounding.py: 1e-8 of a tensor's largest entry; measured
here 5e-15 for the teacher, 6e-15 for the search's gradients, 9e-14 for the distillation).
The negative controls miss it by 8 orders of magnitude: per-process BatchNorm statistics (no
--sync-bn) end 1.6 of a BatchNorm bias's largest entry away (asserted: > 1e6 x the bound), a beta
gradient off by 1e-6 of its size already fails (asserted), a dropped ``/ world_size`` is 1 away.
The ranks of one run must agree bitwise (they apply the same averaged gradients); the torchrun
test runs the user's float32 path end to end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dfa_ext import models
from dfa_ext.distill import DistillConfig
from dfa_ext.distill.trainer import prepare_distill
from dfa_ext.search import Architect, SearchConfig, run_search
from dfa_ext.training import TeacherConfig, fit, load_checkpoint
from dfa_ext.training.distributed import init_from_env, shutdown
from dfa_ext.training.teacher import ClassifierTask
from rounding import FLOAT64_RUN_BOUND, assert_float64_runs_agree, relative_error

COMMON = dict(data="digits", device="cpu", progress=False, tensorboard=False, batch_size=64, sync_bn=True,
              channels_last=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Crash(Exception):
    pass


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _run(kind: str, settings: dict, out: Path, crash_at: int = 0) -> dict:
    """One process's share of a run; returns what it ends with, or has when it crashes at step
    ``crash_at`` (weights; betas for a search)."""
    def on_step(step: int) -> None:
        if step == crash_at:
            raise _Crash

    if kind == "search":
        return _search(settings, on_step)
    if kind == "teacher":
        config = TeacherConfig(**settings)
        data = config.load(config.seed)
        torch.manual_seed(config.seed)
        model = models.create(config.model, num_classes=10, in_channels=1)
        task = ClassifierTask(model, {"name": config.model, "num_classes": 10, "in_channels": 1, "kwargs": {}})
        signature, extra = {"model": config.model}, {}
    else:
        config = DistillConfig(**settings)
        run = prepare_distill(config)
        task, data, signature, extra = run.distiller, run.data, run.signature, run.extra_state
    try:
        fit(task, data, config, out, kind=kind, signature=signature, extra_state=extra, on_step=on_step)
    except _Crash:
        pass
    return {k: v for k, v in _weights(task).items() if not k.startswith("teacher.")}


def _search(settings: dict, on_step: Callable[[int], None]) -> dict:
    """A search's final betas (``beta{g}``), and what an Adam step on beta would hide: the beta
    gradient of every architecture step as the architect hands it to Adam, after averaging over the
    processes (``grad{n}``), and the weights w (student and connectors) at the start (``w0.NAME``)
    and at the end (``w.NAME``)."""
    recorded: dict[str, torch.Tensor] = {}
    original_init, original_step = Architect.__init__, Architect.step

    def init(self: Architect, net: torch.nn.Module, *args, **kwargs) -> None:
        original_init(self, net, *args, **kwargs)
        recorded.update({f"w0.{k}": v for k, v in _weights(net).items()})
        recorded["net"] = net

    def step(self: Architect, *args, **kwargs) -> torch.Tensor:
        grad = original_step(self, *args, **kwargs)
        recorded[f"grad{sum(k.startswith('grad') for k in recorded)}"] = grad.detach().double().cpu().clone()
        return grad

    Architect.__init__, Architect.step = init, step  # this process only (a spawned worker, or restored below)
    try:
        result = run_search(SearchConfig(**settings), on_step=on_step)
    finally:
        Architect.__init__, Architect.step = original_init, original_step
    recorded.update({f"w.{k}": v for k, v in _weights(recorded.pop("net")).items()})
    return recorded | {f"beta{g.index}": torch.tensor(g.beta, dtype=torch.float64) for g in result.groups}


def _worker(rank: int, world_size: int, port: int, kind: str, settings: dict, out: str, crash_at: int,
            dtype: torch.dtype) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)  # networks, data and the ops' maps follow it
    init_from_env("cpu")
    try:
        torch.save(_run(kind, settings, Path(out), crash_at), Path(out) / f"rank{rank}.state")
    finally:
        shutdown()


def launch(kind: str, world_size: int, folder: Path, crash_at: int = 0, dtype: torch.dtype = torch.float64,
           **settings) -> list[dict]:
    """Runs ``kind`` on ``world_size`` processes writing to ``folder`` (torch.multiprocessing, as
    torchrun would: same environment variables, same init), in ``dtype`` (see the module
    docstring); returns each rank's final state."""
    folder.mkdir(parents=True, exist_ok=True)
    args = (world_size, _free_port(), kind, {**COMMON, **settings, "out": str(folder)}, str(folder), crash_at, dtype)
    if world_size == 1:
        saved = torch.get_num_threads(), torch.get_default_dtype()
        try:
            _worker(0, *args)
        finally:
            torch.set_num_threads(saved[0])
            torch.set_default_dtype(saved[1])
    else:
        mp.start_processes(_worker, args=args, nprocs=world_size, start_method="spawn")
    return [torch.load(folder / f"rank{r}.state") for r in range(world_size)]




SCALE = 1e-2  # a tensor whose entries are all below this is compared absolutely (rounding.relative_error)


def _worst(a: dict, b: dict, keys: list[str] | None = None) -> tuple[float, str]:
    """The largest difference of a float tensor of ``a`` from ``b`` relative to the tensor's
    largest magnitude in ``b`` (at least SCALE), and its key."""
    keys = [k for k in (keys or b) if b[k].is_floating_point()]
    return max((relative_error(a[k], b[k], SCALE), k) for k in keys)


def _assert_close(a: dict, b: dict) -> None:
    """Every float tensor within FLOAT64_RUN_BOUND of its largest magnitude, every other one equal."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            assert_float64_runs_agree(a[key], b[key], key, SCALE)
        else:
            assert torch.equal(a[key], b[key]), key


def _assert_identical(states: list[dict]) -> None:
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        for key in state:
            assert torch.equal(state[key], states[0][key]), key


TEACHER = dict(model="resnet14", epochs=2, lr=0.05)  # K = 2 layers per group for the search


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    two = launch("teacher", 2, root / "two", **TEACHER)
    one = launch("teacher", 1, root / "one", **TEACHER)
    return root, two, one


@pytest.mark.rounding
def test_teacher_training_is_identical_on_every_rank_and_matches_one_process(teacher_runs):
    root, two, one = teacher_runs
    _assert_identical(two)
    _assert_close(two[0], one[0])
    saved = load_checkpoint(root / "two" / "last.pt")["model"]["state_dict"]
    _assert_identical([{f"classifier.{k}": v for k, v in saved.items()}, two[0]])  # rank 0 wrote its weights
    names = sorted(p.name for p in (root / "two").iterdir())
    assert names == sorted(["best.pt", "last.pt", "metrics.csv", "rank0.state", "rank1.state"]), names
    assert len((root / "two" / "metrics.csv").read_text().splitlines()) == 3  # one writer: header + 2 epochs


def test_without_global_batchnorm_two_processes_miss_one_by_far_more_than_the_bound(teacher_runs):
    """The negative control of FLOAT64_RUN_BOUND: with each process's own BatchNorm statistics (no
    --sync-bn) the same comparison must fail, and by a wide margin, or it could not tell the two
    apart. Only the parameters count here (running statistics of half a batch differ trivially):
    the training itself must have gone elsewhere. Measured: 1.6 of the largest entry of a
    BatchNorm bias, 1.6e8 times the bound; asserted: more than 1e6 times."""
    root, _, one = teacher_runs
    local = launch("teacher", 2, root / "two_local_bn", **{**TEACHER, "sync_bn": False})
    with pytest.raises(AssertionError):
        _assert_close(local[0], one[0])
    worst, key = _worst(local[0], one[0], [k for k in one[0] if ".running_" not in k])
    assert worst > 1e6 * FLOAT64_RUN_BOUND, (key, worst)


def test_training_resumes_with_another_number_of_processes(tmp_path, teacher_runs):
    _, _, one = teacher_runs
    out = tmp_path / "resumed"
    steps_per_epoch = 1438 // 64
    launch("teacher", 2, out, crash_at=steps_per_epoch + 3, **TEACHER)  # dies in epoch 2
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    resumed = launch("teacher", 1, out, **TEACHER)
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    _assert_close(resumed[0], one[0])


@pytest.mark.parametrize("order", ["first", "second"])
def test_search_holds_the_same_beta_everywhere_and_matches_one_process(tmp_path, teacher_runs, order):
    """Two processes on halves of the global batch take the steps one process takes on all of it.

    Beta after Adam's steps is weak evidence (Adam's update barely changes when the gradient is
    scaled by a constant: a dropped ``/ world_size`` moves beta by 1.5e-3 of its size here, a
    gradient 1 % off by 3e-5), so the test compares first the beta gradient of every architecture
    step, as handed to Adam after averaging over the processes, and the weights w. The gradients
    are compared relative to the run's largest gradient entry (rounding is relative to the terms
    of a gradient, not to a step's gradient when it nearly cancels); a gradient off by 1e-6 of
    its size must already fail (asserted), a dropped ``/ world_size`` is 1 away."""
    root, _, _ = teacher_runs
    settings = dict(teacher=str(root / "one" / "last.pt"), student="resnet8", steps_per_group=3, arch_lr=0.05,
                    order=order, batch_size=32)
    two = launch("search", 2, tmp_path / "two", **settings)
    one = launch("search", 1, tmp_path / "one", **settings)
    _assert_identical(two)
    two, one = two[0], one[0]
    grads = [k for k in one if k.startswith("grad")]
    assert len(grads) == 3 * 2  # 3 groups, 2 architecture steps each (after 1 warm-up step)
    two_grads, one_grads = torch.stack([two[k] for k in grads]), torch.stack([one[k] for k in grads])
    assert_float64_runs_agree(two_grads, one_grads, "beta gradients")
    assert relative_error((1 + 1e-6) * two_grads, one_grads) > FLOAT64_RUN_BOUND  # the negative control
    # The weights (student and connectors) trained in every group; a weight gradient 1 % off under
    # two processes puts some tensor 0.16 of its displacement away, per-process BatchNorm 0.8.
    weights = [k[2:] for k in one if k.startswith("w.") and one[k].is_floating_point()]
    for k in weights:
        assert not torch.equal(one[f"w.{k}"], one[f"w0.{k}"]), k  # every group was searched
    _assert_close({k: two[f"w.{k}"] for k in weights}, {k: one[f"w.{k}"] for k in weights})
    betas = [k for k in one if k.startswith("beta")]
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in betas)
    _assert_close({k: two[k] for k in betas}, {k: one[k] for k in betas})


def test_distillation_is_identical_on_every_rank_and_matches_one_process(tmp_path, teacher_runs):
    """Compared after 5 steps (in float64 the runs would agree for far longer; 5 steps keep the
    test short)."""
    root, _, _ = teacher_runs
    settings = dict(teacher=str(root / "one" / "last.pt"), method="ofd", student="resnet8", epochs=1, lr=0.05)
    two = launch("distill", 2, tmp_path / "two", crash_at=5, **settings)
    one = launch("distill", 1, tmp_path / "one", crash_at=5, **settings)
    _assert_identical(two)
    assert any(k.startswith("feature_loss.st_connectors.") for k in two[0])
    _assert_close(two[0], one[0])


def test_command_runs_under_torchrun(tmp_path, teacher_runs):
    """The user's launch: torchrun --nproc_per_node 2 -m dfa_ext ...; one result line, from rank 0."""
    root, _, _ = teacher_runs
    out = tmp_path / "kd"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dfa_ext", "distill", "--method", "kd", "--teacher", str(root / "one" / "last.pt"),
                           "--data", "digits", "--epochs", "1", "--device", "cpu", "--no-progress",
                           "--no-tensorboard", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("distill kd: resnet8 on digits: best test top-1") == 1, done.stdout
    assert load_checkpoint(out / "last.pt", kind="distill")["epoch"] == 1
