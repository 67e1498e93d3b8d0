"""Stage 2: train a student with one distillation method (or a baseline) and the shared loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import models
from ..config import config_dict
from ..data import DataBundle
from ..errors import CheckpointError, ConfigError
from ..margins import empirical_margins, teacher_margins
from ..search.result import file_sha256, load_search_result
from ..training.checkpoint import load_checkpoint
from ..training.loop import FitResult, fit
from ..training.run_options import resolve_device
from ..training.seeding import seed_everything
from ..training.teacher import freeze, load_teacher
from .config import DistillConfig, base_method
from .distillers import Distiller, FeatureDistiller, KDDistiller, VanillaDistiller
from .targets import GroupTarget, group_targets, stage_weights


@dataclass
class DistillRun:
    """What :func:`fit` needs for one distillation run (see :func:`prepare_distill`)."""

    distiller: Distiller
    data: DataBundle
    signature: dict
    extra_state: dict


def run_distill(config: DistillConfig, *, teacher: models.TappedNetwork | None = None,
                data: DataBundle | None = None, on_step: Callable[[int], Any] | None = None) -> FitResult:
    """Trains ``config.student`` with ``config.method``; see :func:`dfa_ext.training.loop.fit` for
    the files written to ``config.out`` (``best.pt`` and ``last.pt`` are student checkpoints that
    ``dfa evaluate`` reads, and that can serve as teachers).

    Args:
        teacher: a trained tapped network to use instead of ``config.teacher`` (Python API).
        data: a dataset bundle to use instead of ``config.data``.
        on_step: called with the global step after each optimiser step.
    """
    run = prepare_distill(config, teacher=teacher, data=data)
    return fit(run.distiller, run.data, config, config.out, kind="distill", signature=run.signature,
               extra_state=run.extra_state, on_step=on_step, settings=run.extra_state["config"])


def prepare_distill(config: DistillConfig, *, teacher: models.TappedNetwork | None = None,
                    data: DataBundle | None = None) -> DistillRun:
    """Builds the distiller of ``config`` (fresh seeded student, frozen teacher, connectors), the
    data, and the run signature and checkpoint extras; :func:`run_distill` then trains it."""
    config.validate()
    if config.method != "vanilla" and teacher is None and not config.teacher:
        raise ConfigError(f"teacher is required by --method {config.method}: the checkpoint written by "
                          "dfa train-teacher")
    with torch.device("meta"):  # a bad student name or argument fails now, before data loading
        models.create(config.student, **config.student_options)
    data = data or config.load(config.seed)
    spec = data.spec
    teacher_info: dict[str, Any] = {}
    if config.method != "vanilla":
        if teacher is None:
            teacher, record = load_teacher(config.teacher, spec, check_data=config.check_teacher_data)
            teacher_info = {"model": record["name"], "sha256": file_sha256(config.teacher)}
        else:
            teacher = freeze(teacher)
            teacher_info = {"model": getattr(teacher, "model_name", type(teacher).__name__), "sha256": ""}
    seed_everything(config.seed)  # the same seed gives every method the same initial student
    student = models.create(config.student, num_classes=spec.num_classes, in_channels=spec.in_channels,
                            **config.student_options)
    record = {"name": config.student, "num_classes": spec.num_classes, "in_channels": spec.in_channels,
              "kwargs": dict(config.student_options)}
    distiller = _make_distiller(config, student, teacher, record, data, teacher_info)
    if config.warm_start and not (Path(config.out) / "last.pt").is_file():  # a resumed run has its own weights
        _warm_start(distiller, config.warm_start, config.student)

    settings = config_dict(config)
    # What must not change when a run resumes: everything that defines its losses and data.
    signature = {key: settings[key] for key in (
        "method", "student", "student_options", "data", "data_options", "augment", "seed", "batch_size",
        "gamma_fd", "stage_weights", "kd_temperature", "kd_weight", "margins", "margin_place")}
    signature.update(teacher=teacher_info,
                     aggregation=distiller.aggregation() if isinstance(distiller, FeatureDistiller) else [])
    return DistillRun(distiller, data, signature,
                      {"config": settings, "data_spec": config_dict(spec), "method": config.method})


def _make_distiller(config: DistillConfig, student: models.TappedNetwork, teacher: nn.Module | None,
                    record: dict, data: DataBundle, teacher_info: dict) -> Distiller:
    if config.method == "vanilla":
        return VanillaDistiller(student, None, record)
    if config.method == "kd":
        return KDDistiller(student, teacher, record, temperature=config.kd_temperature, weight=config.kd_weight)
    spec = data.spec
    method = base_method(config.method)
    input_shape = (spec.in_channels, spec.image_size, spec.image_size)
    pairs = models.pair_networks(teacher, student, input_shape)
    search = None
    if method == "dfa":
        search = load_search_result(config.aggregation, teacher=teacher, input_shape=input_shape)
        if config.check_teacher_data and search.data != config.data:
            raise ConfigError(f"{config.aggregation} was searched on {search.data!r}; this run uses {config.data!r}; "
                              "pass --no-check-teacher-data to use it anyway")
        made_for = search.teacher.get("sha256", "")
        if config.check_teacher_hash and made_for and teacher_info.get("sha256") and made_for != teacher_info["sha256"]:
            raise ConfigError(f"{config.aggregation} was searched with the teacher checkpoint "
                              f"{search.teacher.get('checkpoint') or '?'} (other weights than {config.teacher}); "
                              "pass that teacher, or --no-check-teacher-hash to use it anyway")
    targets = group_targets(method, pairs, search=search, random_std=config.random_std,
                            aggregation_seed=config.aggregation_seed, alpha=config.alpha)
    aggregate_first = config.margin_place == "aggregate"
    return FeatureDistiller(student, teacher, record, pairs=pairs, targets=targets,
                            margins=_margins(config, teacher, data, targets, aggregate_first),
                            weights=stage_weights(len(pairs), config.stage_weights),
                            gamma_fd=config.gamma_fd, kernels=config.kernels, aggregate_first=aggregate_first,
                            kd=(config.kd_temperature, config.kd_weight) if config.method.endswith("+kd") else None)


def _margins(config: DistillConfig, teacher: nn.Module, data: DataBundle, targets: list[GroupTarget],
             aggregate_first: bool) -> list[torch.Tensor]:
    """Per group, [K, C] margins of every teacher layer, or [1, C] of the aggregation (aggregate_first):
    from the BNs (for the aggregation: the alpha-weighted mean of its layers' margins), or measured."""
    spec = data.spec
    input_shape = (spec.in_channels, spec.image_size, spec.image_size)
    if config.margins == "empirical":
        aggregations = [(t.layers, t.beta) for t in targets] if aggregate_first else None
        return empirical_margins(teacher, data.train, aggregations=aggregations, device=resolve_device(config.device))
    margins = teacher_margins(teacher, input_shape)
    if not aggregate_first:
        return margins
    return [(torch.softmax(t.beta.double(), 0)[:, None] * m[list(t.layers)].double()).sum(0, keepdim=True).float()
            for t, m in zip(targets, margins)]


def _warm_start(distiller: Distiller, path: str, student_name: str) -> None:
    """Student weights (and, for feature methods, the ST connectors) from a search checkpoint."""
    state = load_checkpoint(path, kind="search")
    if not isinstance(state.get("student"), dict) or "net" not in state:
        raise CheckpointError(f"warm_start {path} lacks the search's student or connectors")
    saved = state["student"]
    if saved.get("name") != student_name:
        raise ConfigError(f"warm_start {path} holds a {saved.get('name')!r} student; this run trains {student_name!r}")
    try:
        distiller.classifier.load_state_dict(saved["state_dict"])
        if isinstance(distiller, FeatureDistiller):
            prefix = "st_connectors."
            distiller.st_connectors.load_state_dict(
                {k[len(prefix):]: v for k, v in state["net"].items() if k.startswith(prefix)})
    except RuntimeError as error:
        first_line = str(error).splitlines()[0][:300]
        raise CheckpointError(f"warm_start {path} does not fit this student: {first_line}") from None
