"""Sums up a DFA_ROUNDING_REPORT file (rounding.record): each test's float bounds and their margins.

    DFA_ROUNDING_REPORT=/tmp/r.tsv .venv/bin/python -m pytest python_tests -m rounding
    .venv/bin/python python_tests/report_rounding.py /tmp/r.tsv

One Markdown row per test: the number of checks, the smallest margin (bound / error: how many
times the largest error fits under its bound), that check's error and bound.
"""

from __future__ import annotations

import argparse
import collections
import math


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the file DFA_ROUNDING_REPORT named")
    args = parser.parse_args()
    checks: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    with open(args.report) as f:
        for line in f:
            test, what, error, bound = line.rstrip("\n").split("\t")
            checks[test].append((float(error), float(bound), what))
    print("| test | checks | smallest margin | error | bound | of |")
    print("|---|---:|---:|---:|---:|---|")
    for test, rows in sorted(checks.items()):
        error, bound, what = min(rows, key=lambda r: r[1] / r[0] if r[0] > 0 else math.inf)
        margin = f"{bound / error:.3g}x" if error > 0 else "exact"
        print(f"| {test} | {len(rows)} | {margin} | {error:.2e} | {bound:.2e} | {what} |")


if __name__ == "__main__":
    main()
