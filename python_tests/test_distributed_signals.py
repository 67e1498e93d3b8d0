"""Ctrl-C and SIGTERM under several processes: real signals to real ``dfa`` processes (gloo on the CPU).

Under ``torchrun`` each process has its own signal handler, and a signal may reach only some of
them (``kill`` of one PID, a node's scheduler stopping its share). The processes agree on a stop
every ``STOP_CHECK_EVERY`` steps (an all-reduce of "did I get a signal?"), so every process must stop
at the first agreement after the signal, the main process saving ``last.pt`` there; each process
exits with status 130, and the same command run again must end exactly (bitwise) where an
uninterrupted run ends. A second signal aborts at once without saving: ``last.pt`` keeps the last
periodic checkpoint, intact, and the rerun resumes from it.

The in-process tests elsewhere stop a run by raising from ``on_step``, which skips the signal
handlers; here the two processes run the command's entry point (``python -m dfa_ext``), as torchrun
starts them (same environment variables, each process its own session), and one of them sends
itself the signal with ``os.kill`` at a chosen step. (torchrun itself then exits with status 1 and
names each rank's status 130: its convention for any failed worker.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dfa_ext import models
from dfa_ext.training.checkpoint import model_record, save_checkpoint
from dfa_ext.training.interrupt import STOP_CHECK_EVERY

from test_kill_and_resume import assert_same_outputs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")

WORLD_SIZE = 2
TIMEOUT_S = 600
SIGNAL_AT = 13  # the step at whose end the signal comes: not a multiple of STOP_CHECK_EVERY ...
STOPPED_AT = 20  # ... so the processes run on to the next agreement
CHECKPOINT_EVERY = 6  # a periodic checkpoint at step 12, just before SIGNAL_AT
assert SIGNAL_AT % STOP_CHECK_EVERY and STOPPED_AT == (SIGNAL_AT // STOP_CHECK_EVERY + 1) * STOP_CHECK_EVERY
SEARCH_SIGNAL_AT, SEARCH_STOPPED_AT, SEARCH_STEPS = 3, 10, 15  # 3 groups of 5 steps; stops mid-group 2

# resnet8 on the digits, 16 images per process and step: 1438 // 32 = 44 steps in the epoch.
TEACHER_ARGS = ["train-teacher", "--model", "resnet8", "--data", "digits", "--epochs", "1", "--batch-size", "32",
                "--checkpoint-every", str(CHECKPOINT_EVERY), "--device", "cpu", "--no-progress", "--no-tensorboard"]
TEACHER_STEPS = 1438 // 32


def _search_args(teacher: Path) -> list[str]:
    return ["search", "--teacher", str(teacher), "--data", "digits", "--student", "resnet8", "--steps-per-group", "5",
            "--warmup-steps", "1", "--batch-size", "32", "--arch-lr", "0.05", "--device", "cpu", "--no-progress",
            "--no-tensorboard"]


# One process of the group: runs `python -m dfa_ext ARGV` (the command's entry point, exit status
# and all) once per phase of the JSON list argv[1], joining a new process group each time (on the
# phase's port), and writes what each phase ended with to argv[2]. Where a phase says so, this
# process sends itself the phase's signals at the end of step `at`, where the loop asks whether to
# stop. loop.py and searcher.py bind stop_requested by name, so the name is replaced there.
RANK_PROCESS = """
import contextlib, io, json, os, runpy, signal, sys
from pathlib import Path
from dfa_ext.search import searcher
from dfa_ext.training import loop, load_checkpoint

rank, phases, results_path = int(os.environ["RANK"]), json.loads(sys.argv[1]), sys.argv[2]
phase, results = {}, []

def signalling(stop_requested):
    def wrapper(guard, dist, step):
        phase["last_step"] = step
        if step == phase["at"] and rank in phase["ranks"]:
            for name in phase["signals"]:
                os.kill(os.getpid(), getattr(signal, name))
        return stop_requested(guard, dist, step)
    return wrapper

loop.stop_requested = signalling(loop.stop_requested)
searcher.stop_requested = signalling(searcher.stop_requested)
for spec in phases:
    phase.clear()
    phase.update(spec)
    os.environ["MASTER_PORT"] = str(spec["port"])
    sys.argv = ["dfa", *spec["argv"]]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            runpy.run_module("dfa_ext", run_name="__main__")
            status = None
        except SystemExit as stop:
            status = stop.code
    out = Path(spec["argv"][spec["argv"].index("--out") + 1])
    saved = load_checkpoint(out / "last.pt") if (out / "last.pt").is_file() else {}
    results.append({"name": spec["name"], "status": status, "last_step": phase.get("last_step"),
                    "stderr": errors.getvalue(), "saved": {k: saved.get(k) for k in ("epoch", "batch", "step")},
                    "files": sorted(p.name for p in out.iterdir())})
    Path(results_path + ".tmp").write_text(json.dumps(results))
    os.replace(results_path + ".tmp", results_path)  # whole, even if killed
"""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One run of ``dfa ARGV --out ROOT/OUT`` on every process; ``signals`` go to the processes
    ``ranks`` at the end of step ``at``."""

    name: str
    argv: list[str]
    out: str
    at: int | None = None
    ranks: tuple[int, ...] = ()
    signals: tuple[str, ...] = ()


@dataclasses.dataclass
class Runs:
    """The phases' output folders (under ``root``) and, per phase, what each rank ended with
    (None where it did not finish the phase): exit status, the last step at which it asked
    whether to stop, its stderr, and ``last.pt``'s epoch, batch and step as it found them after
    the phase. ``logs``: the tails of the processes' own output."""

    root: Path
    results: dict[str, list[dict | None]] = dataclasses.field(repr=False)
    logs: str = dataclasses.field(repr=False)

    def out(self, name: str) -> Path:
        return self.root / name

    def phase(self, name: str) -> list[dict]:
        """Each rank's result of phase ``name`` (a failure with the logs if a rank did not finish it)."""
        found = self.results[name]
        assert all(result is not None for result in found), f"phase {name!r} did not finish on every rank\n{self.logs}"
        return found  # type: ignore[return-value]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all bound at once, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _phases(teacher: Path) -> list[Phase]:
    search = _search_args(teacher)
    return [
        Phase("reference", TEACHER_ARGS, "reference"),
        Phase("SIGINT", TEACHER_ARGS, "SIGINT", SIGNAL_AT, (1,), ("SIGINT",)),
        Phase("SIGINT rerun", TEACHER_ARGS, "SIGINT"),
        Phase("SIGTERM", TEACHER_ARGS, "SIGTERM", SIGNAL_AT, (1,), ("SIGTERM",)),
        Phase("SIGTERM rerun", TEACHER_ARGS, "SIGTERM"),
        # Both processes: torchrun passes the signals it gets on to every worker.
        Phase("twice", TEACHER_ARGS, "twice", SIGNAL_AT, (0, 1), ("SIGINT", "SIGINT")),
        Phase("twice rerun", TEACHER_ARGS, "twice"),
        Phase("search reference", search, "search reference"),
        Phase("search SIGINT", search, "search SIGINT", SEARCH_SIGNAL_AT, (1,), ("SIGINT",)),
        Phase("search SIGINT rerun", search, "search SIGINT"),
    ]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Every phase in turn on two processes (importing torch and a first run cost most of a tiny
    run: one pair of processes runs them all)."""
    root = tmp_path_factory.mktemp("signals")
    torch.manual_seed(0)  # a randomly initialised teacher: training it would only cost time
    teacher = models.create("resnet14", num_classes=10, in_channels=1)
    save_checkpoint(root / "teacher.pt", {"kind": "teacher", "model": model_record(teacher, "resnet14", 10, 1)})
    phases = _phases(root / "teacher.pt")
    specs = [{"name": p.name, "argv": [*p.argv, "--out", str(root / p.out)], "at": p.at, "ranks": list(p.ranks),
              "signals": list(p.signals), "port": port} for p, port in zip(phases, _free_ports(len(phases)))]
    processes = []
    try:
        for rank in range(WORLD_SIZE):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE)}
            with (root / f"rank{rank}.log").open("w") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-c", RANK_PROCESS, json.dumps(specs), str(root / f"rank{rank}.json")],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        _stop(processes)
    logs = "\n".join(f"--- rank {r} (status {p.returncode}) ---\n{(root / f'rank{r}.log').read_text()[-3000:]}"
                     for r, p in enumerate(processes))
    results: dict[str, list[dict | None]] = {p.name: [] for p in phases}
    for rank in range(WORLD_SIZE):  # the phases a rank finished, in order (none after a crash)
        path = root / f"rank{rank}.json"
        finished = {r["name"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
        for name in results:
            results[name].append(finished.get(name))
    yield Runs(root, results, logs)


def _interrupted_message(out: Path) -> str:
    return f"dfa: interrupted; progress saved to {out / 'last.pt'}; run the same command again to resume\n"


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_to_one_process_stops_every_process_at_the_next_agreement(runs: Runs, signal_name: str) -> None:
    """Rank 1 alone gets the signal at step 13; rank 0 learns of it at the agreement of step 20,
    and both stop there: not at 13 (the processes agree every STOP_CHECK_EVERY steps only; one
    stopping alone would leave the other waiting in its next all-reduce) and not later (the user
    asked to stop). Each process says so once on stderr and exits with 130."""
    out = runs.out(signal_name)
    for rank, result in enumerate(runs.phase(signal_name)):
        where = f"rank {rank}: {result}"
        assert result["status"] == 130, where
        assert result["last_step"] == STOPPED_AT, where
        assert result["stderr"] == _interrupted_message(out), where
        assert result["saved"] == {"epoch": 0, "batch": STOPPED_AT, "step": STOPPED_AT}, where
    assert runs.phase("reference")[0]["last_step"] == TEACHER_STEPS  # the uninterrupted run went on


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_the_rerun_after_a_signal_ends_where_the_uninterrupted_run_ends(runs: Runs, signal_name: str) -> None:
    """The same command again resumes at step 20 on both processes and ends with every weight,
    optimiser state, training metric and CSV row bit for bit those of the uninterrupted run; the
    training metrics of the resumed epoch count each process's first 20 batches once."""
    for rank, result in enumerate(runs.phase(f"{signal_name} rerun")):
        assert (result["status"], result["last_step"]) == (0, TEACHER_STEPS), f"rank {rank}: {result}"
        assert result["saved"] == {"epoch": 1, "batch": 0, "step": TEACHER_STEPS}, f"rank {rank}: {result}"
    assert_same_outputs(runs.out("reference"), runs.out(signal_name), f"{signal_name} to rank 1 at step {SIGNAL_AT}")


def test_a_second_signal_aborts_every_process_at_once_without_saving(runs: Runs) -> None:
    """Two SIGINTs at step 13 on both processes: no run on to the agreement at step 20, no
    checkpoint of step 13; ``last.pt`` still holds the periodic checkpoint of step 12, readable
    (load_checkpoint checks it), and no temporary file is left. One line on stderr, status 130."""
    for rank, result in enumerate(runs.phase("twice")):
        where = f"rank {rank}: {result}"
        assert result["status"] == 130, where
        assert result["last_step"] == SIGNAL_AT, where
        assert result["stderr"] == "dfa: aborted\n", where
        periodic = SIGNAL_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        assert result["saved"] == {"epoch": 0, "batch": periodic, "step": periodic}, where
        assert not [name for name in result["files"] if name.startswith(".")], where


def test_the_rerun_after_an_abort_ends_where_the_uninterrupted_run_ends(runs: Runs) -> None:
    for rank, result in enumerate(runs.phase("twice rerun")):
        assert (result["status"], result["last_step"]) == (0, TEACHER_STEPS), f"rank {rank}: {result}"
    assert_same_outputs(runs.out("reference"), runs.out("twice"), f"two SIGINTs to both ranks at step {SIGNAL_AT}")


def test_a_search_stops_on_every_process_together_and_resumes_to_the_uninterrupted_result(runs: Runs) -> None:
    """``dfa search`` has its own loop: SIGINT to rank 1 at step 3 stops both processes at step 10,
    mid-group, and the rerun ends with the uninterrupted search's beta, weights and files."""
    out = runs.out("search SIGINT")
    for rank, result in enumerate(runs.phase("search SIGINT")):
        where = f"rank {rank}: {result}"
        assert (result["status"], result["last_step"]) == (130, SEARCH_STOPPED_AT), where
        assert result["stderr"] == _interrupted_message(out), where
        assert result["saved"]["step"] == SEARCH_STOPPED_AT, where
        assert "search.json" not in result["files"], where
    for rank, result in enumerate(runs.phase("search SIGINT rerun")):
        assert (result["status"], result["last_step"]) == (0, SEARCH_STEPS), f"rank {rank}: {result}"
    assert_same_outputs(runs.out("search reference"), out, f"SIGINT to rank 1 at search step {SEARCH_SIGNAL_AT}")
