"""End-to-end benchmark of whole trainers, as a user runs them: teacher training, the search
(first and second order) and each stage-2 method, data loading and evaluation included, with the
loader and with the data on the device.

For each trainer and data path it runs the real Python entry point (``train_teacher``,
``run_search``, ``run_distill``) in a fresh folder for ``--epochs`` epochs (the search: one
epoch's worth of steps per group) and reports:

- ``s total``: wall time of the call (set-up, every step, evaluation and checkpoints);
- ``s steps``: the part spent in training steps (data of each step included): per epoch (per
  group in the search) from its first step to its last, plus one median step;
- ``s other``: ``s total - s steps``: set-up, evaluation of the test set after each epoch,
  checkpoints, building the next group's network;
- ``img/s``: training images per second of the whole call (what a user waits on);
- ``step ms``: median time between consecutive steps (data of the step included);
- ``steps / (steps x step)``: the epoch's steps against their median: 1.0 when the data never
  stalls a step (the 10 % goal);
- ``total / (steps x step)``: everything the run costs beyond its steps;
- ``first run s`` (compiled rows): the same run's wall time in a new process-level compile
  cache, i.e. with the compilation; the rows themselves reuse the compiled graphs;
- ``data ms/batch`` (printed first): one epoch of the data path alone (no model), per batch.

``step ms`` eager vs ``--compile default`` is the compiled step's speed-up once compiled.

    python bench/bench_epoch.py [--device cpu|cuda] [--trainers teacher search-1 ...] [--epochs 1]
                                [--compile off default] [--data-paths loader device]

The regime is the mnist-1k preset (the demo's: 1,000 digits at 14x14, ResNet-20 -> ResNet-8
width 2) unless --preset names another.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table  # noqa: E402

from dfa_ext.data.device_batches import data_on_device  # noqa: E402
from dfa_ext.data.loader import make_loader  # noqa: E402
from dfa_ext.distill import DistillConfig, run_distill  # noqa: E402
from dfa_ext.presets import preset_values  # noqa: E402
from dfa_ext.search import SearchConfig, run_search  # noqa: E402
from dfa_ext.training import TeacherConfig, train_teacher  # noqa: E402

TRAINERS = ("teacher", "search-1", "search-2", "vanilla", "kd", "ofd", "dfa")
DATA_PATHS = {"loader": "off", "device": "on"}


class StepClock:
    """``on_step`` callback: the time of every step, to take the median interval."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def median_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else float("nan")

    def seconds_in_steps(self, segments: int) -> float:
        """Time spent in steps when the run's steps form ``segments`` equal runs (epochs, or the
        search's groups) with other work between them: each run's span plus one median step."""
        per, step = len(self.times) // segments, self.median_step()
        return sum(self.times[(i + 1) * per - 1] - self.times[i * per] + step for i in range(segments))


def _common(args, mode: str, out: Path, compile_mode: str = "off") -> dict:
    return dict(device=args.device, data_on_device=mode, compile=compile_mode, progress=False, tensorboard=False,
                out=str(out), seed=0)


def run_trainer(name: str, mode: str, compile_mode: str, args, work: Path, teacher: str, aggregation: str) -> dict:
    """Runs trainer ``name`` with data path ``mode`` and ``--compile compile_mode``; returns its
    row's numbers."""
    out, clock = work / f"{name}-{mode}-{compile_mode}", StepClock()
    common = _common(args, mode, out, compile_mode)
    started = time.perf_counter()
    if name == "teacher":
        config = TeacherConfig(**{**preset_values(args.preset, "train-teacher", TeacherConfig), **common,
                                  "epochs": args.epochs})
        train_teacher(config, on_step=clock)
        batch, segments = config.batch_size, args.epochs
    elif name.startswith("search"):
        values = preset_values(args.preset, "search", SearchConfig)
        config = SearchConfig(**{**values, **common, "teacher": teacher, "order": "first" if name == "search-1" else "second",
                                 "steps_per_group": args.search_steps, "warmup_steps": args.search_steps // 2})
        result = run_search(config, on_step=clock)
        batch, segments = config.batch_size, len(result.groups)
    else:
        values = preset_values(args.preset, "distill", DistillConfig)
        config = DistillConfig(**{**values, **common, "method": name, "epochs": args.epochs,
                                  "teacher": teacher if name != "vanilla" else None,
                                  "aggregation": aggregation if name == "dfa" else None})
        run_distill(config, on_step=clock)
        batch, segments = config.batch_size, args.epochs
    total = time.perf_counter() - started
    steps, step, in_steps = len(clock.times), clock.median_step(), clock.seconds_in_steps(segments)
    return {"steps": steps, "total": total, "in steps": in_steps, "images/s": steps * batch / total,
            "step": step, "stalls": in_steps / (steps * step), "overhead": total / (steps * step)}


def data_seconds_per_batch(args, mode: str) -> float:
    """One epoch of the teacher's training data path alone, per batch (no model)."""
    config = TeacherConfig(**{**preset_values(args.preset, "train-teacher", TeacherConfig),
                              **_common(args, mode, Path("unused"))})
    data = config.load(seed=0)
    device = torch.device(args.device)
    on_device = data_on_device(mode, data.train, device)
    loader = make_loader(data.train, config.batch_size, train=True, seed=0, on_device=on_device)
    started = time.perf_counter()
    count = 0
    for images, labels in loader:
        images.to(device, non_blocking=True)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="mnist-1k")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--data-paths", nargs="+", default=list(DATA_PATHS), choices=list(DATA_PATHS))
    parser.add_argument("--compile", nargs="+", default=["off", "default"], dest="compile_modes",
                        choices=["off", "default", "max-autotune", "reduce-overhead"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--search-steps", type=int, default=40, help="steps per group of the search")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The stage-2 and search runs need a teacher and an aggregation: one short run of each.
        teacher_config = TeacherConfig(**{**preset_values(args.preset, "train-teacher", TeacherConfig),
                                          **_common(args, "off", work / "teacher"), "epochs": 1})
        train_teacher(teacher_config)
        teacher = str(work / "teacher" / "last.pt")
        search_config = SearchConfig(**{**preset_values(args.preset, "search", SearchConfig),
                                        **_common(args, "off", work / "search"), "teacher": teacher,
                                        "steps_per_group": 4, "warmup_steps": 0})
        run_search(search_config)
        aggregation = str(work / "search" / "search.json")
        for path, mode in DATA_PATHS.items():
            if path in args.data_paths:
                print(f"data alone ({path}): {1e3 * data_seconds_per_batch(args, mode):.2f} ms/batch", flush=True)
        for name in args.trainers:
            for compile_mode in args.compile_modes:
                first = "-"
                if compile_mode != "off":  # compile once, outside the timed rows
                    warm = run_trainer(name, "on", compile_mode, args, work / "first", teacher, aggregation)
                    first = f"{warm['total']:.1f}"
                for path in args.data_paths:
                    r = run_trainer(name, DATA_PATHS[path], compile_mode, args, work, teacher, aggregation)
                    rows.append([name, compile_mode, path, str(r["steps"]), f"{r['total']:.1f}", f"{r['in steps']:.1f}",
                                 f"{r['total'] - r['in steps']:.1f}", f"{r['images/s']:.0f}", f"{1e3 * r['step']:.1f}",
                                 f"{r['stalls']:.2f}", f"{r['overhead']:.2f}", first])
                    print(" | ".join(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.preset}, {args.epochs} epoch(s), search {args.search_steps} steps per group; {device}; "
          f"torch {torch.__version__}\n")
    print(markdown_table(["trainer", "compile", "data", "steps", "s total", "s steps", "s other", "img/s", "step ms",
                          "steps / (steps x step)", "total / (steps x step)", "first run s"], rows))


if __name__ == "__main__":
    main()
