"""Stage 1, group by group (paper Algorithm 1): alternate beta steps on search-val and weight
steps on search-train; write the aggregation file, the alpha trajectory and its picture.

Resuming is exact, mid-group included: the data position is a function of the step count, and
the checkpoint holds weights, beta, both optimisers and the trajectory so far.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import models
from ..config import config_dict
from ..data import DataBundle, as_bundle, describe
from ..data.device_batches import data_on_device
from ..data.loader import batch_stream
from ..data.split import split_train_val
from ..data.user_batches import UserBatches
from ..errors import ConfigError
from ..training.checkpoint import (atomic_write_text, check_same_run, load_checkpoint, model_record, save_checkpoint,
                                   structure_fingerprint, weights_fingerprint)
from ..training.distributed import current_context
from ..training.finite import CHECK_EVERY, check_all
from ..training.interrupt import InterruptGuard, TrainingInterrupted, stop_requested
from ..training.networks import network_label, network_record, split_network_option
from ..training.progress import progress_bar, say
from ..training.run_options import resolve_device
from ..training.seeding import preserved_rng, rng_state, seed_everything, set_deterministic, set_rng_state
from ..training.teacher import freeze, load_student, load_teacher
from .config import SearchConfig
from .plot import plot_alpha
from .result import SearchResult, file_sha256, save_search_result
from .session import AggregationSearch

REPORT_EVERY = CHECK_EVERY  # steps between progress-bar / TensorBoard readouts (both read the device)


def run_search(config: SearchConfig, *, teacher: nn.Module | None = None, student: nn.Module | None = None,
               data: DataBundle | Dataset | Sequence[Dataset] | None = None,
               on_step: Callable[[int], Any] | None = None) -> SearchResult:
    """Runs stage 1 and returns (and writes to ``config.out``) the aggregation it found.

    Files: ``search.json`` (input of stage 2), ``alpha_trajectory.csv`` (long format, one row
    per step and layer of the group being searched), ``alpha.png``, ``config.json``, ``last.pt``.
    The caller's RNG states are left as they were.

    Args:
        teacher: a trained network to use instead of ``config.teacher`` (a TappedNetwork, a
            torchvision-style ResNet or a ``HookedNetwork`` around your own model). It is frozen and
            put in eval mode.
        student: the student to search for instead of ``config.student`` (same kinds; may also be
            given as ``config.student``). The search trains a copy: your module stays as it was.
        data: the training images instead of ``config.data``: a ``DataBundle``, or any map-style
            dataset of ``(image [C, H, W], label)`` items (or a ``(train, test)`` pair; the test
            split is not used). The search splits it into search-train and search-val (seeded,
            stratified) and draws the batches itself.
        on_step: called with the global step after each step (tests send interrupts with it).
    """
    _, student = split_network_option(config.student, student, "student")
    if student is not None:  # the module is the student; the config keeps names only (it is written as JSON)
        config = dataclasses.replace(config, student=None)
    config.validate(teacher_given=teacher is not None, student_given=student is not None)
    with preserved_rng():
        return _run_search(config, teacher, student, data, on_step)


def _run_search(config: SearchConfig, teacher: nn.Module | None, student: nn.Module | None,
                data: Any, on_step: Callable[[int], Any] | None) -> SearchResult:
    dist = current_context()
    device = resolve_device(config.device)
    set_deterministic(config.deterministic)
    out = Path(config.out)
    bundle = as_bundle(data) if data is not None else config.load(config.seed)
    if isinstance(bundle.train, UserBatches):
        raise ConfigError("run_search splits its data into search-train and search-val itself: pass the map-style "
                          "dataset (your_loader.dataset), or drive dfa_ext.AggregationSearch with your own batches")
    spec = bundle.spec
    data_record = describe(bundle) if data is not None else {"data": config.data, "augment": config.augment}
    if teacher is None:
        teacher, teacher_record = load_teacher(config.teacher, spec, check_data=config.check_teacher_data)
    else:
        teacher = freeze(models.as_tapped(teacher))
        teacher_record = network_record(teacher, spec.num_classes, spec.in_channels)
    # The weights identify the teacher, from a file or from memory (a file's bytes also hold its timing).
    teacher_identity = weights_fingerprint(teacher)
    seed_everything(config.seed)
    if student is None:
        student = models.create(config.student, num_classes=spec.num_classes, in_channels=spec.in_channels,
                                **config.student_options)
        student_record = network_record(student, spec.num_classes, spec.in_channels, config.student,
                                        config.student_options)
    else:  # the search trains its student and throws it away: the caller's stays fresh for stage 2
        student = copy.deepcopy(models.as_tapped(student))
        student_record = network_record(student, spec.num_classes, spec.in_channels)
    input_shape = (spec.in_channels, spec.image_size, spec.image_size)
    search_train, search_val = split_train_val(bundle.train, config.val_fraction, config.seed)
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the number of processes {dist.world_size}")
    per_rank = config.batch_size // dist.world_size
    search = AggregationSearch(teacher, student, input_shape, config=config, dist=dist,
                               steps_per_epoch=max(len(search_train) // config.batch_size, 1))
    groups, steps_per_group, total_steps = search.groups, search.steps_per_group, search.total_steps
    guards = (search.arch_guard, search.weight_guard)

    settings = {**config_dict(config), **data_record, "student": network_label(student_record),
                "epochs_per_group": None, "steps_per_group": steps_per_group,
                "warmup_steps": search.warmup_steps}  # as resolved
    # What a resumed search must share: another teacher, student or dataset in the same folder is
    # refused, not silently answered with the old search.
    signature = {"teacher": teacher_record["name"] or teacher_record["class"], "teacher_weights": teacher_identity,
                 "student": network_label(student_record), "student_options": student_record["kwargs"],
                 "student_structure": structure_fingerprint(student), "data": data_record["data"],
                 "data_size": len(bundle.train), "seed": config.seed, "batch_size": config.batch_size,
                 "groups": groups, "steps_per_group": steps_per_group, "objective": config.objective,
                 "order": config.order, "warmup_steps": search.warmup_steps, "init_student": config.init_student}
    last_path = out / "last.pt"
    elapsed = 0.0
    if last_path.is_file():
        if not config.resume:
            raise ConfigError(f"{out} already holds a search (last.pt); resume it (drop --no-resume) "
                              f"or choose another output folder")
        state = load_checkpoint(last_path, kind="search")
        check_same_run(state.get("signature", {}), signature, last_path)
        search.load_state_dict(state)
        set_rng_state(state["rng"])
        elapsed = state["seconds"]
        for guard in guards:
            guard.saved = f"{last_path} holds the state after step {search.step_count}"
        if dist.is_main:
            step = search.step_count
            say(f"{out} holds a finished search ({step} steps): not searching again" if search.done else
                f"resuming {last_path}: group {search.group} ({step // steps_per_group + 1}/{len(groups)}), "
                f"step {step}/{total_steps}")
    else:
        if config.init_student:
            load_student(student, config.init_student, student_record["name"], student_record["kwargs"])
        if dist.is_main:
            atomic_write_text(out / "config.json", json.dumps(settings, indent=2) + "\n")

    def checkpoint() -> None:
        check_all(guards)  # a diverged search stops here, before anything is written
        state = search.state_dict()
        search.weight_guard.check_state({k: state[k] for k in ("net", "betas", "weight_optimizer", "architect")},
                                        last_path)
        search.trajectory.flush()
        if dist.is_main:
            save_checkpoint(last_path, {
                "kind": "search", "signature": signature, "config": settings, **state,
                "trajectory": search.trajectory.rows,
                "student": model_record(student, **student_record), "rng": rng_state(),
                "seconds": elapsed + time.perf_counter() - started})
            search.trajectory.write_csv(out / "alpha_trajectory.csv")
        dist.barrier()

    started, first_step = time.perf_counter(), search.step_count
    streams = {name: batch_stream(dataset, per_rank, seed=config.seed + offset, start_step=search.step_count,
                                  num_workers=config.num_workers, rank=dist.rank, world_size=dist.world_size,
                                  pin_memory=device.type == "cuda",
                                  on_device=data_on_device(config.data_on_device, dataset, device))
               for name, dataset, offset in (("train", search_train, 0), ("val", search_val, 1))}
    bar = progress_bar(config.progress and dist.is_main and not search.done, total_steps, search.step_count)
    writer = _tensorboard(out, config.tensorboard, search.step_count) if dist.is_main else None

    def report(step: int, losses: dict[str, torch.Tensor]) -> None:
        """Moves the recorded betas to the trajectory; shows and logs the latest values."""
        rows = search.trajectory.flush()
        if writer is not None:
            for name, value in losses.items():
                writer.add_scalar(f"loss/{name}", float(value.detach()), step)
            for row in rows:
                writer.add_scalar(f"alpha/group{row['group']}/{row['name']}", row["alpha"], row["step"])
        if bar is not None and rows:
            last = [r for r in rows if r["step"] == step]
            lead = max(last, key=lambda r: r["alpha"])
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in losses.items()}
                            | {"lead": f"{lead['name']} {lead['alpha']:.3f}"})
    with InterruptGuard() as guard:
        while not search.done:
            group = search.group
            losses = search.step(next(streams["train"]), next(streams["val"]))
            step = search.step_count
            if step % CHECK_EVERY == 0:
                check_all(guards)
            if bar is not None:
                bar.set_description(f"group {groups.index(group) + 1}/{len(groups)}")
                bar.update(1)
            if step % REPORT_EVERY == 0 or step % steps_per_group == 0:  # reading values syncs a GPU
                report(step, losses)
            if on_step is not None:
                on_step(step)
            if stop_requested(guard, dist, step):
                checkpoint()
                raise TrainingInterrupted(str(last_path))
            if step % steps_per_group == 0 or (config.checkpoint_every and step % config.checkpoint_every == 0):
                checkpoint()
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    seconds = elapsed + (time.perf_counter() - started if search.step_count > first_step else 0.0)
    teacher_info = {"model": network_label(teacher_record), "num_classes": teacher_record["num_classes"],
                    "in_channels": teacher_record["in_channels"], "kwargs": teacher_record["kwargs"],
                    "checkpoint": str(config.teacher or ""), "sha256": file_sha256(config.teacher) if config.teacher else ""}
    result = search.result(teacher=teacher_info, student=network_label(student_record), data=data_record["data"],
                           settings=settings, seconds=seconds)
    if dist.is_main:
        save_search_result(out / "search.json", result)
        plot_alpha(result, search.trajectory.rows, out / "alpha.png")
    return result


def _tensorboard(out: Path, wanted: bool | None, step: int):
    """Per-step losses and alpha for TensorBoard (``wanted`` None: when installed)."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if wanted:
            raise
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step)
