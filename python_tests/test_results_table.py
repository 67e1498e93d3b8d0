"""The comparison statistics: mean ± std per method and the paired per-seed difference with its
Student-t confidence interval, against numbers worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from dfa_ext.results_table import RunResult, paired_difference, summarize, t_quantile


def runs(method, top1s, seeds=None):
    seeds = seeds if seeds is not None else range(len(top1s))
    return [RunResult(method, s, t, t + 0.1, 99.0, 10.0) for s, t in zip(seeds, top1s)]


def test_t_quantiles_match_the_printed_tables():
    # Student-t 97.5 % points (e.g. Abramowitz & Stegun, table 26.10)
    for dof, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, dof) == pytest.approx(want, abs=5e-4)


def test_paired_difference_by_hand():
    results = runs("dfa", [95.0, 96.0, 94.5, 95.5, 96.5]) + runs("ofd", [94.0, 95.5, 94.5, 94.0, 95.0])
    d = paired_difference(results, "dfa", "ofd")
    differences = [1.0, 0.5, 0.0, 1.5, 1.5]
    mean = sum(differences) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in differences) / 4)
    assert (d.runs, d.mean, d.std) == (5, pytest.approx(mean), pytest.approx(std))
    half = 2.7764451 * std / math.sqrt(5)
    assert (d.low, d.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert d.line() == f"dfa - ofd: +{mean:.2f} points (paired over 5 seeds, 95 % CI [{mean - half:+.2f}, {mean + half:+.2f}])"


def test_paired_difference_pairs_by_seed_not_by_position():
    results = runs("a", [1.0, 2.0, 3.0], seeds=[0, 1, 2]) + runs("b", [3.0, 1.0, 7.0], seeds=[2, 0, 9])
    d = paired_difference(results, "a", "b")
    assert d.runs == 2 and d.mean == pytest.approx(((1.0 - 1.0) + (3.0 - 3.0)) / 2)
    one = paired_difference(runs("a", [2.0]) + runs("b", [1.5]), "a", "b")
    assert one.runs == 1 and math.isnan(one.low) and "no interval" in one.line()
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference(runs("a", [1.0], [0]) + runs("b", [1.0], [1]), "a", "b")


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = random.Random(0)
    covered = 0
    for trial in range(2000):
        noise = [rng.gauss(0, 1.0) for _ in range(5)]  # per-seed noise shared by both methods
        a = [94.0 + n + rng.gauss(0.3, 0.4) for n in noise]
        b = [94.0 + n for n in noise]
        d = paired_difference(runs("a", a) + runs("b", b), "a", "b")
        covered += d.low <= 0.3 <= d.high
    assert 0.93 <= covered / 2000 <= 0.97


def test_summary_is_mean_and_sample_std():
    s, = summarize(runs("kd", [90.0, 92.0, 94.0]))
    assert (s.runs, s.top1_mean, s.top1_std) == (3, pytest.approx(92.0), pytest.approx(2.0))
    single, = summarize(runs("kd", [90.0]))
    assert math.isnan(single.top1_std)
