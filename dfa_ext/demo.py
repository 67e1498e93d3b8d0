"""``dfa demo``: the whole pipeline on bundled data, and the table that compares the methods.

Trains a teacher, searches its aggregation (stage 1), then distils the same student with each
method over several seeds (stage 2) and writes, in ``--out``:
``results.md`` and ``results.csv`` (mean and standard deviation of test accuracy per method),
``runs.csv`` (one row per run), ``alpha.png`` (the searched alpha), and one folder per stage
(``teacher/``, ``search/``, ``distill/METHOD/seedN/``) with its checkpoints and logs.
Every stage resumes from its checkpoint, so an interrupted demo continues where it stopped and a
finished one only reprints its table.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import option
from .data.options import DataOptions
from .distill import METHODS, DistillConfig, run_distill
from .errors import ConfigError
from .kernels_switch import KERNEL_CHOICES
from .results_table import RunResult, csv_text, markdown_table, summarize
from .search import SearchConfig, run_search
from .training.checkpoint import atomic_write_text
from .training.distributed import current_context
from .training.run_options import RunOptions
from .training.teacher import TeacherConfig, train_teacher


@dataclass
class DemoConfig(RunOptions, DataOptions):
    """Sizes that finish in about 10 minutes on 2 CPU cores with the bundled MNIST digits.

    The student is deliberately small and trained briefly on few images, where a teacher's
    guidance can make a difference; on the full data every method reaches ~99 %.
    """

    out: str = option("runs/demo", "output folder")
    teacher: str = option("resnet20", "teacher network")
    teacher_epochs: int = option(8, "teacher training epochs")
    student: str = option("resnet8", "student network")
    student_options: dict = option({}, "extra arguments of the student network, as KEY=VALUE")
    search_steps_per_group: int = option(60, "stage 1: search steps per teacher group")
    search_arch_lr: float = option(0.02, "stage 1: Adam learning rate of beta (higher than DARTS' 3e-4 "
                                   "so that a short search moves alpha)")
    methods: tuple[str, ...] = option(("vanilla", "kd", "ofd", "dfa"), "stage 2 methods to compare",
                                      choices=METHODS)
    seeds: tuple[int, ...] = option((0, 1, 2), "stage 2 seeds, one run per method and seed (--seed seeds the "
                                    "teacher and the search)")
    distill_epochs: int = option(3, "stage 2 training epochs per run")
    distill_lr: float = option(0.05, "stage 2 peak learning rate")
    batch_size: int = option(64, "batch size of every stage")
    kernels: str = option("fused", "DFA ops: fused kernels or the pure-PyTorch reference", choices=KERNEL_CHOICES)

    def validate(self) -> None:
        super().validate()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"methods must be among {METHODS}, got {list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must name at least one seed, each once, got {list(self.seeds)}")
        for name in ("teacher_epochs", "search_steps_per_group", "distill_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")


@dataclass(frozen=True)
class DemoResult:
    runs: list[RunResult]
    table: str  # Markdown
    out_dir: Path
    seconds: float


def _shared(config: DemoConfig, seed: int) -> dict[str, Any]:
    """The run and data options every stage takes from the demo's."""
    names = [f.name for f in dataclasses.fields(RunOptions)] + [f.name for f in dataclasses.fields(DataOptions)]
    return {**{name: getattr(config, name) for name in names}, "seed": seed}


def _say(text: str) -> None:
    print(f"[dfa demo] {text}", flush=True)


def run_demo(config: DemoConfig) -> DemoResult:
    """Runs (or resumes) every stage and returns the per-run results and the Markdown table."""
    config.validate()
    out = Path(config.out)
    started = time.perf_counter()
    needs_teacher = any(m != "vanilla" for m in config.methods)
    teacher_path = out / "teacher" / "last.pt"
    if needs_teacher:
        _say(f"training the teacher {config.teacher} ({config.teacher_epochs} epochs on {config.data})")
        teacher = train_teacher(TeacherConfig(**_shared(config, config.seed), model=config.teacher,
                                              epochs=config.teacher_epochs, batch_size=config.batch_size,
                                              out=str(out / "teacher")))
        _say(f"teacher: test top-1 {teacher.last_top1:.2f}% ({teacher.seconds:.0f} s)")
    aggregation = out / "search" / "search.json"
    if "dfa" in config.methods:
        _say(f"searching the aggregation for {config.student} ({config.search_steps_per_group} steps per group)")
        search = run_search(SearchConfig(**_shared(config, config.seed), teacher=str(teacher_path),
                                         student=config.student, student_options=dict(config.student_options),
                                         steps_per_group=config.search_steps_per_group, arch_lr=config.search_arch_lr,
                                         batch_size=config.batch_size, kernels=config.kernels,
                                         out=str(out / "search")))
        for group in search.groups:
            _say(f"  group {group.index}: alpha " + " ".join(f"{a:.3f}" for a in group.alpha))
        if current_context().is_main:  # under torchrun every process runs the demo; one writes
            shutil.copyfile(out / "search" / "alpha.png", out / "alpha.png")

    runs: list[RunResult] = []
    total = len(config.methods) * len(config.seeds)
    for method in config.methods:
        for seed in config.seeds:
            _say(f"[{len(runs) + 1}/{total}] distilling with {method}, seed {seed}")
            result = run_distill(DistillConfig(
                **_shared(config, seed), method=method, student=config.student,
                student_options=dict(config.student_options), teacher=str(teacher_path) if needs_teacher else None,
                aggregation=str(aggregation) if method == "dfa" else None, epochs=config.distill_epochs,
                lr=config.distill_lr, batch_size=config.batch_size, kernels=config.kernels,
                out=str(out / "distill" / method / f"seed{seed}")))
            runs.append(RunResult(method, seed, result.last_top1, result.best_top1, result.last_top5, result.seconds))
            _say(f"  test top-1 {result.last_top1:.2f}% (best {result.best_top1:.2f}%, {result.seconds:.0f} s)")

    table = markdown_table(summarize(runs))
    if current_context().is_main:
        atomic_write_text(out / "results.md", table)
        atomic_write_text(out / "results.csv", csv_text(summarize(runs)))
        atomic_write_text(out / "runs.csv", csv_text(runs))
    seconds = time.perf_counter() - started
    print(f"\n{config.student} distilled from {config.teacher} on {config.data}, {len(config.seeds)} seeds:\n")
    print(table)
    _say(f"done in {seconds:.0f} s; table: {out / 'results.md'} and {out / 'results.csv'}"
         + (f"; alpha picture: {out / 'alpha.png'}" if "dfa" in config.methods else ""))
    return DemoResult(runs, table, out, seconds)
