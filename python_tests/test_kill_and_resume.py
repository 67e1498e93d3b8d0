"""SIGKILL, then the same command again: ``dfa search`` (first and second order) and ``dfa demo``
end exactly where an uninterrupted run ends (bitwise, on the CPU).

Ctrl-C is the polite stop (the trainers save at the next step boundary; test_search.py and
test_teacher_training.py cover it in-process). SIGKILL is the impolite one: an out-of-memory
killer, ``kill -9``, a dying machine. Nothing is saved, the process cannot clean up, and the rerun
has only the last periodic checkpoint (``--checkpoint-every``) to resume from. These tests run the
real commands in subprocesses, kill them at a seeded random point, rerun the very same command line
and compare every checkpoint, CSV and JSON file the run wrote with those of an uninterrupted run.

The kill points are drawn from ``DFA_KILL_SEED`` (default 0; set it to try other points) and are
named in every assertion message, so a failure can be replayed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from dfa_ext import models
from dfa_ext.training import load_checkpoint
from dfa_ext.training.checkpoint import model_record, save_checkpoint

from dfa_helpers import bits, seed_of

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds a command's processes in /proc")

BASE_SEED = int(os.environ.get("DFA_KILL_SEED", "0"))
# One intra-op thread in every run: the uninterrupted and the resumed runs must compute alike, and
# two cores are shared by the command, its stage-2 workers and the reference runs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 600

# Keys whose values differ between two identical runs by construction: wall-clock time, and the
# hash of the teacher checkpoint file (which records its own training time).
NONDETERMINISTIC_KEYS = frozenset({"seconds", "sha256"})


def _dfa(*args: str) -> list[str]:
    """The ``dfa`` command line a user runs."""
    return [sys.executable, "-m", "dfa_ext", *args]


def _failure(what: str, returncode: int | None, output: str) -> str:
    return f"{what}: exit status {returncode}\n--- output (tail) ---\n{output[-3000:]}"


def _run_to_the_end(command: list[str], what: str) -> None:
    """Runs ``command`` to completion and requires success."""
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)
    assert done.returncode == 0, _failure(what, done.returncode, done.stderr)


# ---- a command's processes -------------------------------------------------------------------

def _start(command: list[str], log: Path) -> subprocess.Popen:
    """Starts ``command`` as the leader of a new session (so of a new process group too), its
    output to ``log``: the session holds everything the command starts, whatever its group."""
    with log.open("w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _session(sid: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process of session ``sid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            if entry.name.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
    return found


def _kill_group(process: subprocess.Popen) -> list[str]:
    """``kill -9 -PGID`` of the command's process group, as a terminal sends it; then SIGKILL to
    every process of the command that outlived its group, whose command lines it returns."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has no process left
        pass
    process.wait()
    grace = time.monotonic() + 5  # workers out of the group notice their parent's death within a second
    while _session(process.pid) and time.monotonic() < grace:
        time.sleep(0.05)
    survivors = _session(process.pid)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while _session(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _session(process.pid), f"processes outlive SIGKILL: {_session(process.pid)}"
    return list(survivors.values())


# ---- comparing two output folders bit for bit ----------------------------------------------------

def _assert_same(a: Any, b: Any, where: str, paths: Callable[[str], str], other_paths: Callable[[str], str]) -> None:
    """``a`` and ``b`` (checkpoint or JSON trees) are equal: tensors and floats bit for bit, strings
    after mapping each run's output folder to the same placeholder (``paths``, ``other_paths``),
    keys in :data:`NONDETERMINISTIC_KEYS` skipped."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a.keys() - NONDETERMINISTIC_KEYS:
            _assert_same(a[key], b[key], f"{where}[{key!r}]", paths, other_paths)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", paths, other_paths)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a!r} != {b!r}"
        assert torch.equal(bits(a), bits(b)), f"{where}: differs by up to {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, float):
        assert isinstance(b, float) and a.hex() == b.hex(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, str):
        assert isinstance(b, str) and paths(a) == other_paths(b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file without its wall-clock columns (``seconds``, ``seconds_mean``)."""
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in csv.DictReader(handle)]


def _outputs(root: Path) -> list[Path]:
    """The files of a run folder that hold results: checkpoints, CSV and JSON (not pictures, logs,
    or the hidden temporary file a checkpoint write killed midway leaves behind)."""
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.suffix in (".pt", ".csv", ".json") and not p.name.startswith(".")
                  and "tensorboard" not in p.parts)


def assert_same_outputs(reference: Path, resumed: Path, context: str) -> None:
    """Every checkpoint, CSV and JSON file under ``resumed`` equals its twin under ``reference``
    (see :func:`_assert_same`); ``context`` (where the run was killed) leads each message."""
    files = _outputs(reference)
    assert files and _outputs(resumed) == files, f"{context}: other files than the uninterrupted run's"

    def placeholder(root: Path) -> Callable[[str], str]:
        return lambda text: text.replace(str(root), "<out>")

    for name in files:
        where = f"{context}: {name}"
        if name.suffix == ".csv":
            assert _csv_rows(resumed / name) == _csv_rows(reference / name), where
            continue
        load: Callable[[Path], Any] = load_checkpoint if name.suffix == ".pt" else (lambda p: json.loads(p.read_text()))
        _assert_same(load(resumed / name), load(reference / name), where, placeholder(resumed), placeholder(reference))


# ---- the commands ----------------------------------------------------------------------------

ORDERS = ("first", "second")
STEPS_PER_GROUP, GROUPS, CHECKPOINT_EVERY = 4, 3, 3  # a resnet14 teacher has 3 groups
SEARCH_STEPS = STEPS_PER_GROUP * GROUPS


def _search_args(teacher: str, out: Path, order: str) -> list[str]:
    """A search of a few steps per group; 8x8 digits with pad-1 random crops."""
    return ["search", "--teacher", teacher, "--data", "digits", "--data-options", "padding=1", "--student", "resnet8",
            "--order", order, "--steps-per-group", str(STEPS_PER_GROUP), "--warmup-steps", "1", "--batch-size", "32",
            "--arch-lr", "0.05", "--seed", "5", "--checkpoint-every", str(CHECKPOINT_EVERY), "--out", str(out),
            "--no-progress", "--no-tensorboard"]


def _demo_args(out: Path) -> list[str]:
    """Every stage at its smallest: 360 training digits, a resnet14 teacher of 2 epochs (10 steps),
    a search of 3 steps per group (9 steps), then 2 methods x 2 seeds of 2 epochs (22 steps each)
    in 2 worker processes; a checkpoint every 2 steps in every stage."""
    return ["demo", "--out", str(out), "--data", "digits", "--data-options", "test_fraction=0.8", "padding=1",
            "--teacher", "resnet14", "--teacher-epochs", "2", "--student", "resnet8",
            "--search-config", "steps_per_group=3", "warmup_steps=1", "--methods", "vanilla", "dfa",
            "--seeds", "0", "1", "--distill-epochs", "2", "--workers", "2", "--checkpoint-every", "2",
            "--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised resnet14 for the digits: training it would only cost time."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    teacher = models.create("resnet14", num_classes=10, in_channels=1)
    save_checkpoint(path, {"kind": "teacher", "model": model_record(teacher, "resnet14", 10, 1)})
    return str(path)


# The uninterrupted runs, one after the other in one process (importing torch and friends is most
# of a tiny run's cost): for each [NAME, ARGV] of the JSON list argv[2], `dfa ARGV`, then the file
# argv[1]/NAME.done.
REFERENCE_RUNS = """
import json, pathlib, sys
from dfa_ext.cli import main

for name, argv in json.loads(sys.argv[2]):
    if main(argv) != 0:
        sys.exit(f"dfa {' '.join(argv)} failed")
    (pathlib.Path(sys.argv[1]) / f"{name}.done").touch()
"""


@dataclasses.dataclass
class References:
    """The uninterrupted runs every test compares with. They run in the background while the tests
    run and kill their own commands; :meth:`path` waits for the one asked for."""

    root: Path
    process: subprocess.Popen
    log: Path

    def path(self, name: str) -> Path:
        """The output folder of the uninterrupted run ``name`` (search_first, search_second, demo)."""
        deadline = time.monotonic() + TIMEOUT_S
        while not (self.root / f"{name}.done").exists():
            assert self.process.poll() is None, _failure("the uninterrupted runs", self.process.returncode,
                                                         self.log.read_text())
            assert time.monotonic() < deadline, f"the uninterrupted run {name} timed out"
            time.sleep(0.1)
        return self.root / name


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, teacher_checkpoint: str) -> Iterator[References]:
    """Starts the uninterrupted searches (both orders), then the demo, with the tests' arguments."""
    root = tmp_path_factory.mktemp("reference")
    runs = [(f"search_{order}", _search_args(teacher_checkpoint, root / f"search_{order}", order)) for order in ORDERS]
    runs.append(("demo", _demo_args(root / "demo")))
    log = root / "runs.log"
    process = _start([sys.executable, "-c", REFERENCE_RUNS, str(root), json.dumps(runs)], log)
    yield References(root, process, log)
    if process.poll() is None:  # the tests stopped early: leave nothing running
        _kill_group(process)


# ---- dfa search: killed at a chosen step from inside the process ---------------------------------

# Runs `python -m dfa_ext ARGS` with one change: SIGKILL at the end of global search step
# $DFA_TEST_KILL_AT_STEP, where the loop asks whether to stop, before that step's checkpoint.
# searcher.py binds stop_requested by name (`from ..training.interrupt import stop_requested`), so
# the name is replaced in dfa_ext.search.searcher, not in dfa_ext.training.interrupt.
KILL_AT_STEP = """
import os, runpy, signal, sys
from dfa_ext.search import searcher

kill_at, stop_requested = int(os.environ["DFA_TEST_KILL_AT_STEP"]), searcher.stop_requested

def stop_or_die(guard, dist, step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return stop_requested(guard, dist, step)

searcher.stop_requested = stop_or_die
sys.argv[0] = "dfa"
runpy.run_module("dfa_ext", run_name="__main__")
"""


def _checkpointed_before(step: int) -> int:
    """The last step a search killed at the end of ``step`` saved: group ends and every
    CHECKPOINT_EVERY steps, before ``step`` (the kill comes before that step's own save)."""
    return max(s for s in range(1, step) if s % STEPS_PER_GROUP == 0 or s % CHECKPOINT_EVERY == 0)


@pytest.mark.parametrize("order", ORDERS)
def test_search_killed_at_a_random_step_resumes_to_the_uninterrupted_result(
        tmp_path: Path, teacher_checkpoint: str, references: References, order: str) -> None:
    # After the first checkpoint, so that the rerun resumes (before it, the rerun starts afresh).
    kill_at = random.Random(seed_of("search", order, BASE_SEED)).randint(CHECKPOINT_EVERY + 1, SEARCH_STEPS)
    context = f"{order}-order search SIGKILLed at step {kill_at} of {SEARCH_STEPS} (DFA_KILL_SEED={BASE_SEED})"
    out = tmp_path / "search"
    args = _search_args(teacher_checkpoint, out, order)
    killed_command, resumed_command = [sys.executable, "-c", KILL_AT_STEP, *args], _dfa(*args)
    assert killed_command[3:] == resumed_command[3:]  # the rerun is the same command line

    killed = subprocess.run(killed_command, capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**ENV, "DFA_TEST_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -signal.SIGKILL, _failure(f"{context}: not killed", killed.returncode, killed.stderr)
    assert not (out / "search.json").exists(), context
    # the rerun redoes the steps after the last periodic checkpoint
    assert load_checkpoint(out / "last.pt", kind="search")["step"] == _checkpointed_before(kill_at), context

    _run_to_the_end(resumed_command, f"{context}: the rerun")
    assert_same_outputs(references.path(f"search_{order}"), out, context)


# ---- dfa demo: its process group killed from outside, at a random checkpoint ---------------------

@dataclasses.dataclass
class DemoKill:
    """One SIGKILL of the demo, right after the ``writes``-th checkpoint write (a new version of a
    file matching ``pattern``) since the command started: a random step of ``stage``, at least
    two checkpoint intervals before the stage ends. The rest records what the kill hit."""

    stage: str
    pattern: str
    writes: int
    returncode: int | None = None
    workers: list[str] = dataclasses.field(default_factory=list)  # stage-2 worker processes at the kill
    survivors: list[str] = dataclasses.field(default_factory=list)  # processes alive after the group was killed
    seen: list[str] = dataclasses.field(default_factory=list)  # the checkpoint writes seen, in order

    def __str__(self) -> str:
        return f"killed in the {self.stage} stage after {self.writes} checkpoint writes"


TEACHER_STEPS, SEARCH_DEMO_STEPS = 10, 9  # of the demo's stages (see _demo_args)


def _kills_text(kills: list[DemoKill]) -> str:
    return f"{'; '.join(map(str, kills))} (DFA_KILL_SEED={BASE_SEED})"


def _demo_kills(rng: random.Random) -> list[DemoKill]:
    """A kill in each stage in turn; stage 2 (where the worker processes are) anywhere in its two
    rounds of runs."""
    return [DemoKill("teacher", "teacher/last.pt", rng.randint(1, 4)),  # of 6 (steps 2, 4, 5, 6, 8, 10)
            DemoKill("search", "search/last.pt", rng.randint(1, 3)),  # of 6 (steps 2, 3, 4, 6, 8, 9)
            DemoKill("distill", "distill/*/seed*/last.pt", rng.randint(1, 36))]  # of 2 rounds x 2 runs x 12


def _checkpoint_versions(out: Path, pattern: str) -> set[tuple[str, int, int]]:
    """(file, inode, mtime) of every file matching ``pattern``: an atomic checkpoint write replaces
    the file, so each write shows as a new version."""
    versions = set()
    for path in out.glob(pattern):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        versions.add((str(path.relative_to(out)), stat.st_ino, stat.st_mtime_ns))
    return versions


def _run_until_killed(command: list[str], out: Path, kill: DemoKill, log: Path) -> None:
    """Runs ``command`` and kills its process group as ``kill`` says, polling the checkpoints."""
    process, what = _start(command, log), _kills_text([kill])
    try:
        before = _checkpoint_versions(out, kill.pattern)
        deadline = time.monotonic() + TIMEOUT_S
        while len(kill.seen) < kill.writes:
            assert process.poll() is None, _failure(f"{what}: the demo ended first", process.returncode, log.read_text())
            assert time.monotonic() < deadline, f"{what}: timed out; seen {kill.seen}"
            new = _checkpoint_versions(out, kill.pattern) - before
            kill.seen += sorted(f"{name}@{mtime}" for name, _, mtime in new)
            before |= new
            time.sleep(0.005)
        kill.workers = [cmd for cmd in _session(process.pid).values() if "spawn_main" in cmd]
    finally:
        kill.survivors = _kill_group(process)
        kill.returncode = process.returncode


def _assert_kill_hit_its_stage(out: Path, kill: DemoKill) -> None:
    """The kill came mid-stage: the stage's checkpoint is short of its end; in stage 2, the
    workers were training and no table was written."""
    what = _kills_text([kill])
    assert kill.returncode == -signal.SIGKILL, f"{what}: exit status {kill.returncode}"
    if kill.stage == "distill":
        assert kill.workers and not (out / "results.csv").exists(), f"{what}: stage 2 was not running"
    else:
        steps = TEACHER_STEPS if kill.stage == "teacher" else SEARCH_DEMO_STEPS
        assert load_checkpoint(out / kill.pattern)["step"] < steps, f"{what}: the stage had ended; seen {kill.seen}"


@dataclasses.dataclass
class KilledDemo:
    """A demo killed and rerun until it finished: its output folder and the kills."""

    out: Path
    kills: list[DemoKill]


@pytest.fixture(scope="module")
def killed_demo(tmp_path_factory: pytest.TempPathFactory) -> KilledDemo:
    """The demo killed (SIGKILL to its process group) once in each stage, rerun with the same
    command line after each kill, and the last time to its end."""
    tmp = tmp_path_factory.mktemp("demo_killed")
    out, command = tmp / "demo", _dfa(*_demo_args(tmp / "demo"))
    kills = _demo_kills(random.Random(seed_of("demo", BASE_SEED)))
    for attempt, kill in enumerate(kills):
        _run_until_killed(command, out, kill, tmp / f"attempt{attempt}.log")
        _assert_kill_hit_its_stage(out, kill)
    _run_to_the_end(command, f"the demo's last rerun, after it was {_kills_text(kills)}")
    return KilledDemo(out, kills)


def test_demo_killed_in_every_stage_resumes_to_the_uninterrupted_result(references: References,
                                                                        killed_demo: KilledDemo) -> None:
    context = f"demo {_kills_text(killed_demo.kills)}"
    assert_same_outputs(references.path("demo"), killed_demo.out, context)
    assert {p.parent.relative_to(killed_demo.out / "distill") for p in killed_demo.out.glob("distill/*/*/last.pt")} \
        == {Path(method, f"seed{seed}") for method in ("vanilla", "dfa") for seed in (0, 1)}


def test_killing_the_demo_process_group_kills_its_stage_2_workers(killed_demo: KilledDemo) -> None:
    """Killing a command's process group should leave nothing of it running."""
    for kill in killed_demo.kills:
        assert not kill.survivors, f"{kill}: alive after the process group was killed: {kill.survivors}"
