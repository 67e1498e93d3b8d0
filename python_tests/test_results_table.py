"""The comparison statistics: mean ± std per method and the paired per-seed difference with its
Student-t confidence interval, and the demo's table and CSV files, against numbers worked out by hand."""

from __future__ import annotations

import csv
import io
import math
import random

import pytest

from dfa_ext.demo import comparison_text
from dfa_ext.results_table import RunResult, csv_text, markdown_table, paired_difference, summarize, t_quantile


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


def run(method: str, seed: int, last: float, best: float, top5: float, seconds: float) -> RunResult:
    return RunResult(method, seed, last, best, top5, seconds)


# Three kd runs and one dfa run, interleaved as the demo's workers may finish them. The numbers are
# chosen so the statistics come out round by hand: kd final top-1 90, 92, 97 (mean 93, squared
# deviations 9 + 1 + 16 = 26, sample std sqrt(26 / 2) = sqrt(13) = 3.606; the population std would
# be sqrt(26 / 3) = 2.944); kd best epoch 92, 93, 97 (mean 94, sample std sqrt(14 / 2) = sqrt(7)
# = 2.646); kd top-5 99, 99.5, 100 (mean 99.5); seconds 10, 12, 17 (mean 13).
MIXED = [run("kd", 0, 90.0, 92.0, 99.0, 10.0), run("dfa", 0, 95.0, 96.0, 99.25, 20.0),
         run("kd", 1, 92.0, 93.0, 99.5, 12.0), run("kd", 2, 97.0, 97.0, 100.0, 17.0)]


def test_summary_of_every_column_by_hand():
    kd, dfa = summarize(MIXED)  # methods in the order they first appear
    assert (kd.method, kd.runs, dfa.method, dfa.runs) == ("kd", 3, "dfa", 1)
    assert (kd.top1_mean, kd.top1_std) == (pytest.approx(93.0), pytest.approx(math.sqrt(13)))
    assert (kd.best_top1_mean, kd.best_top1_std) == (pytest.approx(94.0), pytest.approx(math.sqrt(7)))
    assert (kd.top5_mean, kd.seconds_mean) == (pytest.approx(99.5), pytest.approx(13.0))
    # one run: the mean is that run's number and no spread is claimed
    assert (dfa.top1_mean, dfa.best_top1_mean, dfa.top5_mean, dfa.seconds_mean) == (95.0, 96.0, 99.25, 20.0)
    assert math.isnan(dfa.top1_std) and math.isnan(dfa.best_top1_std)


def test_markdown_table_by_hand():
    assert markdown_table(summarize(MIXED)) == (
        "| method | runs | top-1 % (final) | top-1 % (best epoch) | top-5 % (final) | s / run |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| kd | 3 | 93.00 ± 3.61 | 94.00 ± 2.65 | 99.50 | 13 |\n"
        "| dfa | 1 | 95.00 | 96.00 | 99.25 | 20 |\n")  # one seed: the mean alone, no "± nan"


def test_csv_of_runs_and_summaries():
    assert csv_text(MIXED[:2]) == ("method,seed,last_top1,best_top1,last_top5,seconds\n"
                                   "kd,0,90.0,92.0,99.0,10.0\n"
                                   "dfa,0,95.0,96.0,99.25,20.0\n")
    rows = list(csv.DictReader(io.StringIO(csv_text(summarize(MIXED)))))
    assert [r["method"] for r in rows] == ["kd", "dfa"]
    assert float(rows[0]["best_top1_std"]) == pytest.approx(math.sqrt(7))
    assert rows[1]["top1_std"] == "nan" and rows[1]["runs"] == "1"
    assert csv_text([]) == ""


def test_comparison_text_adds_dfa_against_every_other_method():
    results = (runs("vanilla", [93.0, 91.0])
               + [run("dfa", s, t, t, 99.0, 1.0) for s, t in enumerate((95.0, 96.0, 94.0))]
               + [run("kd", s, t, t, 99.0, 1.0) for s, t in enumerate((93.0, 92.0, 95.0))])
    text, differences = comparison_text(results)
    assert text.startswith(markdown_table(summarize(results)))
    # dfa - kd per seed: 2, 4, -1; mean 5/3, sample std sqrt((1/9 + 49/9 + 64/9) / 2) = sqrt(19/3);
    # Student-t 97.5 % point with 2 degrees of freedom 4.3027 (A & S table 26.10)
    mean, std = 5 / 3, math.sqrt(19 / 3)
    half = 4.3026527 * std / math.sqrt(3)
    kd_line = f"- dfa - kd: +1.67 points (paired over 3 seeds, 95 % CI [{mean - half:+.2f}, {mean + half:+.2f}])\n"
    assert kd_line == "- dfa - kd: +1.67 points (paired over 3 seeds, 95 % CI [-4.58, +7.92])\n"
    # dfa - vanilla over the 2 seeds both have: 2 and 5; mean 3.5, sample std sqrt(4.5), t(97.5 %, 1 dof)
    # = 12.7062: 3.5 -+ 12.7062 * sqrt(4.5) / sqrt(2) = [-15.56, +22.56]
    assert text.endswith("\nPaired per-seed differences of final top-1 (points):\n\n"
                         "- dfa - vanilla: +3.50 points (paired over 2 seeds, 95 % CI [-15.56, +22.56])\n" + kd_line)
    assert [(d.method, d.baseline, d.runs) for d in differences] == [("dfa", "vanilla", 2), ("dfa", "kd", 3)]
    one_seed, _ = comparison_text([run("dfa", 0, 95.0, 95.0, 99.0, 1.0), run("ofd", 0, 94.5, 95.0, 99.0, 1.0)])
    assert one_seed.endswith("- dfa - ofd: +0.50 points (one seed: no interval)\n")
    no_dfa, none = comparison_text(MIXED[:1] + runs("ofd", [90.0]))
    assert no_dfa == markdown_table(summarize(MIXED[:1] + runs("ofd", [90.0]))) and none == []
