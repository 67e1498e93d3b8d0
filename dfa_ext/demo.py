"""``dfa demo``: the whole pipeline on bundled data, and the table that compares the methods.

Trains a teacher, searches its aggregation (stage 1), then distils the same student with each
method over several seeds (stage 2) and writes, in ``--out``:
``results.md`` and ``results.csv`` (mean and standard deviation of test accuracy per method, and
the paired per-seed differences of DFA against every other method with 95 % intervals),
``runs.csv`` (one row per run), ``alpha.png`` (the searched alpha), and one folder per stage
(``teacher/``, ``search/``, ``distill/METHOD/seedN/``) with its checkpoints and logs.
Every stage resumes from its checkpoint, so an interrupted demo continues where it stopped and a
finished one only reprints its table. Stage-2 runs train side by side in worker processes.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import models
from .config import make_config, option
from .data.options import DataOptions
from .distill import METHODS, DistillConfig, run_distill
from .distill.config import base_method
from .errors import ConfigError
from .kernels_switch import KERNEL_CHOICES
from .presets import MNIST_1K
from .results_table import PairedDifference, RunResult, csv_text, markdown_table, paired_difference, summarize
from .run_pool import auto_workers, run_pool
from .search import SearchConfig, run_search
from .training.checkpoint import atomic_write_text
from .training.distributed import current_context
from .training.run_options import RunOptions
from .training.teacher import TeacherConfig, train_teacher

_TEACHER, _DISTILL = MNIST_1K.commands["train-teacher"], MNIST_1K.commands["distill"]


@dataclass
class DemoConfig(RunOptions, DataOptions):
    """The measured regime of the ``mnist-1k`` preset (``dfa presets``): 1,000 training and 4,000
    test digits at 14x14, a ResNet-20 teacher and a ResNet-8 student of width 2, small enough to
    need the teacher. Each stage's remaining options are those of its own command (``dfa search
    --help`` ...), changed with ``--teacher-config``, ``--search-config``, ``--distill-config``."""

    data_options: dict = option(dict(MNIST_1K.common["data_options"]),
                                "extra dataset arguments, as KEY=VALUE (e.g. test_fraction=0.8)")
    out: str = option("runs/demo", "output folder")
    teacher: str = option(_TEACHER["model"], "teacher network")
    teacher_epochs: int = option(_TEACHER["epochs"], "teacher training epochs")
    student: str = option(_DISTILL["student"], "student network")
    student_options: dict = option(dict(_DISTILL["student_options"]), "extra arguments of the student network, as KEY=VALUE")
    methods: tuple[str, ...] = option(("vanilla", "kd", "ofd", "dfa"), "stage 2 methods to compare", choices=METHODS)
    seeds: tuple[int, ...] = option((0, 1, 2), "stage 2 seeds, one run per method and seed (--seed seeds the "
                                    "teacher and the search)")
    distill_epochs: int = option(_DISTILL["epochs"], "stage 2 training epochs per run")
    teacher_config: dict = option({}, "more dfa train-teacher options, as KEY=VALUE (e.g. lr=0.05)")
    search_config: dict = option({}, "more dfa search options, as KEY=VALUE (e.g. steps_per_group=200)")
    distill_config: dict = option({}, "more dfa distill options, as KEY=VALUE (e.g. gamma_fd=3e-4)")
    kernels: str = option("fused", "DFA ops: fused kernels or the pure-PyTorch reference", choices=KERNEL_CHOICES)
    workers: int = option(0, "stage 2 runs trained side by side in worker processes (0: one per CPU core, up "
                          "to 4; 1 on a GPU)")

    def validate(self) -> None:
        super().validate()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"methods must be among {METHODS}, got {list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must name at least one seed, each once, got {list(self.seeds)}")
        for name in ("teacher_epochs", "distill_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class DemoResult:
    runs: list[RunResult]
    table: str  # Markdown: the table and the paired differences
    differences: list[PairedDifference]
    out_dir: Path
    seconds: float


def _stage(cls: type, command: str, config: DemoConfig, seed: int, extra: dict, **values: Any):
    """A stage's config: its command's preset values, the demo's run and data options, ``values``,
    then the user's ``--STAGE-config`` extras (which win)."""
    names = [f.name for f in dataclasses.fields(RunOptions)] + [f.name for f in dataclasses.fields(DataOptions)]
    shared = {name: getattr(config, name) for name in names}
    preset = {k: v for k, v in MNIST_1K.commands.get(command, {}).items()
              if k in {f.name for f in dataclasses.fields(cls)}}
    # The demo sets these per run: an extra would give every run one seed, method or folder.
    clash = [key for key in ("seed", "out", "method", "teacher", "aggregation") if key in extra]
    if clash:
        raise ConfigError(f"--{command.split('-')[-1]}-config: {', '.join(clash)} cannot be set here: the demo "
                          "sets them for each run (use --seeds, --out, --methods)")
    try:
        stage = make_config(cls, preset, shared, {"seed": seed, **values}, extra)
        stage.validate()  # now, not when the stage starts (after the teacher's training and the search)
        return stage
    except ConfigError as error:
        raise ConfigError(f"--{command.split('-')[-1]}-config: {error}") from None


def _say(text: str) -> None:
    print(f"[dfa demo] {text}", flush=True)


def _distill_run(config: DistillConfig) -> RunResult:
    """One stage-2 run (a worker-process job): trains, then returns its numbers."""
    result = run_distill(config)
    return RunResult(config.method, config.seed, result.last_top1, result.best_top1, result.last_top5, result.seconds)


def comparison_text(runs: list[RunResult], reference: str = "dfa") -> tuple[str, list[PairedDifference]]:
    """The Markdown table of ``runs`` and, under it, ``reference`` minus every other method, paired by seed."""
    table = markdown_table(summarize(runs))
    methods = list(dict.fromkeys(r.method for r in runs))
    differences = [paired_difference(runs, reference, m) for m in methods if reference in methods and m != reference]
    if differences:
        table += "\nPaired per-seed differences of final top-1 (points):\n\n"
        table += "".join(f"- {d.line()}\n" for d in differences)
    return table, differences


def search_note(methods: Sequence[str], seeds: Sequence[int], search_seed: int) -> str:
    """The line under the table when DFA rows share one search: their ± is over stage-2 seeds
    only (the search ran once, with ``search_seed``), so it leaves out the search's own variance,
    which ``experiments/study.py compare`` includes by searching once per seed."""
    dfa_rows = [m for m in methods if base_method(m) == "dfa"]
    if not dfa_rows:
        return ""
    return (f"\nNote: {', '.join(dfa_rows)} used one search (seed {search_seed}) for all {len(seeds)} stage-2 "
            f"seed{'s' if len(seeds) != 1 else ''}: {'their' if len(dfa_rows) > 1 else 'its'} ± and paired intervals "
            "cover the stage-2 seeds only, not the search's own variance (experiments/study.py compare searches "
            "once per seed).\n")


def run_demo(config: DemoConfig) -> DemoResult:
    """Runs (or resumes) every stage and returns the per-run results and the Markdown table."""
    config.validate()
    with torch.device("meta"):  # a bad student name or argument fails now, not after the teacher's training
        models.create(config.student, **config.student_options)
    out = Path(config.out)
    started = time.perf_counter()
    needs_teacher = any(m != "vanilla" for m in config.methods)
    searches = any(base_method(m) == "dfa" for m in config.methods)
    teacher_path = out / "teacher" / "last.pt"
    teacher_config = _stage(TeacherConfig, "train-teacher", config, config.seed, config.teacher_config,
                            model=config.teacher, epochs=config.teacher_epochs, out=str(out / "teacher"))
    search_config = _stage(SearchConfig, "search", config, config.seed, config.search_config,
                           teacher=str(teacher_path), student=config.student, student_options=dict(config.student_options),
                           kernels=config.kernels, out=str(out / "search"))
    distill_configs = [_stage(DistillConfig, "distill", config, seed, config.distill_config, method=method,
                              student=config.student, student_options=dict(config.student_options),
                              teacher=str(teacher_path) if needs_teacher else None,
                              aggregation=str(out / "search" / "search.json") if base_method(method) == "dfa" else None,
                              epochs=config.distill_epochs, kernels=config.kernels,
                              out=str(out / "distill" / method / f"seed{seed}"))
                       for method in config.methods for seed in config.seeds]
    if needs_teacher:
        _say(f"training the teacher {config.teacher} ({config.teacher_epochs} epochs on {config.data})")
        teacher = train_teacher(teacher_config)
        _say(f"teacher: test top-1 {teacher.last_top1:.2f}% ({teacher.seconds:.0f} s)")
    if searches:
        _say(f"searching the aggregation for {config.student}")
        search = run_search(search_config)
        for group in search.groups:
            _say(f"  group {group.index}: alpha " + " ".join(f"{a:.3f}" for a in group.alpha))
        if current_context().is_main:  # under torchrun every process runs the demo; one writes
            shutil.copyfile(out / "search" / "alpha.png", out / "alpha.png")

    workers, threads = auto_workers(config.device, len(distill_configs)) if config.workers == 0 else (config.workers, 1)
    if current_context().active:
        workers = 1  # under torchrun the processes train each run together
    if workers > 1:
        for c in distill_configs:
            c.progress = False
    _say(f"{len(distill_configs)} distillation runs" + (f", {workers} at a time" if workers > 1 else ""))
    runs: list[RunResult] = []
    for index, run in run_pool([(_distill_run, c) for c in distill_configs], workers=workers, threads=threads):
        runs.append(run)
        _say(f"[{len(runs)}/{len(distill_configs)}] {run.method}, seed {run.seed}: test top-1 {run.last_top1:.2f}% "
             f"(best {run.best_top1:.2f}%, {run.seconds:.0f} s)")
    order = {(c.method, c.seed): i for i, c in enumerate(distill_configs)}
    runs.sort(key=lambda r: order[(r.method, r.seed)])

    table, differences = comparison_text(runs)
    table += search_note(config.methods, config.seeds, config.seed)
    if current_context().is_main:
        atomic_write_text(out / "results.md", table)
        atomic_write_text(out / "results.csv", csv_text(summarize(runs)))
        atomic_write_text(out / "runs.csv", csv_text(runs))
    seconds = time.perf_counter() - started
    print(f"\n{config.student} distilled from {config.teacher} on {config.data}, {len(config.seeds)} seeds:\n")
    print(table)
    _say(f"done in {seconds:.0f} s; table: {out / 'results.md'} and {out / 'results.csv'}"
         + (f"; alpha picture: {out / 'alpha.png'}" if searches else ""))
    return DemoResult(runs, table, differences, out, seconds)
