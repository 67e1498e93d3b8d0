"""The epoch loop every trainer shares: optimise, evaluate, log, checkpoint, resume.

A trainer supplies a :class:`TrainingTask` (which modules learn and the named losses of a batch)
and a :class:`LoopConfig`; :func:`fit` does the rest. Resuming is exact: the data order and
augmentation are functions of (seed, epoch, index), the learning rate a function of the step,
and the checkpoint holds the weights, optimiser, scaler and RNG state at a step boundary, so an
interrupted and resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import option
from ..data import DataBundle
from ..data.device_batches import data_on_device
from ..data.loader import make_loader
from ..data.user_batches import UserBatches
from ..errors import ConfigError
from .checkpoint import atomic_write_text, check_same_run, load_checkpoint, save_checkpoint
from .distributed import DistContext, current_context, wrap_ddp
from .evaluate import correct_at_k, evaluate
from .finite import CHECK_EVERY, FiniteGuard
from .interrupt import InterruptGuard, TrainingInterrupted, stop_requested
from .metrics_log import MetricsLog
from .optim_step import optimizer_step
from .progress import progress_bar, report, say
from .schedule import SCHEDULES, LrSchedule, make_sgd
from .run_options import RunOptions, autocast_for, resolve_device
from .seeding import rng_state, set_deterministic, set_rng_state


@dataclass
class LoopConfig(RunOptions):
    """Options of the epoch loop (shared by the teacher and distillation trainers)."""

    epochs: int = option(30, "training epochs")
    batch_size: int = option(128, "global batch size (split evenly over processes)")
    lr: float = option(0.1, "peak learning rate of SGD")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay on every parameter")
    schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    milestones: tuple[float, ...] = option((0.5, 0.75), "step schedule: fractions of the run where lr is multiplied by lr_gamma")
    lr_gamma: float = option(0.1, "step schedule: lr factor at each milestone")
    warmup_epochs: float = option(0.0, "linear lr warm-up, in epochs")
    grad_clip: float | None = option(None, "clip the gradient norm to this value (off when unset)")
    eval_batch_size: int = option(512, "batch size of evaluation")
    eval_every: int = option(1, "evaluate on the test split every N epochs (and after the last one)")

    def validate(self) -> None:
        super().validate()
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_epochs", "momentum"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


class TrainingTask(nn.Module):
    """What :func:`fit` trains.

    Subclasses set ``classifier`` (the network evaluated on the test set), implement
    :meth:`forward` and say which parameters learn and what a checkpoint keeps.
    """

    classifier: nn.Module

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the classifier's logits [B, classes] and the named scalar losses (summed to train)."""
        raise NotImplementedError

    # Whether some trainable parameters may get no gradient in a step (DDP must then look for them).
    has_unused_parameters: bool = False

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def set_epoch(self, epoch: int) -> None:
        """Called by :func:`fit` before the batches of each epoch (0-based; again on resume), for a
        loss that changes with the epoch (DKD's warm-up). Keep what it sets in a tensor buffer, not
        a Python number: a compiled step would recompile for every new value."""

    def frozen_modules(self) -> Iterable[nn.Module]:
        """Modules that never learn (a teacher): they keep the preferred layout even when the
        trainable ones cannot use it (see ``RunOptions.memory_format_for``)."""
        return ()

    def export_state(self) -> dict:
        """What a checkpoint keeps (at least ``"model"``, a record for ``model_from_checkpoint``)."""
        raise NotImplementedError

    def import_state(self, state: dict) -> None:
        raise NotImplementedError


@dataclass
class FitResult:
    best_top1: float
    last_top1: float
    last_top5: float
    epochs: int
    seconds: float
    out_dir: Path

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"


POSTFIX_EVERY = CHECK_EVERY  # steps between progress-bar loss readouts (both read the device)


class EpochSums:
    """Running sums of one epoch's training metrics, kept on the device.

    Accumulating tensors (not Python floats) avoids a host synchronisation per step on a GPU;
    the sums are read once per checkpoint and at the epoch's end. Keys: ``samples``,
    ``correct`` (top-1) and one per loss (loss times batch size).
    """

    def __init__(self, device: torch.device, saved: dict | None = None) -> None:
        self.device = device
        self.values: dict[str, torch.Tensor] = {}
        for key, value in (saved or {"samples": 0.0, "correct": 0.0}).items():
            self.values[key] = torch.tensor(value, dtype=torch.float64, device=device)

    def add(self, labels: torch.Tensor, logits: torch.Tensor, losses: dict[str, torch.Tensor],
            finite: torch.Tensor) -> None:
        """Adds a step's batch unless ``finite`` (a 0-dim bool on the device, the divergence guard's
        verdict on the step) is False: the gradient scaler dropped that step's update under fp16."""
        finite = finite.double()
        count = labels.numel() * finite
        self.values["samples"] += count
        self.values["correct"] += correct_at_k(logits.detach(), labels, 1) * finite
        for name, value in losses.items():
            total = torch.where(finite > 0, value.detach().double(), 0.0) * count
            if name in self.values:
                self.values[name] += total
            else:
                self.values[name] = total

    def as_dict(self) -> dict[str, float]:
        """Python floats (one synchronisation), as checkpoints store them."""
        keys = list(self.values)
        return dict(zip(keys, torch.stack([self.values[k] for k in keys]).tolist()))

    def of_every_process(self, dist: DistContext) -> list[dict[str, float]]:
        """Every process's :meth:`as_dict`, in rank order (a collective; exact: each row is one
        process's sums, to which the others add zeros). Checkpoints keep them all: each process
        has counted its own share of the epoch's batches."""
        local = self.as_dict()
        table = torch.zeros(dist.world_size, len(local), dtype=torch.float64)
        table[dist.rank] = torch.tensor(list(local.values()), dtype=torch.float64)
        return [dict(zip(local, row)) for row in dist.all_reduce_sum(table).tolist()]

    @staticmethod
    def share(saved: list[dict[str, float]] | dict[str, float] | None, dist: DistContext) -> dict[str, float] | None:
        """This process's part of the sums a checkpoint kept (:meth:`of_every_process`; a dict is
        one process's): its own under as many processes as saved them, else all of them on the
        main process and zeros elsewhere, so that the epoch's totals count every batch once."""
        if saved is None:
            return None
        every = [saved] if isinstance(saved, dict) else saved
        if len(every) == dist.world_size:
            return every[dist.rank]
        return {key: sum(s[key] for s in every) if dist.is_main else 0.0 for key in every[0]}


def fit(task: TrainingTask, data: DataBundle, config: LoopConfig, out_dir: str | Path, *,
        kind: str, signature: dict, extra_state: dict | None = None,
        on_step: Callable[[int], Any] | None = None, dist: DistContext | None = None,
        settings: dict | None = None) -> FitResult:
    """Trains ``task`` on ``data.train``, evaluating on ``data.test`` every ``config.eval_every``
    epochs and after the last.

    Files in ``out_dir`` (written by the main process only, atomically):
    ``last.pt`` (full state, resumable; also usable as a model checkpoint), ``best.pt`` (weights
    of the best test top-1), ``metrics.csv`` (one row per epoch), ``tensorboard/``.

    Args:
        kind: checkpoint kind ("teacher", "distill", ...).
        signature: what identifies the run (model, data, seed, ...); resuming a run with a
            different signature is refused.
        extra_state: more entries for every checkpoint (e.g. the run configuration).
        on_step: called with the global step after each optimiser step (tests use it to send
            an interrupt).
        settings: the run configuration, written to ``config.json`` once the run is known to be
            new or the same as the one in ``out_dir`` (a refused run overwrites nothing).
    Raises:
        TrainingInterrupted: after SIGINT/SIGTERM, once the checkpoint is saved.
    """
    LoopConfig.validate(config)  # the loop's own options; the trainer has checked the rest (e.g. a module student)
    dist = dist or current_context()
    out = Path(out_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    device = resolve_device(config.device)
    set_deterministic(config.deterministic)
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the number of processes {dist.world_size}")
    per_rank_batch = config.batch_size // dist.world_size
    autocast = autocast_for(config.amp, device)

    memory_format = config.memory_format_for(task, device)
    task.to(device, memory_format=memory_format)
    for frozen in task.frozen_modules():
        frozen.to(memory_format=config.memory_format)
    model = wrap_ddp(task, device, dist, sync_bn=config.sync_bn,
                     find_unused_parameters=task.has_unused_parameters)
    step_model = config.compiled(model)  # what the steps run; checkpoints keep reading ``task``
    optimizer = make_sgd(task.trainable_parameters(), lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    nonfinite = FiniteGuard(config.on_nonfinite, config.max_consecutive_skips, device,
                            loss_scaling=scaler.is_enabled(), dist=dist)
    # The user's own DataLoader (their sampler, transforms and batch size), or the package's loading.
    user_batches = data.train if isinstance(data.train, UserBatches) else None
    steps_per_epoch = len(user_batches) if user_batches is not None else len(make_loader(
        data.train, per_rank_batch, train=True, seed=config.seed, rank=dist.rank, world_size=dist.world_size))
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set ({len(data.train)} samples) is smaller than one batch ({config.batch_size})")
    train_images = data_on_device(config.data_on_device, data.train, device)
    test_images = data_on_device(config.data_on_device, data.test, device)
    schedule = LrSchedule(config.lr, steps_per_epoch * config.epochs, config.schedule, config.milestones,
                          config.lr_gamma, round(config.warmup_epochs * steps_per_epoch))

    epoch, start_batch, step, best_top1, sums, elapsed = 0, 0, 0, -math.inf, None, 0.0
    if last_path.is_file():
        if not config.resume:
            raise ConfigError(f"{out} already holds a run (last.pt); resume it (drop --no-resume) "
                              f"or choose another output folder")
        state = load_checkpoint(last_path, kind=kind)
        check_same_run(state.get("signature", {}), signature, last_path)
        task.import_state(state)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        nonfinite.load_state_dict(state.get("nonfinite"))
        epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        best_top1, elapsed = state["best_top1"], state.get("seconds", 0.0)
        sums = EpochSums.share(state.get("epoch_sums"), dist)
        nonfinite.saved = f"{last_path} holds the state after step {step}"
        if dist.is_main:
            say(f"{out} holds a finished run ({epoch} epochs, {step} steps, best test top-1 {best_top1:.2f}%): "
                "not training it again" if epoch >= config.epochs else
                f"resuming {last_path}: epoch {epoch + 1}/{config.epochs}, step {step}")
    if settings is not None and dist.is_main:
        atomic_write_text(out / "config.json", json.dumps(settings, indent=2) + "\n")

    def verify(path: Path) -> None:
        """Stops a diverged run before ``path`` is written or the weights are evaluated."""
        nonfinite.check()
        nonfinite.check_state({"weights": task.state_dict(), "optimizer": optimizer.state_dict()}, path)

    saved_seconds = elapsed  # the training time last.pt holds: what the result reports, run now or earlier

    def checkpoint(next_epoch: int, next_batch: int, epoch_sums: list[dict] | None) -> None:
        nonlocal saved_seconds
        verify(last_path)
        saved_seconds = seconds()
        if dist.is_main:
            save_checkpoint(last_path, {
                "kind": kind, "signature": signature, **(extra_state or {}), **task.export_state(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "epoch": next_epoch, "batch": next_batch, "step": step, "best_top1": best_top1,
                "epoch_sums": epoch_sums, "nonfinite": nonfinite.state_dict(), "seconds": saved_seconds})
        nonfinite.saved = f"{last_path} holds the state after step {step}"
        dist.barrier()

    log = MetricsLog(out, start_epoch=epoch, tensorboard=config.tensorboard, enabled=dist.is_main)
    started, first_step = time.perf_counter(), step

    def seconds() -> float:
        """Training time of the whole run, earlier sessions included (not a finished run's re-check)."""
        return elapsed + (time.perf_counter() - started if step > first_step else 0.0)

    last_metrics = {"top1": math.nan, "top5": math.nan}
    try:
        with InterruptGuard() as guard:
            while epoch < config.epochs:
                loader = user_batches.epoch(epoch, start_batch) if user_batches is not None else make_loader(
                    data.train, per_rank_batch, train=True, seed=config.seed, epoch=epoch, start_batch=start_batch,
                    num_workers=config.num_workers, on_device=train_images, rank=dist.rank,
                    world_size=dist.world_size, pin_memory=device.type == "cuda")
                sums = EpochSums(device, sums)
                task.set_epoch(epoch)
                task.train()
                bar = progress_bar(config.progress and dist.is_main, steps_per_epoch, start_batch,
                                   f"epoch {epoch + 1}/{config.epochs}", fraction=None)  # + the epoch's line
                batch, lr = start_batch, optimizer.param_groups[0]["lr"]
                for images, labels in loader:
                    lr = schedule.apply(optimizer, step)
                    images = images.to(device, non_blocking=True, memory_format=memory_format)
                    labels = labels.to(device, non_blocking=True)
                    with autocast:
                        logits, losses = step_model(images, labels)
                    loss = sum(losses.values())
                    applied = optimizer_step(loss, optimizer, scaler, task.trainable_parameters(), config.grad_clip,
                                             lambda norm: nonfinite.observe(step + 1, lr, {**losses, "gradient norm": norm}))
                    step, batch = step + 1, batch + 1
                    if applied:
                        sums.add(labels, logits, losses, nonfinite.step_ok)
                    if step % CHECK_EVERY == 0:
                        nonfinite.check()
                    if bar is not None:
                        bar.update(1)
                        if batch % POSTFIX_EVERY == 0:  # reading the loss syncs a GPU: not every step
                            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.4g}")
                    if on_step is not None:
                        on_step(step)
                    if stop_requested(guard, dist, step):
                        checkpoint(epoch, batch, sums.of_every_process(dist))
                        raise TrainingInterrupted(str(last_path))
                    if config.checkpoint_every and step % config.checkpoint_every == 0:
                        checkpoint(epoch, batch, sums.of_every_process(dist))
                if bar is not None:
                    bar.close()
                verify(last_path)  # before the epoch's numbers, its evaluation and its checkpoints
                local = sums.as_dict()
                totals = dict(zip(local, dist.all_reduce_sum(torch.tensor(list(local.values()))).tolist()))
                samples = max(totals.pop("samples"), 1.0)
                train = {f"train_{k}": v / samples for k, v in totals.items() if k != "correct"}
                train["train_top1"] = 100.0 * totals["correct"] / samples
                epoch, start_batch, sums = epoch + 1, 0, None
                if epoch % config.eval_every == 0 or epoch == config.epochs:
                    test = evaluate(task.classifier, data.test, batch_size=config.eval_batch_size,
                                    device=device, autocast=autocast, dist=dist, memory_format=memory_format,
                                on_device=test_images)
                    last_metrics = test
                    improved = test["top1"] > best_top1
                    best_top1 = max(best_top1, test["top1"])
                else:  # not evaluated: empty test columns in metrics.csv
                    test, improved = {"loss": math.nan, "top1": math.nan, "top5": math.nan}, False
                metrics = {**train, **{f"test_{k}": v for k, v in test.items()}, "lr": lr,
                           "seconds": seconds()}
                if nonfinite.mode == "skip" or nonfinite.loss_scaling:  # steps so far whose update was dropped
                    metrics["skipped_steps"] = float(nonfinite.skipped)
                if improved and dist.is_main:
                    save_checkpoint(best_path, {"kind": kind, "signature": signature, **(extra_state or {}),
                                                **task.export_state(), "epoch": epoch, "metrics": metrics})
                checkpoint(epoch, 0, None)
                log.log(epoch - 1, metrics)
                if dist.is_main:
                    tested = (f"test loss {test['loss']:.4f} top1 {test['top1']:.2f}% top5 {test['top5']:.2f}% | "
                              f"best {best_top1:.2f}%" if not math.isnan(test["top1"]) else "not evaluated")
                    report(f"epoch {epoch}/{config.epochs}: train loss {sum(train[k] for k in train if k != 'train_top1'):.4f} "
                           f"top1 {train['train_top1']:.2f}% | {tested}", config.progress)
    finally:
        log.close()
    if math.isnan(last_metrics["top1"]):  # the run was already complete: report its saved numbers
        last_metrics = evaluate(task.classifier, data.test, batch_size=config.eval_batch_size,
                                device=device, autocast=autocast, dist=dist, memory_format=memory_format,
                                on_device=test_images)
    # The seconds of the final checkpoint, not of this moment: a finished run re-checked later
    # reports the same number (and the demo reprints the same table).
    return FitResult(best_top1, last_metrics["top1"], last_metrics["top5"], epoch, saved_seconds, out)
