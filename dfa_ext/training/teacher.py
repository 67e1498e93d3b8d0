"""Stage 0: train a teacher network with cross-entropy (the usual CIFAR recipe)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import models
from ..config import config_dict, option
from ..losses import cross_entropy
from ..data import DataBundle, as_bundle, describe
from ..data.options import DataOptions
from ..errors import CheckpointError, ConfigError
from .checkpoint import load_checkpoint, model_from_checkpoint, model_record, structure_fingerprint
from .loop import FitResult, LoopConfig, TrainingTask, fit
from .networks import network_label, network_record, split_network_option
from .seeding import preserved_rng, seed_everything


@dataclass
class TeacherConfig(LoopConfig, DataOptions):
    """Options of ``dfa train-teacher`` (besides those of the training loop).

    The defaults suit the bundled MNIST digits (a few minutes on 2 CPU cores); the CIFAR recipe of
    the distillation literature is ``--epochs 240 --batch-size 64 --lr 0.05 --schedule step
    --milestones 0.625 0.75 0.875``.
    """

    epochs: int = option(15, "training epochs")

    model: str | None = option("resnet20", "network: a name (see `dfa models`, e.g. resnet56, wrn_40_2, resnet32x4) "
                               "or an import path pkg.module:factory of your own")
    model_options: dict = option({}, "extra arguments of the network, as KEY=VALUE")
    out: str = option("runs/teacher", "output folder (checkpoints, metrics.csv, config.json)")

    def validate(self, model_given: bool = False) -> None:
        super().validate()
        if not self.model and not model_given:
            raise ConfigError("model is required: a network name, an import path pkg.module:factory, or a module")


class ClassifierTask(TrainingTask):
    """Plain supervised training of one network: a cross-entropy loss."""

    def __init__(self, model: nn.Module, record: dict[str, Any]) -> None:
        super().__init__()
        self.classifier = model
        self._record = record  # name and arguments that rebuild the network

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.classifier(images)
        return logits, {"ce": cross_entropy(logits, labels)}

    def export_state(self) -> dict:
        return {"model": model_record(self.classifier, **self._record)}

    def import_state(self, state: dict) -> None:
        self.classifier.load_state_dict(state["model"]["state_dict"])


def train_teacher(config: TeacherConfig, *, model: nn.Module | None = None,
                  data: DataBundle | Sequence[Dataset] | None = None,
                  on_step: Callable[[int], Any] | None = None) -> FitResult:
    """Trains ``config.model`` on ``config.data``; see :func:`dfa_ext.training.loop.fit` for the files.

    Returns the best and last test top-1 (%) and where the checkpoints are; ``last.pt`` and
    ``best.pt`` are teacher checkpoints for ``dfa search`` and ``dfa distill``. The caller's RNG
    states are left as they were.

    Args:
        model: a network to train instead of ``config.model`` (trained in place; may also be given as
            ``config.model``). Checkpoints can rebuild it when ``dfa_ext.models.create`` built it (a
            zoo name or "pkg.module:factory"), else they hold its weights for you to load.
        data: a ``DataBundle``, or ``(train_dataset, test_dataset)``: map-style datasets of
            ``(image [C, H, W], label)`` items, used as they are.
    """
    _, model = split_network_option(config.model, model, "model")
    if model is not None:  # the module is the network; the config keeps names only (it is written as JSON)
        config = dataclasses.replace(config, model=None)
    config.validate(model_given=model is not None)
    if model is None and not models.is_import_path(config.model):  # a user's factory may load files: not on meta
        with torch.device("meta"):  # a bad model name or argument fails now, before data loading
            models.create(config.model, **config.model_options)
    with preserved_rng():
        bundle = as_bundle(data, require_test=True) if data is not None else config.load(config.seed)
        data_record = describe(bundle) if data is not None else {"data": config.data, "augment": config.augment}
        seed_everything(config.seed)
        spec = bundle.spec
        if model is None:
            model = models.create(config.model, num_classes=spec.num_classes, in_channels=spec.in_channels,
                                  **config.model_options)
            record = network_record(model, spec.num_classes, spec.in_channels, config.model, config.model_options)
        else:
            record = network_record(model, spec.num_classes, spec.in_channels)
        out = Path(config.out)
        settings = {**config_dict(config), **data_record, "model": network_label(record)}
        signature = {"model": network_label(record), "model_options": record["kwargs"],
                     "model_structure": structure_fingerprint(model), "data": data_record["data"],
                     "data_size": len(bundle.train), "seed": config.seed, "batch_size": config.batch_size}
        return fit(ClassifierTask(model, record), bundle, config, out, kind="teacher", signature=signature,
                   extra_state={"config": settings, "data_spec": config_dict(spec)}, on_step=on_step,
                   settings=settings)


def load_teacher(path: str, spec, *, check_data: bool = True) -> tuple[models.TappedNetwork, dict]:
    """The frozen teacher of a checkpoint, checked against the dataset it will see.

    Classes and input channels must match. With ``check_data``, so must the dataset name and image
    size the teacher was trained on (when the checkpoint records them): its features mean little
    on other images.
    """
    state = load_checkpoint(path, kind=("teacher", "distill"))
    teacher = model_from_checkpoint(state)
    record = {k: v for k, v in state["model"].items() if k != "state_dict"}
    if (record["num_classes"], record["in_channels"]) != (spec.num_classes, spec.in_channels):
        raise ConfigError(f"teacher {path} was trained for {record['num_classes']} classes and "
                          f"{record['in_channels']} input channels; dataset {spec.name!r} has "
                          f"{spec.num_classes} classes and {spec.in_channels} channels")
    trained_on = state.get("data_spec")
    if check_data and isinstance(trained_on, dict) and (trained_on.get("name"), trained_on.get("image_size")) != (
            spec.name, spec.image_size):
        raise ConfigError(f"teacher {path} was trained on {trained_on.get('name')!r} "
                          f"({trained_on.get('image_size')}px images); this run uses {spec.name!r} "
                          f"({spec.image_size}px); pass --no-check-teacher-data to use it anyway")
    if check_data and isinstance(trained_on, dict) and trained_on.get("split", spec.split) != spec.split:
        raise ConfigError(f"teacher {path} was trained on another train/test split ({trained_on['split'] or 'the official one'}; "
                          f"this run: {spec.split or 'the official one'}): it may have seen this run's test images; "
                          "pass --no-check-teacher-data to use it anyway")
    return freeze(teacher), record


def load_student(student: nn.Module, path: str, name: str, options: dict) -> None:
    """Loads the weights of a trained ``name`` network (with ``options``) from the checkpoint at
    ``path`` (of dfa distill or train-teacher) into ``student``; other networks are refused."""
    state = load_checkpoint(path, kind=("teacher", "distill"))
    record = state.get("model") or {}
    if (record.get("name"), record.get("kwargs", {})) != (name, dict(options)):
        raise ConfigError(f"{path} holds a {record.get('name')!r} network with options {record.get('kwargs', {})}; "
                          f"this run trains {name!r} with options {dict(options)}")
    try:
        student.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(f"{path} does not fit the student: {str(error).splitlines()[0][:300]}") from None


def freeze(teacher: nn.Module) -> nn.Module:
    """Makes ``teacher`` a fixed function: no parameter learns, BN uses its running statistics."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
