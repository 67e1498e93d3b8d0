"""``dfa demo`` stopped by Ctrl-C in its second stage: it exits with 130 after saving, writes no
table, and the same command then finishes with the table, numbers and weights of a demo that was
never stopped. (test_kill_and_resume.py covers SIGKILL, where nothing is saved at the stop.)

The demo runs in this process at its smallest (digits, no search, one worker), so that a Ctrl-C
can be sent at a chosen step of a chosen run."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch

import dfa_ext.demo
from dfa_ext.cli import main as dfa_main
from dfa_ext.distill import DistillConfig, run_distill
from dfa_ext.training import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# vanilla and kd, 2 seeds, 2 epochs of a dozen steps each (359 training digits, batches of 32): a
# 1-epoch teacher, no search, the runs one after the other in this process.
DEMO = ["demo", "--data", "digits", "--data-options", "test_fraction=0.8", "--teacher", "resnet14",
        "--teacher-epochs", "1", "--methods", "vanilla", "kd", "--seeds", "0", "1", "--distill-epochs", "2",
        "--workers", "1", "--no-progress", "--no-tensorboard"]
STOP_RUN, STOP_STEP = ("kd", 0), 7  # the third of the four runs, in its first epoch


def _runs_without_seconds(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((out / "runs.csv").open())]


def _table_without_seconds(out: Path) -> list[str]:
    """results.md without the last column (wall time per run)."""
    return [line.rsplit("|", 2)[0] for line in (out / "results.md").read_text().splitlines()]


def test_demo_stopped_by_ctrl_c_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert dfa_main([*DEMO, "--out", str(whole)]) == 0

    out = tmp_path / "stopped"

    def run_with_ctrl_c(config: DistillConfig):
        def on_step(step: int) -> None:
            if (config.method, config.seed) == STOP_RUN and step == STOP_STEP:
                os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C reaches the demo's process
        return run_distill(config, on_step=on_step)

    monkeypatch.setattr(dfa_ext.demo, "run_distill", run_with_ctrl_c)
    capsys.readouterr()
    assert dfa_main([*DEMO, "--out", str(out)]) == 130
    stopped = out / "distill" / "kd" / "seed0" / "last.pt"
    assert capsys.readouterr().err == (f"dfa: interrupted; progress saved to {stopped}; "
                                       "run the same command again to resume\n")
    assert load_checkpoint(stopped)["step"] == STOP_STEP  # saved at the stop, not at a periodic checkpoint
    assert not (out / "distill" / "kd" / "seed1").exists()  # no run starts after a stop
    assert not any((out / name).exists() for name in ("results.md", "results.csv", "runs.csv"))
    finished = {p: p.stat().st_mtime_ns for p in (out / "teacher").glob("*.pt")}
    finished |= {p: p.stat().st_mtime_ns for p in (out / "distill" / "vanilla").glob("seed*/last.pt")}
    assert len(finished) == 4  # teacher best and last, and both vanilla runs

    monkeypatch.undo()
    assert dfa_main([*DEMO, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # what had finished was not trained again
    assert _runs_without_seconds(out) == _runs_without_seconds(whole)
    assert _table_without_seconds(out) == _table_without_seconds(whole)
    for run in ("vanilla/seed0", "vanilla/seed1", "kd/seed0", "kd/seed1"):
        a = load_checkpoint(whole / "distill" / run / "last.pt")["model"]["state_dict"]
        b = load_checkpoint(out / "distill" / run / "last.pt")["model"]["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
