"""Comparison tables of several runs per method: mean and standard deviation of test accuracy."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class RunResult:
    """One training run: its method, seed, final and best test top-1 (%), final top-5 (%), wall time (s)."""

    method: str
    seed: int
    last_top1: float
    best_top1: float
    last_top5: float
    seconds: float


@dataclass(frozen=True)
class MethodSummary:
    """Mean and sample standard deviation (n - 1; NaN for one run) over the runs of one method."""

    method: str
    runs: int
    top1_mean: float
    top1_std: float
    best_top1_mean: float
    best_top1_std: float
    top5_mean: float
    seconds_mean: float


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(results: Sequence[RunResult]) -> list[MethodSummary]:
    """One summary per method, in the order the methods first appear."""
    methods = list(dict.fromkeys(r.method for r in results))
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        top1 = _mean_std([r.last_top1 for r in runs])
        best = _mean_std([r.best_top1 for r in runs])
        rows.append(MethodSummary(method, len(runs), *top1, *best, statistics.fmean(r.last_top5 for r in runs),
                                  statistics.fmean(r.seconds for r in runs)))
    return rows


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(summaries: Sequence[MethodSummary]) -> str:
    """A Markdown table: final top-1 (mean ± std), best top-1, final top-5, seconds per run."""
    lines = ["| method | runs | top-1 % (final) | top-1 % (best epoch) | top-5 % (final) | s / run |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s.method} | {s.runs} | {_pm(s.top1_mean, s.top1_std)} | "
                     f"{_pm(s.best_top1_mean, s.best_top1_std)} | {s.top5_mean:.2f} | {s.seconds_mean:.0f} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[RunResult] | Sequence[MethodSummary]) -> str:
    """CSV of dataclass rows (a header line from the field names; empty for no rows)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    return buffer.getvalue()
