"""The study's stage-2 students before and after the per-epoch shuffle fix (b6170cb).

Until that commit every training epoch visited the samples in the order of epoch 0. This reruns
vanilla, kd and dfa (5 seeds, the mnist-1k preset) with the fix, reusing the study's teacher and
default searches (both trained before the fix), into runs/epochfix/, and prints the before/after
table and the paired differences with 95 % Student-t intervals:

    python experiments/epoch_order_fix.py --print-commands | OMP_NUM_THREADS=1 xargs -P 2 -I{} sh -c "{}"
    python experiments/epoch_order_fix.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import final_top1  # noqa: E402

SEEDS = range(5)
METHODS = ("vanilla", "kd", "dfa")
TEACHER = "runs/study/teacher/last.pt"


def command(method: str, seed: int) -> str:
    extra = {"vanilla": "", "kd": f" --teacher {TEACHER}",
             "dfa": f" --teacher {TEACHER} --aggregation runs/study/search/default/seed{seed}/search.json"}[method]
    return (f"dfa distill --preset mnist-1k --method {method}{extra} --seed {seed} "
            f"--out runs/epochfix/{method}/seed{seed} --no-progress --no-tensorboard")


def interval(differences: list[float]) -> str:
    n, mean, std = len(differences), statistics.mean(differences), statistics.stdev(differences)
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return f"{mean:+.2f} points (95 % CI [{mean - half:+.2f}, {mean + half:+.2f}])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-commands", action="store_true")
    args = parser.parse_args()
    if args.print_commands:
        print("\n".join(command(m, s) for s in SEEDS for m in METHODS))
        return
    after = {m: [final_top1(f"runs/epochfix/{m}/seed{s}") for s in SEEDS] for m in METHODS}
    before = {m: [final_top1(f"runs/study/distill/{m}/seed{s}") for s in SEEDS] for m in METHODS}
    print("| method | before the fix | after the fix | after - before, paired by seed |")
    print("|---|---:|---:|---|")
    for m in METHODS:
        print(f"| {m} | {statistics.mean(before[m]):.2f} ± {statistics.stdev(before[m]):.2f} | "
              f"{statistics.mean(after[m]):.2f} ± {statistics.stdev(after[m]):.2f} | "
              f"{interval([a - b for a, b in zip(after[m], before[m])])} |")
    print()
    for a, b in (("dfa", "vanilla"), ("dfa", "kd"), ("kd", "vanilla")):
        print(f"- after the fix, {a} - {b}: {interval([x - y for x, y in zip(after[a], after[b])])}")


if __name__ == "__main__":
    main()
