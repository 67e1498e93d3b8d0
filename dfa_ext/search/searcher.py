"""Stage 1, group by group (paper Algorithm 1): alternate beta steps on search-val and weight
steps on search-train; write the aggregation file, the alpha trajectory and its picture.

Resuming is exact, mid-group included: the data position is a function of the step count, and
the checkpoint holds weights, beta, both optimisers and the trajectory so far.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import models
from ..config import config_dict
from ..data import DataBundle
from ..data.device_batches import data_on_device
from ..data.loader import batch_stream
from ..data.split import split_train_val
from ..errors import ConfigError
from ..margins import teacher_margins
from ..training.checkpoint import (atomic_write_text, check_same_run, load_checkpoint, model_record, save_checkpoint)
from ..training.distributed import current_context, wrap_ddp
from ..training.finite import CHECK_EVERY, SEARCH_HINT, FiniteGuard, check_all
from ..training.interrupt import InterruptGuard, TrainingInterrupted, stop_requested
from ..training.optim_step import optimizer_step
from ..training.progress import progress_bar, say
from ..training.run_options import autocast_for, resolve_device
from ..training.schedule import LrSchedule
from ..training.seeding import rng_state, seed_everything, set_deterministic, set_rng_state
from ..training.teacher import freeze, load_student, load_teacher
from .architect import Architect, Batch
from .config import SearchConfig
from .network import SearchNetwork, teacher_features
from .plot import plot_alpha
from .result import SearchResult, file_sha256, save_search_result
from .trajectory import AlphaTrajectory

REPORT_EVERY = CHECK_EVERY  # steps between progress-bar / TensorBoard readouts (both read the device)


def run_search(config: SearchConfig, *, teacher: models.TappedNetwork | None = None,
               data: DataBundle | None = None, on_step: Callable[[int], Any] | None = None) -> SearchResult:
    """Runs stage 1 and returns (and writes to ``config.out``) the aggregation it found.

    Files: ``search.json`` (input of stage 2), ``alpha_trajectory.csv`` (long format, one row
    per step and layer of the group being searched), ``alpha.png``, ``config.json``, ``last.pt``.

    Args:
        teacher: a trained tapped network to use instead of ``config.teacher`` (Python API; e.g.
            a ``HookedNetwork`` around your own model). It is frozen and put in eval mode.
        data: a dataset bundle to use instead of ``config.data``.
        on_step: called with the global step after each step (tests send interrupts with it).
    """
    config.validate(teacher_given=teacher is not None)
    dist = current_context()
    device = resolve_device(config.device)
    set_deterministic(config.deterministic)
    out = Path(config.out)
    data = data or config.load(config.seed)
    spec = data.spec
    if teacher is None:
        teacher, teacher_record = load_teacher(config.teacher, spec, check_data=config.check_teacher_data)
    else:
        teacher_record = {"name": getattr(teacher, "model_name", type(teacher).__name__),
                          "num_classes": spec.num_classes, "in_channels": spec.in_channels, "kwargs": {}}
        teacher = freeze(teacher)
    seed_everything(config.seed)
    student = models.create(config.student, num_classes=spec.num_classes, in_channels=spec.in_channels,
                            **config.student_options)
    input_shape = (spec.in_channels, spec.image_size, spec.image_size)
    pairs = models.pair_networks(teacher, student, input_shape)
    groups = list(config.groups) or list(range(len(pairs)))
    if any(not 0 <= g < len(pairs) for g in groups) or len(set(groups)) != len(groups):
        raise ConfigError(f"groups must be distinct indices in 0..{len(pairs) - 1}, got {list(config.groups)}")
    margins = teacher_margins(teacher, input_shape) if config.objective == "distill" or config.ts_margins else None
    net = SearchNetwork(student, pairs, kernels=config.kernels, objective=config.objective, gamma_st=config.gamma_st,
                        gamma_ts=config.gamma_ts, gamma_fd=config.gamma_fd, margins=margins,
                        ts_margins=config.ts_margins)
    betas = nn.ParameterList(nn.Parameter(config.beta_init_std * torch.randn(p.num_layers)) for p in pairs)
    memory_format = config.memory_format_for(net, device)
    # Same layout as the student: the TS path feeds teacher features into the student's later
    # groups, and a channels_last input would put the student's convolutions back in channels_last.
    teacher.to(device, memory_format=memory_format)
    net.to(device, memory_format=memory_format)
    betas.to(device)

    autocast = autocast_for(config.amp, device)
    search_train, search_val = split_train_val(data.train, config.val_fraction, config.seed)
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the number of processes {dist.world_size}")
    per_rank = config.batch_size // dist.world_size
    steps_per_epoch = max(len(search_train) // config.batch_size, 1)
    steps_per_group, warmup_steps = config.group_steps(steps_per_epoch)
    total_steps = steps_per_group * len(groups)

    weight_optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                       weight_decay=config.weight_decay)
    schedule = LrSchedule(config.lr - config.lr_min, total_steps, "cosine")  # + lr_min below
    architect = Architect(net, betas, lr=config.arch_lr, adam_betas=config.arch_betas,
                          weight_decay=config.arch_weight_decay, second_order=config.order == "second",
                          fd_radius=config.fd_radius, grad_clip=config.arch_grad_clip, autocast=autocast,
                          dist=dist)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    # Two guards: beta and the weights are two updates each step, dropped separately in skip mode;
    # only the weights' step goes through the gradient scaler.
    arch_guard = FiniteGuard(config.on_nonfinite, config.max_consecutive_skips, device, dist=dist, hint=SEARCH_HINT)
    weight_guard = FiniteGuard(config.on_nonfinite, config.max_consecutive_skips, device,
                               loss_scaling=scaler.is_enabled(), dist=dist, hint=SEARCH_HINT)
    # Only one group's connectors take part in a step, hence find_unused_parameters.
    ddp_net = wrap_ddp(net, device, dist, sync_bn=config.sync_bn, find_unused_parameters=True)
    # --compile: the weight step (one graph per group); the architecture step, which perturbs the
    # weights in place (second order) and differentiates through beta, stays eager.
    weight_step_net = config.compiled(ddp_net)

    settings = {**config_dict(config), "epochs_per_group": None, "steps_per_group": steps_per_group,
                "warmup_steps": warmup_steps}  # as resolved
    signature = {"teacher": teacher_record["name"], "student": config.student, "data": config.data,
                 "seed": config.seed, "batch_size": config.batch_size, "groups": groups,
                 "steps_per_group": steps_per_group, "objective": config.objective, "order": config.order,
                 "warmup_steps": warmup_steps, "init_student": config.init_student}
    last_path = out / "last.pt"
    layer_names = [p.teacher_layer_names for p in pairs]
    step, trajectory, elapsed = 0, AlphaTrajectory(layer_names), 0.0
    if last_path.is_file():
        if not config.resume:
            raise ConfigError(f"{out} already holds a search (last.pt); resume it (drop --no-resume) "
                              f"or choose another output folder")
        state = load_checkpoint(last_path, kind="search")
        check_same_run(state.get("signature", {}), signature, last_path)
        net.load_state_dict(state["net"])
        with torch.no_grad():
            for beta, saved in zip(betas, state["betas"], strict=True):
                beta.copy_(saved)
        weight_optimizer.load_state_dict(state["weight_optimizer"])
        architect.load_state_dict(state["architect"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, trajectory, elapsed = state["step"], AlphaTrajectory(layer_names, state["trajectory"]), state["seconds"]
        for guard, saved in zip((arch_guard, weight_guard), state.get("nonfinite", ({}, {}))):
            guard.load_state_dict(saved)
            guard.saved = f"{last_path} holds the state after step {step}"
        if dist.is_main:
            say(f"{out} holds a finished search ({step} steps): not searching again" if step >= total_steps else
                f"resuming {last_path}: group {groups[step // steps_per_group]} "
                f"({step // steps_per_group + 1}/{len(groups)}), step {step}/{total_steps}")
    else:
        if config.init_student:
            load_student(student, config.init_student, config.student, config.student_options)
        if dist.is_main:
            atomic_write_text(out / "config.json", json.dumps(settings, indent=2) + "\n")

    def checkpoint() -> None:
        check_all((arch_guard, weight_guard))  # a diverged search stops here, before anything is written
        weight_guard.check_state({"net": net.state_dict(), "betas": list(betas),
                             "weight_optimizer": weight_optimizer.state_dict(),
                             "architect": architect.state_dict()}, last_path)
        trajectory.flush()
        if dist.is_main:
            save_checkpoint(last_path, {
                "kind": "search", "signature": signature, "config": settings,
                "net": net.state_dict(), "betas": [b.detach().cpu().clone() for b in betas],
                "student": model_record(student, config.student, spec.num_classes, spec.in_channels,
                                        config.student_options),
                "weight_optimizer": weight_optimizer.state_dict(), "architect": architect.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state(), "step": step,
                "trajectory": trajectory.rows, "nonfinite": [g.state_dict() for g in (arch_guard, weight_guard)],
                "seconds": elapsed + time.perf_counter() - started})
            trajectory.write_csv(out / "alpha_trajectory.csv")
        dist.barrier()

    started, first_step = time.perf_counter(), step
    streams = {name: batch_stream(dataset, per_rank, seed=config.seed + offset, start_step=step,
                                  num_workers=config.num_workers, rank=dist.rank, world_size=dist.world_size,
                                  pin_memory=device.type == "cuda",
                                  on_device=data_on_device(config.data_on_device, dataset, device))
               for name, dataset, offset in (("train", search_train, 0), ("val", search_val, 1))}
    bar = progress_bar(config.progress and dist.is_main and step < total_steps, total_steps, step)

    def batch(stream, group: int) -> Batch:
        images, labels = next(stream)
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            features = teacher_features(teacher, images)
        return Batch(images, labels, {group: features[group]})  # the other groups' maps are freed now

    writer = _tensorboard(out, config.tensorboard, step) if dist.is_main else None

    def report(step: int, losses: dict[str, torch.Tensor]) -> None:
        """Moves the recorded betas to the trajectory; shows and logs the latest values."""
        rows = trajectory.flush()
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
        while step < total_steps:
            group = groups[step // steps_per_group]
            for param_group in weight_optimizer.param_groups:  # cosine from lr to lr_min
                param_group["lr"] = config.lr_min + schedule(step)
            train, val = batch(streams["train"], group), batch(streams["val"], group)
            net.train()
            if step % steps_per_group >= warmup_steps:  # warm-up: the weights learn, beta waits
                architect.step(group, train, val, weight_optimizer,
                               allow=lambda grad: arch_guard.observe(step + 1, config.arch_lr, {
                                   "beta gradient": grad, "beta": betas[group]}))
            with autocast:
                _, losses = weight_step_net(train.images, train.labels, train.teacher[group], betas[group].detach(),
                                    group, True)
            lr = weight_optimizer.param_groups[0]["lr"]
            optimizer_step(sum(losses.values()), weight_optimizer, scaler, net.parameters(), config.grad_clip,
                           lambda norm: weight_guard.observe(step + 1, lr, {**losses, "gradient norm": norm}))
            step += 1
            if step % CHECK_EVERY == 0:
                check_all((arch_guard, weight_guard))
            trajectory.record(step, group, betas[group])
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
    seconds = elapsed + (time.perf_counter() - started if step > first_step else 0.0)
    teacher_info = {"model": teacher_record["name"], "num_classes": teacher_record["num_classes"],
                    "in_channels": teacher_record["in_channels"], "kwargs": teacher_record["kwargs"],
                    "checkpoint": str(config.teacher or ""),
                    "sha256": file_sha256(config.teacher) if config.teacher else ""}
    result = SearchResult.from_betas([b.detach().cpu() for b in betas], layer_names,
                                     [i in groups for i in range(len(pairs))], teacher=teacher_info,
                                     student=config.student, data=config.data, settings=settings,
                                     seconds=seconds)
    if dist.is_main:
        save_search_result(out / "search.json", result)
        plot_alpha(result, trajectory.rows, out / "alpha.png")
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
