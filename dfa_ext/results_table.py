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


@dataclass(frozen=True)
class PairedDifference:
    """Top-1 of ``method`` minus top-1 of ``baseline`` (points), paired by seed over ``runs`` seeds
    both have: mean, sample std of the per-seed differences and the Student-t 95 % confidence
    interval of the mean, [low, high] (NaN with fewer than 2 pairs)."""

    method: str
    baseline: str
    runs: int
    mean: float
    std: float
    low: float
    high: float

    def line(self) -> str:
        """e.g. "dfa - ofd: +0.12 points (paired over 5 seeds, 95 % CI [-0.20, +0.44])"."""
        if self.runs < 2:
            return f"{self.method} - {self.baseline}: {self.mean:+.2f} points (one seed: no interval)"
        return (f"{self.method} - {self.baseline}: {self.mean:+.2f} points (paired over {self.runs} seeds, "
                f"95 % CI [{self.low:+.2f}, {self.high:+.2f}])")


def t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def paired_difference(results: Sequence[RunResult], method: str, baseline: str,
                      confidence: float = 0.95) -> PairedDifference:
    """Final top-1 of ``method`` minus ``baseline``, seed by seed (both start from the same student
    and see the same data order for a seed, so the pairing removes much of the seed noise).

    Raises:
        ValueError: the two methods share no seed.
    """
    first = {r.seed: r.last_top1 for r in results if r.method == method}
    second = {r.seed: r.last_top1 for r in results if r.method == baseline}
    seeds = sorted(set(first) & set(second))
    if not seeds:
        raise ValueError(f"{method!r} and {baseline!r} have no seed in common")
    differences = [first[s] - second[s] for s in seeds]
    mean, std = _mean_std(differences)
    if len(seeds) < 2:
        return PairedDifference(method, baseline, 1, mean, math.nan, math.nan, math.nan)
    half = t_quantile(0.5 + confidence / 2, len(seeds) - 1) * std / math.sqrt(len(seeds))
    return PairedDifference(method, baseline, len(seeds), mean, std, mean - half, mean + half)


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
