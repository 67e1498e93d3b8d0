"""Stage 2: train a student with one distillation method (or a baseline) and the shared loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import models
from ..config import config_dict
from ..data import DataBundle, as_bundle, describe
from ..data.user_batches import UserBatches
from ..errors import CheckpointError, ConfigError
from ..margins import empirical_margins, teacher_margins
from ..search.result import SearchResult, check_teacher, file_sha256, load_search_result
from ..training.checkpoint import load_checkpoint, structure_fingerprint, weights_fingerprint
from ..training.loop import FitResult, fit
from ..training.networks import network_label, network_record, split_network_option
from ..training.run_options import resolve_device
from ..training.seeding import preserved_rng, seed_everything
from ..training.teacher import freeze, load_teacher
from .config import PAIR_METHODS, DistillConfig, base_method, method_options
from .distillers import (ATDistiller, Distiller, DKDDistiller, FeatureDistiller, FitNetDistiller, KDDistiller,
                         SPDistiller, VanillaDistiller)
from .loss import aggregate_margins
from .pair_losses import group_weights
from .targets import GroupTarget, group_targets, stage_weights


@dataclass
class DistillRun:
    """What :func:`fit` needs for one distillation run (see :func:`prepare_distill`)."""

    distiller: Distiller
    data: DataBundle
    signature: dict
    extra_state: dict


def run_distill(config: DistillConfig, *, teacher: nn.Module | None = None, student: nn.Module | None = None,
                data: DataBundle | Sequence[Dataset] | None = None,
                on_step: Callable[[int], Any] | None = None) -> FitResult:
    """Trains the student with ``config.method``; see :func:`dfa_ext.training.loop.fit` for the files
    written to ``config.out`` (``best.pt`` and ``last.pt`` are student checkpoints that ``dfa evaluate``
    reads, and that can serve as teachers). The caller's RNG states are left as they were.

    Args:
        teacher: a trained network to use instead of ``config.teacher`` (a TappedNetwork, a
            torchvision-style ResNet or a ``HookedNetwork`` around your own model; frozen here).
        student: the network to train instead of ``config.student`` (same kinds; may also be given
            as ``config.student``). It is trained in place and ends with the last epoch's weights;
            checkpoints can rebuild it when ``dfa_ext.models.create`` built it (a zoo name or
            "pkg.module:factory"), else they hold its weights for you to load.
        data: a ``DataBundle``, or ``(train_dataset, test_dataset)``: map-style datasets of
            ``(image [C, H, W], label)`` items, used as they are (your transforms, your
            normalisation; the package draws the batches and their order from the seed).
        on_step: called with the global step after each optimiser step.
    """
    _, student = split_network_option(config.student, student, "student")
    if student is not None:  # the module is the student; the config keeps names only (it is written as JSON)
        config = dataclasses.replace(config, student=None)
    with preserved_rng():
        run = prepare_distill(config, teacher=teacher, student=student, data=data)
        return fit(run.distiller, run.data, config, config.out, kind="distill", signature=run.signature,
                   extra_state=run.extra_state, on_step=on_step, settings=run.extra_state["config"])


def prepare_distill(config: DistillConfig, *, teacher: nn.Module | None = None, student: nn.Module | None = None,
                    data: DataBundle | Sequence[Dataset] | None = None) -> DistillRun:
    """Builds the distiller of ``config`` (the student, seeded; the frozen teacher; connectors), the
    data, and the run signature and checkpoint extras; :func:`run_distill` then trains it. Seeds the
    global RNGs with ``config.seed`` (as the training that follows needs)."""
    _, student = split_network_option(config.student, student, "student")
    config.validate(student_given=student is not None)
    if config.method != "vanilla" and teacher is None and not config.teacher:
        raise ConfigError(f"teacher is required by --method {config.method}: the checkpoint written by "
                          "dfa train-teacher")
    if student is None and not models.is_import_path(config.student):  # a user's factory may load files
        with torch.device("meta"):  # a bad student name or argument fails now, before data loading
            models.create(config.student, **config.student_options)
    bundle = as_bundle(data, require_test=True) if data is not None else config.load(config.seed)
    spec = bundle.spec
    data_record = describe(bundle) if data is not None else {"data": config.data, "augment": config.augment}
    teacher_info: dict[str, Any] = {}
    if config.method != "vanilla":
        if teacher is None:
            teacher, record = load_teacher(config.teacher, spec, check_data=config.check_teacher_data)
            teacher_info = {"model": network_label(record), "sha256": file_sha256(config.teacher)}
        else:
            teacher = freeze(models.as_tapped(teacher))
            teacher_info = {"model": network_label(network_record(teacher, spec.num_classes, spec.in_channels)),
                            "sha256": ""}
        # The weights identify the teacher, from a file or from memory: a resumed run must have the same one.
        teacher_info["weights"] = weights_fingerprint(teacher)
    seed_everything(config.seed)  # the same seed gives every method the same initial student
    if student is None:
        student = models.create(config.student, num_classes=spec.num_classes, in_channels=spec.in_channels,
                                **config.student_options)
        record = network_record(student, spec.num_classes, spec.in_channels, config.student, config.student_options)
    else:
        student = models.as_tapped(student)
        record = network_record(student, spec.num_classes, spec.in_channels)
    distiller = _make_distiller(config, student, teacher, record, bundle, teacher_info, data_record)
    if config.warm_start and not (Path(config.out) / "last.pt").is_file():  # a resumed run has its own weights
        _warm_start(distiller, config.warm_start, record["name"])

    settings = {**config_dict(dataclasses.replace(config, aggregation=_aggregation_label(config.aggregation))),
                **data_record, "student": network_label(record)}
    # What must not change when a run resumes: everything that defines its losses and data.
    signature = {key: settings[key] for key in (
        "method", "student", "student_options", "data", "data_options", "augment", "seed", "batch_size",
        "gamma_fd", "stage_weights", "kd_temperature", "kd_weight", "margins", "margin_place")}
    # Only the methods that read options of their own sign them, so runs of the others, older
    # runs included, keep the signature they had.
    signature.update(method_options(config))
    signature.update(teacher=teacher_info, student_structure=structure_fingerprint(student),
                     data_size=len(bundle.train),
                     aggregation=distiller.aggregation() if isinstance(distiller, FeatureDistiller) else [])
    return DistillRun(distiller, bundle, signature,
                      {"config": settings, "data_spec": config_dict(spec), "method": config.method})


def _aggregation_label(aggregation: str | SearchResult | None) -> str | None:
    """What config.json says of the aggregation: its file, or that it was given in Python (its betas
    are in the run signature either way)."""
    return "the SearchResult given in Python" if isinstance(aggregation, SearchResult) else aggregation


def _make_distiller(config: DistillConfig, student: models.TappedNetwork, teacher: nn.Module | None,
                    record: dict, data: DataBundle, teacher_info: dict, data_record: dict | None = None) -> Distiller:
    data_record = data_record or {"data": config.data}
    if config.method == "vanilla":
        return VanillaDistiller(student, None, record)
    if config.method == "kd":
        return KDDistiller(student, teacher, record, temperature=config.kd_temperature, weight=config.kd_weight)
    if config.method == "dkd":
        return DKDDistiller(student, teacher, record, alpha=config.dkd_alpha, beta=config.dkd_beta,
                            temperature=config.kd_temperature, warmup_epochs=config.dkd_warmup_epochs)
    spec = data.spec
    method = base_method(config.method)
    input_shape = (spec.in_channels, spec.image_size, spec.image_size)
    pairs = models.pair_networks(teacher, student, input_shape)
    kd = (config.kd_temperature, config.kd_weight) if config.method.endswith("+kd") else None
    if method in PAIR_METHODS:
        weights = group_weights(method, len(pairs), config.stage_weights)
        if method == "fitnet":
            return FitNetDistiller(student, teacher, record, pairs=pairs, weights=weights,
                                   hint_weight=config.hint_weight, kd=kd)
        if method == "at":
            return ATDistiller(student, teacher, record, pairs=pairs, weights=weights, beta=config.at_beta,
                               p=config.at_p, kd=kd)
        return SPDistiller(student, teacher, record, pairs=pairs, weights=weights, gamma=config.sp_gamma, kd=kd)
    search = None
    if method == "dfa":
        if isinstance(config.aggregation, SearchResult):  # run_search's return value, in Python
            search = config.aggregation
            check_teacher(search, teacher, input_shape, "the search result")
        else:
            search = load_search_result(config.aggregation, teacher=teacher, input_shape=input_shape)
        if config.check_teacher_data and search.data != data_record["data"]:
            raise ConfigError(f"{_aggregation_label(config.aggregation)} was searched on {search.data!r}; this run uses {data_record['data']!r}; "
                              "pass --no-check-teacher-data to use it anyway")
        made_for = search.teacher.get("sha256", "")
        if config.check_teacher_hash and made_for and teacher_info.get("sha256") and made_for != teacher_info["sha256"]:
            raise ConfigError(f"{_aggregation_label(config.aggregation)} was searched with the teacher checkpoint "
                              f"{search.teacher.get('checkpoint') or '?'} (other weights than {config.teacher}); "
                              "pass that teacher, or --no-check-teacher-hash to use it anyway")
    targets = group_targets(method, pairs, search=search, random_std=config.random_std,
                            aggregation_seed=config.aggregation_seed, alpha=config.alpha)
    aggregate_first = config.margin_place == "aggregate"
    return FeatureDistiller(student, teacher, record, pairs=pairs, targets=targets,
                            margins=_margins(config, teacher, data, targets, aggregate_first),
                            weights=stage_weights(len(pairs), config.stage_weights),
                            gamma_fd=config.gamma_fd, kernels=config.kernels, aggregate_first=aggregate_first, kd=kd)


def _margins(config: DistillConfig, teacher: nn.Module, data: DataBundle, targets: list[GroupTarget],
             aggregate_first: bool) -> list[torch.Tensor]:
    """Per group, [K, C] margins of every teacher layer, or [1, C] of the aggregation (aggregate_first):
    from the BNs (for the aggregation: the alpha-weighted mean of its layers' margins), or measured."""
    spec = data.spec
    input_shape = (spec.in_channels, spec.image_size, spec.image_size)
    if config.margins == "empirical":
        if isinstance(data.train, UserBatches):
            raise ConfigError("--margins empirical measures the teacher on the training dataset: pass it as a "
                              "map-style dataset, not a DataLoader (or pass margins to DFALoss yourself)")
        aggregations = [(t.layers, t.beta) for t in targets] if aggregate_first else None
        return empirical_margins(teacher, data.train, aggregations=aggregations, device=resolve_device(config.device))
    margins = teacher_margins(teacher, input_shape)
    return aggregate_margins(targets, margins) if aggregate_first else margins


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
