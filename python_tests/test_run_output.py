"""What a user reads: no Python warning in any command's normal run, periodic status lines instead
of progress bars when the output is not a terminal, and runs that say when they resume or are
already finished."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest

from dfa_ext.search import run_search
from dfa_ext.training import TrainingInterrupted
from dfa_ext.training.progress import StatusLines
from test_search import search_config, teacher_checkpoint  # noqa: F401 (a fixture)


def dfa(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it under ``nohup`` or CI: output into pipes, not a terminal,
    and every Python warning turned into an error (in spawned workers too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"}
    done = subprocess.run([sys.executable, "-W", "error", "-m", "dfa_ext", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert "\r" not in done.stderr + done.stdout  # no progress bar redrawn into a log
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A teacher, a search and a DFA distillation, each with its progress reports on."""
    root = tmp_path_factory.mktemp("output")
    common = ["--data", "digits", "--batch-size", "64", "--no-tensorboard"]
    teacher = dfa("train-teacher", "--model", "resnet8", "--epochs", "1", "--out", str(root / "teacher"), *common)
    search = dfa("search", "--teacher", str(root / "teacher" / "last.pt"), "--steps-per-group", "4",
                 "--out", str(root / "search"), *common)
    distill = dfa("distill", "--method", "dfa", "--teacher", str(root / "teacher" / "last.pt"), "--aggregation",
                  str(root / "search" / "search.json"), "--epochs", "1", "--out", str(root / "distill"), *common)
    return root, {"teacher": teacher, "search": search, "distill": distill}


def test_every_command_runs_without_warnings_and_reports_in_lines(runs):
    root, done = runs
    # a short epoch (22 steps, seconds) gets its one report line and no in-epoch status lines: a
    # 60-epoch run of such epochs printed ~600 lines into a log before, 60 now
    assert not [line for line in done["teacher"].stderr.splitlines() if line.startswith("epoch 1/1: ")]
    assert len([line for line in done["teacher"].stdout.splitlines() if line.startswith("epoch 1/1: train loss")]) == 1
    assert any(line.startswith("group ") for line in done["search"].stderr.splitlines())
    assert "aggregation:" in done["search"].stdout and "top-1" in done["distill"].stdout
    dfa("evaluate", str(root / "distill" / "best.pt"))


def test_epoch_status_lines_only_for_epochs_long_enough_to_need_them():
    now = [0.0]
    stream = io.StringIO()
    lines = StatusLines(200, desc="epoch 3/9", stream=stream, clock=lambda: now[0], fraction=None)
    for _ in range(150):  # 15 s: no line (the epoch's report line follows)
        now[0] += 0.1
        lines.update()
    now[0] += 31.0  # a quiet half minute: news
    lines.update()
    assert stream.getvalue().splitlines() == ["epoch 3/9: 151/200  76% [46 s, 3.28 it/s]"]


def test_a_finished_run_says_so_and_reprints_its_result(runs):
    root, done = runs
    again = dfa("train-teacher", "--model", "resnet8", "--epochs", "1", "--out", str(root / "teacher"), "--data",
                "digits", "--batch-size", "64", "--no-tensorboard")
    assert again.stdout.startswith(f"{root / 'teacher'} holds a finished run (1 epochs, 22 steps, best test top-1 ")
    result_line = [line for line in done["teacher"].stdout.splitlines() if line.startswith("teacher resnet8")][0]
    assert result_line.split(",")[0] in again.stdout  # the same best top-1
    assert "epoch 1/1: " not in again.stderr  # nothing trained


def test_a_resumed_run_says_where_it_resumes(runs):
    root, _ = runs
    longer = dfa("train-teacher", "--model", "resnet8", "--epochs", "2", "--out", str(root / "teacher"), "--data",
                 "digits", "--batch-size", "64", "--no-tensorboard")
    assert longer.stdout.startswith(f"resuming {root / 'teacher' / 'last.pt'}: epoch 2/2, step 22\n")


def test_a_resumed_search_says_where_it_resumes(tmp_path, teacher_checkpoint, capsys):
    def interrupt(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        run_search(search_config(tmp_path, teacher_checkpoint), on_step=interrupt)
    capsys.readouterr()
    run_search(search_config(tmp_path, teacher_checkpoint))
    assert capsys.readouterr().out.startswith(f"resuming {tmp_path / 'search' / 'last.pt'}: group 1 (2/3), step 6/12\n")
    run_search(search_config(tmp_path, teacher_checkpoint))
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'search'} holds a finished search (12 steps)")


def test_status_lines_every_tenth_and_after_a_quiet_half_minute():
    now = [0.0]
    stream = io.StringIO()
    lines = StatusLines(200, desc="epoch 3/9", stream=stream, clock=lambda: now[0])
    for _ in range(25):
        now[0] += 0.1
        lines.update()
    lines.set_postfix(loss="0.1234")
    now[0] += 31.0  # a slow step: a line although the next tenth is not reached
    lines.update()
    printed = stream.getvalue().splitlines()
    assert printed == ["epoch 3/9: 20/200  10% [2 s, 10 it/s]", "epoch 3/9: 26/200  13% loss=0.1234 [34 s, 0.776 it/s]"]
