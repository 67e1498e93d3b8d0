"""The DFA study of bench/RESULTS.md: every number there comes from one of these commands.

    python experiments/study.py regime     [--seeds 0 1 2 3 4] [--workers 2] [--out runs/study]
    python experiments/study.py stability  [--search-seeds 0 1 2]
    python experiments/study.py compare    [--seeds ...] [--methods ...] [--preset NAME]
    python experiments/study.py ablation
    python experiments/study.py oracle
    python experiments/study.py margins
    python experiments/study.py probe      [--regimes NAME ...]   (3 seeds by default: --seeds)

Each study is a list of ``dfa`` commands (printed, and logged to OUT/commands.log) run in worker
processes, then a Markdown report (printed and written to OUT/STUDY.md) computed from the run
folders. Runs already finished are not trained again, so a study can be interrupted and rerun, and
studies share their runs (the teacher, the vanilla students, the searches).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runner import command_line, final_top1, last_epoch, run_jobs, searched_alpha, top1_curve  # noqa: E402

from dfa_ext.results_table import RunResult, paired_difference, summarize  # noqa: E402

PRESET = "mnist-1k"
QUIET = ["--no-progress", "--no-tensorboard"]


@dataclass
class Study:
    """Stages of ``dfa`` argument lists (each stage needs the previous one) and a report."""

    out: Path
    seeds: list[int]
    search_seeds: list[int]
    stages: list[list[list[str]]] = field(default_factory=list)
    teacher_extra: list[str] = field(default_factory=list)  # options on top of the preset, every teacher run
    student_extra: list[str] = field(default_factory=list)  # the same for every student run (search, distill)
    teacher_dir: Path | None = None  # a teacher shared with other studies (default: OUT/teacher)
    preset: str = PRESET  # the regime: every command runs with --preset PRESET

    # -- the runs every study is made of --------------------------------------------------------

    @property
    def teacher_out(self) -> Path:
        return self.teacher_dir if self.teacher_dir is not None else self.out / "teacher"

    @property
    def teacher(self) -> str:
        return str(self.teacher_out / "last.pt")

    def teacher_job(self) -> list[str]:
        return ["train-teacher", "--preset", self.preset, "--out", str(self.teacher_out), *self.teacher_extra, *QUIET]

    def distill_dir(self, name: str, seed: int) -> Path:
        return self.out / "distill" / name / f"seed{seed}"

    def distill_job(self, name: str, method: str, seed: int, *extra: str) -> list[str]:
        teacher = [] if method == "vanilla" else ["--teacher", self.teacher]
        return ["distill", "--preset", self.preset, "--method", method, *teacher, "--seed", str(seed),
                "--out", str(self.distill_dir(name, seed)), *self.student_extra, *extra, *QUIET]

    def search_dir(self, name: str, seed: int) -> Path:
        return self.out / "search" / name / f"seed{seed}"

    def search_job(self, name: str, seed: int, *extra: str) -> list[str]:
        return ["search", "--preset", self.preset, "--teacher", self.teacher, "--seed", str(seed),
                "--out", str(self.search_dir(name, seed)), *self.student_extra, *extra, *QUIET]

    def results(self, names: list[str], seeds: list[int] | None = None) -> list[RunResult]:
        runs = []
        for name in names:
            for seed in seeds if seeds is not None else self.seeds:
                top1 = final_top1(self.distill_dir(name, seed))
                if not math.isnan(top1):
                    runs.append(RunResult(name, seed, top1, top1, math.nan, math.nan))
        return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def method_table(study: Study, names: list[str], baseline: str | None = None, reference: str | None = None) -> str:
    """Mean ± std of final top-1 per run name; paired differences ``reference - X`` under it."""
    runs = study.results(names)
    lines = ["| method | seeds | top-1 % (final) |", "|---|---:|---:|"]
    for s in summarize(runs):
        lines.append(f"| {s.method} | {s.runs} | {mean_std([r.last_top1 for r in runs if r.method == s.method])} |")
    text = "\n".join(lines) + "\n"
    if reference is not None:
        others = [n for n in names if n != reference and any(r.method == n for r in runs)]
        text += "\n" + "".join(f"- {paired_difference(runs, reference, o).line()}\n" for o in others
                               if any(r.method == reference for r in runs))
    return text


# ---- the studies --------------------------------------------------------------------------------

def regime(study: Study) -> str:
    """Is there room for a teacher, and has training converged (the last 20 epochs move top-1 by
    less than the seeds spread it)? vanilla and kd students at the preset's epochs."""
    vanilla = [study.distill_job("vanilla", "vanilla", s) for s in study.seeds]
    kd = [study.distill_job("kd", "kd", s) for s in study.seeds]
    study.stages = [[study.teacher_job(), *vanilla], kd]  # the vanilla students need no teacher

    def report() -> str:
        teacher = final_top1(study.out / "teacher")
        text = f"Teacher (ResNet-20): {teacher:.2f} % test top-1.\n\n"
        text += method_table(study, ["vanilla", "kd"])
        for name in ("vanilla", "kd"):
            curves = [top1_curve(study.distill_dir(name, s)) for s in study.seeds]
            moves = [c[-1][1] - c[-3][1] for c in curves if len(c) >= 3]
            finals = [r.last_top1 for r in study.results([name])]
            text += (f"\n{name}: top-1 change over the last 20 epochs {mean_std(moves)} points "
                     f"(seed std of the final top-1: {mean_std(finals).split(' ± ')[-1]})")
        vanilla = [r.last_top1 for r in study.results(["vanilla"])]
        if vanilla:
            text += f"\n\nTeacher - vanilla: {teacher - statistics.fmean(vanilla):.2f} points.\n"
        return text
    return report


SEARCH_VARIANTS: dict[str, list[str]] = {
    # name -> dfa search options (besides the preset, teacher, seed and output); {OUT} and {SEED}
    # are replaced by the study folder and the search seed.
    "short-60": ["--steps-per-group", "60", "--arch-lr", "0.02", "--warmup-steps", "0"],
    "warm-400": ["--steps-per-group", "400", "--warmup-steps", "200", "--arch-lr", "0.01"],  # = the defaults
    "warm-400-ts3": ["--steps-per-group", "400", "--warmup-steps", "200", "--arch-lr", "0.01", "--gamma-ts", "3"],
    "warm-400-clip": ["--steps-per-group", "400", "--warmup-steps", "200", "--arch-lr", "0.01",
                      "--arch-grad-clip", "0.02"],
    "warm-400-lr3e-3": ["--steps-per-group", "400", "--warmup-steps", "200", "--arch-lr", "0.003"],
    "warm-1000-lr3e-3": ["--steps-per-group", "1000", "--warmup-steps", "200", "--arch-lr", "0.003"],
    "init-vanilla": ["--init-student", "{OUT}/distill/vanilla/seed{SEED}/last.pt", "--steps-per-group", "300",
                     "--warmup-steps", "100", "--arch-lr", "0.01"],
    "init-kd": ["--init-student", "{OUT}/distill/kd/seed{SEED}/last.pt", "--steps-per-group", "300",
                "--warmup-steps", "100", "--arch-lr", "0.01"],
}


def stability(study: Study, variants: list[str]) -> str:
    """Alpha over search seeds: mean ± std per group and layer, and the leading layer of each seed."""
    jobs = []
    for name in variants:
        extra = SEARCH_VARIANTS[name]
        for seed in study.search_seeds:
            args = [a.replace("{SEED}", str(seed)).replace("{OUT}", str(study.out)) for a in extra]
            jobs.append(study.search_job(name, seed, *args))
    students = [study.distill_job(m, m, s) for m in ("vanilla", "kd") for s in study.search_seeds
                if any(f"{{OUT}}/distill/{m}/" in a for n in variants for a in SEARCH_VARIANTS[n])]
    study.stages = [[study.teacher_job()], students, jobs]

    def report() -> str:
        lines = ["| variant | group | alpha per layer, mean ± std over seeds | leading layer per seed | lead - 1/K |",
                 "|---|---:|---|---|---:|"]
        for name in variants:
            alphas = [searched_alpha(study.search_dir(name, s)) for s in study.search_seeds
                      if (study.search_dir(name, s) / "search.json").is_file()]
            if not alphas:
                continue
            for g in range(len(alphas[0])):
                per_layer = [[a[g][j] for a in alphas] for j in range(len(alphas[0][g]))]
                means = [statistics.fmean(v) for v in per_layer]
                spread = [statistics.stdev(v) if len(v) > 1 else math.nan for v in per_layer]
                leads = [max(range(len(a[g])), key=a[g].__getitem__) for a in alphas]
                cells = " ".join(f"{m:.2f}±{s:.2f}" for m, s in zip(means, spread))
                lines.append(f"| {name} | {g} | {cells} | {' '.join(map(str, leads))} | "
                             f"{max(means) - 1 / len(means):+.2f} |")
        return "\n".join(lines) + "\n"
    return report


def gamma(study: Study, values: list[str]) -> str:
    """The feature-loss weight: OFD and DFA (the default search of each seed) at other values of
    --gamma-fd than the default 1e-3 (the compare study's ofd and dfa runs)."""
    runs = [j for g in values for j in (*(study.distill_job(f"ofd-gamma{g}", "ofd", s, "--gamma-fd", g) for s in study.seeds),
                                        *dfa_jobs(study, f"dfa-gamma{g}", "dfa", "default", "--gamma-fd", g))]
    study.stages = [[study.teacher_job()], searches(study, "default"), runs]
    names = ["vanilla", "ofd", "dfa", *(f"{m}-gamma{g}" for g in values for m in ("ofd", "dfa"))]
    return lambda: method_table(study, names, reference="vanilla") + "".join(
        f"- {paired_difference(study.results([f'dfa-gamma{g}', f'ofd-gamma{g}']), f'dfa-gamma{g}', f'ofd-gamma{g}').line()}\n"
        for g in values if study.results([f"dfa-gamma{g}"]))


# The eleven methods of the comparison (every seed), and ofd+kd beside dfa+kd (3 seeds: time).
COMPARED = ("vanilla", "kd", "ofd", "uniform", "random", "dfa", "fitnet", "at", "sp", "dkd", "dfa+kd")
# Rows beside them, name -> (method, options). AT at its reference beta (1e3) barely learns here (the
# README's comparison): its attention maps have 196/49/16 positions against
# CIFAR's 1024/256/64, and the mean squared difference of L2-normalised maps grows as 1/positions,
# so the term is ~5x CIFAR's; at-b200 scales beta down by that ratio.
COMPARED_VARIANTS: dict[str, tuple[str, list[str]]] = {"at-b200": ("at", ["--at-beta", "200"])}


def searches(study: Study, name: str, *extra: str) -> list[list[str]]:
    """One search per seed (the stage-2 run of seed s uses the search of seed s: the whole pipeline)."""
    return [study.search_job(name, s, *extra) for s in study.seeds]


def dfa_jobs(study: Study, name: str, method: str, search: str, *extra: str) -> list[list[str]]:
    return [study.distill_job(name, method, s, "--aggregation", str(study.search_dir(search, s) / "search.json"), *extra)
            for s in study.seeds]


def compare(study: Study, methods: list[str]) -> str:
    """Each of ``methods`` (names of ``COMPARED``, ``COMPARED_VARIANTS`` or ofd+kd) over the seeds
    (the baselines FitNet, AT, SP and DKD with their papers' defaults, see ``dfa distill --help``);
    DFA with the default search recipe, one search per seed. ofd+kd runs on the first 3 seeds only."""
    singles = [m for m in methods if m in COMPARED and "dfa" not in m]
    baselines = [study.distill_job(m, m, s, *(["--aggregation-seed", str(s)] if m == "random" else []))
                 for m in singles for s in study.seeds]
    baselines += [study.distill_job(name, method, s, *extra)
                  for name, (method, extra) in COMPARED_VARIANTS.items() if name in methods for s in study.seeds]
    combined = [*(dfa_jobs(study, "dfa", "dfa", "default") if "dfa" in methods else []),  # the combined methods
                *(dfa_jobs(study, "dfa+kd", "dfa+kd", "default") if "dfa+kd" in methods else []),  # last: the least needed
                *(study.distill_job("ofd+kd", "ofd+kd", s) for s in study.seeds[:3] if "ofd+kd" in methods)]  # time
    needs_search = any(m in methods for m in ("dfa", "dfa+kd"))
    study.stages = [[study.teacher_job()], [*(searches(study, "default") if needs_search else []), *baselines],
                    combined]

    def report() -> str:
        names = [m for m in (*COMPARED, *COMPARED_VARIANTS) if m in methods]
        text = method_table(study, names, reference="dfa" if "dfa" in methods else None)
        means = sorted(((statistics.fmean(v), n) for n in names
                        if (v := [r.last_top1 for r in study.results([n])])), reverse=True)
        text += "\nRanking by mean top-1: " + ", ".join(f"{i}. {n} {m:.2f}" for i, (m, n) in enumerate(means, 1)) + "\n"
        runs = study.results(names)
        if any(r.method == "vanilla" for r in runs):  # does the teacher pay at all?
            text += "\n" + "".join(f"- {paired_difference(runs, n, 'vanilla').line()}\n" for n in names
                                   if n != "vanilla" and any(r.method == n for r in runs))
        text += "\n" + fit_table(study, names)
        if {"ofd+kd", "dfa+kd"} <= set(methods):
            text += "\n" + method_table(study, ["ofd+kd", "dfa+kd", "kd"], reference="dfa+kd")
        return text
    return report


def fit_table(study: Study, names: list[str]) -> str:
    """How each method fits its training set: at the last epoch, mean over seeds of the training
    cross-entropy, the method's other loss terms (weighted, as logged) and training top-1."""
    lines = ["| method | train CE | other terms | train top-1 % |", "|---|---:|---:|---:|"]
    for name in names:
        rows = [last_epoch(study.distill_dir(name, s)) for s in study.seeds
                if not math.isnan(final_top1(study.distill_dir(name, s)))]
        if rows:
            other = statistics.fmean(sum(v for k, v in r.items() if k.startswith("train_")
                                         and k not in ("train_ce", "train_top1")) for r in rows)
            lines.append(f"| {name} | {statistics.fmean(r['train_ce'] for r in rows):.3f} | {other:.3f} | "
                         f"{statistics.fmean(r['train_top1'] for r in rows):.2f} |")
    return "\n".join(lines) + "\n"


def ablation(study: Study, distilled: list[str]) -> str:
    """The search objective: the bridge loss (default) against one path only and the plain
    distillation loss, each searched once per seed; the alpha of the objectives ``distilled`` is
    then distilled too."""
    objectives = ("st", "ts", "distill")
    study.stages = [[study.teacher_job()],
                    [*searches(study, "default"), *(j for o in objectives for j in searches(study, o, "--objective", o))],
                    [*dfa_jobs(study, "dfa", "dfa", "default"),
                     *(j for o in distilled for j in dfa_jobs(study, f"dfa-{o}", "dfa", o))]]

    def report() -> str:
        text = method_table(study, ["dfa", *(f"dfa-{o}" for o in objectives), "ofd"], reference="dfa")
        lines = ["\n| objective | group | alpha per layer, mean ± std over seeds |", "|---|---:|---|"]
        for name in ("default", *objectives):
            alphas = [searched_alpha(study.search_dir(name, s)) for s in study.seeds
                      if (study.search_dir(name, s) / "search.json").is_file()]
            for g in range(len(alphas[0]) if alphas else 0):
                cells = " ".join(mean_std([a[g][j] for a in alphas]).replace(" ", "") for j in range(len(alphas[0][g])))
                lines.append(f"| {'bridge' if name == 'default' else name} | {g} | {cells} |")
        return text + "\n".join(lines) + "\n"
    return report


ORACLE = {"first": "1 0 0", "middle": "0 1 0", "middle+last": "0 1 1"}  # with ofd (0 0 1) and uniform (1 1 1)


def oracle(study: Study) -> str:
    """Fixed alphas (the same in every group) on a grid of the simplex: how good is the best fixed
    aggregation, and where does the search land among them?"""
    runs = [study.distill_job(_alpha_name(a), "fixed", s, "--alpha", *a.split()) for a in ORACLE.values()
            for s in study.seeds]
    study.stages = [[study.teacher_job()], runs]
    return lambda: method_table(study, ["ofd", "uniform", *(_alpha_name(a) for a in ORACLE.values()), "dfa"],
                                reference="ofd")


def _alpha_name(alpha: str) -> str:
    return "alpha-" + alpha.replace(" ", "-")


def margins(study: Study, variants: list[str]) -> str:
    """Margin variants: OFD's BN estimate per layer (default), measured margins, and the margin
    applied once to the aggregation (the paper's F_t(A))."""
    runs = dfa_jobs(study, "dfa-aggregate", "dfa", "default", "--margin-place", "aggregate")
    if "empirical" in variants:
        runs += dfa_jobs(study, "dfa-empirical", "dfa", "default", "--margins", "empirical")
    study.stages = [[study.teacher_job()], searches(study, "default"), runs]
    return lambda: method_table(study, ["ofd", "dfa", "dfa-aggregate", "dfa-empirical"], reference="dfa")


# Issue 26's probe: a regime of the bundled data where feature distillation itself pays (OFD above
# vanilla), the precondition of "DFA beats OFD where OFD helps"; in mnist-1k OFD costs accuracy.
# name -> (data options: the teacher's and the students', student options, stage-2 options, OFD-only
# options), each on top of the mnist-1k preset. The levers: student width, image size, epochs, gamma_fd
# (gamma_fd alone, in the preset's regime, is the `gamma` study's).
_DATA_28 = ["--data-options", "test_fraction=0.8", "image_size=28", "padding=2"]
PROBE_REGIMES: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "w8-14px": ([], ["--student-options", "width=8"], [], []),
    "w16-28px-e30": (_DATA_28, ["--student-options", "width=16"], ["--epochs", "30"], []),
    "w16-28px-e30-g1e-2": (_DATA_28, ["--student-options", "width=16"], ["--epochs", "30"], ["--gamma-fd", "1e-2"]),
    "w4-28px-e60": (_DATA_28, ["--student-options", "width=4"], ["--epochs", "60"], []),
}


def probe(study: Study, regimes: list[str]) -> str:
    """vanilla, OFD and KD students in each regime of ``PROBE_REGIMES`` (its own teacher per data
    setting, under OUT/probe/NAME), paired by seed: does OFD beat vanilla anywhere?"""
    # One teacher per data setting: the preset's data shares the studies' teacher, each other setting
    # has OUT/probe/teacher-I, I its rank among the settings of PROBE_REGIMES (whichever regimes run).
    settings = list(dict.fromkeys(" ".join(r[0]) for r in PROBE_REGIMES.values() if r[0]))
    subs: dict[str, Study] = {}
    for name in regimes:
        data, student, stage2, _ = PROBE_REGIMES[name]
        teacher_dir = study.out / "probe" / f"teacher-{settings.index(' '.join(data))}" if data else study.teacher_out
        subs[name] = Study(study.out / "probe" / name, study.seeds, study.search_seeds, teacher_extra=list(data),
                           student_extra=[*data, *student, *stage2], teacher_dir=teacher_dir, preset=study.preset)
    jobs = [job for name, sub in subs.items() for s in study.seeds
            for job in (sub.distill_job("vanilla", "vanilla", s),
                        sub.distill_job("ofd", "ofd", s, *PROBE_REGIMES[name][3]),
                        sub.distill_job("kd", "kd", s))]
    first_of_each_teacher = {sub.teacher_dir: sub for sub in subs.values()}.values()
    study.stages = [[sub.teacher_job() for sub in first_of_each_teacher], jobs]

    def report() -> str:
        text = ""
        for name, sub in subs.items():
            text += (f"\n### {name}: `{' '.join(sub.student_extra + PROBE_REGIMES[name][3]) or 'the preset'}`\n\n"
                     f"Teacher: {final_top1(sub.teacher_out):.2f} % test top-1.\n\n")
            text += method_table(sub, ["vanilla", "ofd", "kd"], reference="ofd")
            for method in ("vanilla", "ofd", "kd"):  # converged? the move between the last two evaluations
                curves = [c for s in study.seeds if len(c := top1_curve(sub.distill_dir(method, s))) >= 2]
                if curves:
                    text += (f"\n{method}: top-1 change over the last {curves[0][-1][0] - curves[0][-2][0]} epochs "
                             f"{mean_std([c[-1][1] - c[-2][1] for c in curves])} points")
            text += "\n"
        return text
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["regime", "stability", "gamma", "compare", "ablation", "oracle", "margins",
                                          "probe"])
    parser.add_argument("--gamma", nargs="+", default=["1e-3", "3e-4", "1e-4"], help="gamma: the values of --gamma-fd")
    parser.add_argument("--preset", default=PRESET, help="the regime (a dfa preset) of every command")
    parser.add_argument("--out", default=None, help="default: runs/study, or runs/study-PRESET for another preset")
    parser.add_argument("--methods", nargs="+", default=[*COMPARED, *COMPARED_VARIANTS, "ofd+kd"],
                        choices=[*COMPARED, *COMPARED_VARIANTS, "ofd+kd"], help="compare: the methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(SEARCH_VARIANTS), choices=list(SEARCH_VARIANTS))
    parser.add_argument("--distilled", nargs="*", default=["st", "ts", "distill"], choices=["st", "ts", "distill"],
                        help="ablation: the objectives whose alpha is also distilled")
    parser.add_argument("--margins", nargs="*", default=["aggregate"], choices=["aggregate", "empirical"],
                        help="margins: the variants besides the default (aggregate is always run; add empirical)")
    parser.add_argument("--regimes", nargs="+", default=list(PROBE_REGIMES), choices=list(PROBE_REGIMES),
                        help="probe: the regimes to train")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--report-only", action="store_true", help="report the runs that exist; train nothing")
    args = parser.parse_args(argv)
    out = args.out or ("runs/study" if args.preset == PRESET else f"runs/study-{args.preset}")
    study = Study(Path(out), args.seeds, args.search_seeds, preset=args.preset)
    report = {"regime": lambda: regime(study), "stability": lambda: stability(study, args.variants),
              "gamma": lambda: gamma(study, args.gamma), "compare": lambda: compare(study, args.methods),
              "ablation": lambda: ablation(study, args.distilled), "oracle": lambda: oracle(study),
              "margins": lambda: margins(study, args.margins),
              "probe": lambda: probe(study, args.regimes)}[args.study]()
    log = study.out / "commands.log"
    if not args.dry_run:
        study.out.mkdir(parents=True, exist_ok=True)
    for stage in study.stages:
        if args.dry_run:
            print("\n".join(command_line(j) for j in stage))
        elif not args.report_only:
            run_jobs(stage, workers=args.workers, log=log)
    if not args.dry_run:
        text = f"## {args.study}\n\n`python experiments/study.py {' '.join(argv or sys.argv[1:])}`\n\n{report()}"
        print(text)
        (study.out / f"{args.study}.md").write_text(text)


if __name__ == "__main__":
    main()
