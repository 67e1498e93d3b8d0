"""Runs many ``dfa`` commands in worker processes and reads back what they found.

Each job is the argument list of one ``dfa`` command (exactly what a user would type after
``dfa``), run in-process by a worker with one intra-op thread: small networks on a CPU train
faster as several single-thread processes than as one multi-thread process. A job whose output
folder already holds a finished run returns at once (the commands resume), so a study that was
interrupted continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from dfa_ext.run_pool import run_pool


def _run(argv: Sequence[str]) -> tuple[list[str], int, float]:
    import contextlib
    import io

    from dfa_ext.cli import main

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return list(argv), code, time.perf_counter() - started


def command_line(argv: Sequence[str]) -> str:
    return "dfa " + " ".join(shlex.quote(a) for a in argv)


def run_jobs(jobs: Iterable[Sequence[str]], *, workers: int, threads: int = 1, log: Path | None = None) -> None:
    """Runs the ``dfa`` argument lists ``jobs`` in ``workers`` processes; raises if one fails."""
    jobs = [list(j) for j in jobs]
    if not jobs:
        return
    failed = []
    # run_pool: signals reach every worker once, and workers end with this process.
    for done, (_, (argv, code, seconds)) in enumerate(run_pool([(_run, job) for job in jobs], workers=workers,
                                                                threads=threads), 1):
        line = f"[{done}/{len(jobs)}] {'ok' if code == 0 else f'FAILED ({code})'} {seconds:.0f} s: {command_line(argv)}"
        print(line, flush=True)
        if log is not None:
            with open(log, "a") as handle:
                handle.write(line + "\n")
        if code != 0:
            failed.append(command_line(argv))
    if failed:
        sys.exit("failed: " + "; ".join(failed))


def final_top1(run_dir: str | os.PathLike) -> float:
    """The test top-1 (%) after the last epoch of a finished training run (NaN if unfinished)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return math.nan
    rows = list(csv.DictReader(path.open()))
    config = Path(run_dir) / "config.json"
    epochs = json.loads(config.read_text()).get("epochs") if config.is_file() else None
    if not rows or (epochs is not None and int(rows[-1]["epoch"]) + 1 < epochs):
        return math.nan  # not finished
    tested = [r for r in rows if not math.isnan(float(r["test_top1"]))]
    return float(tested[-1]["test_top1"]) if tested else math.nan


def top1_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(epoch, test top-1 %) of every evaluated epoch of a run."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    return [(int(r["epoch"]) + 1, float(r["test_top1"])) for r in csv.DictReader(path.open())
            if not math.isnan(float(r["test_top1"]))]


def last_epoch(run_dir: str | os.PathLike) -> dict[str, float]:
    """The training log's last row (metrics.csv: train_ce, each loss term train_*, train_top1, ...)."""
    rows = list(csv.DictReader((Path(run_dir) / "metrics.csv").open()))
    return {k: float(v) for k, v in rows[-1].items()}


def searched_alpha(search_dir: str | os.PathLike) -> list[list[float]]:
    """Per group, the alpha a finished search found."""
    data = json.loads((Path(search_dir) / "search.json").read_text())
    return [list(g["alpha"]) for g in data["groups"]]
