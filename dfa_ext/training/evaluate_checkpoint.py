"""``dfa evaluate CKPT``: test-set loss, top-1 and top-5 of the network a checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..data import load_data
from ..data.registry import DEFAULT_DATASET, available_datasets
from ..errors import ConfigError
from .checkpoint import load_checkpoint, model_from_checkpoint
from .evaluate import evaluate
from .run_options import AMP_CHOICES, autocast_for, resolve_device

# Which network of each checkpoint kind is evaluated: teachers and distilled students are
# "model"; a search checkpoint holds its student under "student".
_NETWORK_KEY = {"teacher": "model", "distill": "model", "search": "student"}


@dataclass
class EvaluateConfig:
    """Evaluate a checkpoint's network on a dataset's test split (by default the one it was trained on)."""

    checkpoint: str = option("", "checkpoint file (last.pt / best.pt of dfa train-teacher, distill or search)",
                             positional=True)
    data: str | None = option(None, "dataset; unset: the one the checkpoint was trained on")
    data_dir: str | None = option(None, "dataset folder; unset: the checkpoint's when --data is unset")
    data_options: dict = option({}, "extra dataset arguments, as KEY=VALUE; empty: the checkpoint's "
                                "when --data is unset")
    batch_size: int = option(512, "evaluation batch size")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    amp: str = option("none", "mixed precision: bf16 or fp16 (GPU)", choices=AMP_CHOICES)


def evaluate_checkpoint(config: EvaluateConfig) -> dict:
    """Returns {"loss", "top1", "top5" (percent), "samples", "data", "model", "kind"}.

    Raises:
        CheckpointError: unreadable checkpoint or one without a network.
        ConfigError: the dataset does not fit the network (classes or input channels).
    """
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {config.batch_size}")
    state = load_checkpoint(config.checkpoint, kind=tuple(_NETWORK_KEY))
    key = _NETWORK_KEY[state["kind"]]
    model = model_from_checkpoint(state, key=key)
    trained = state.get("config", {})
    name, data_dir, options = config.data, config.data_dir, dict(config.data_options)
    if name is None:  # the training dataset; a given folder or options still win
        name = trained.get("data", DEFAULT_DATASET)
        if name not in available_datasets():  # data the user passed in Python ("custom")
            raise ConfigError(f"{config.checkpoint} was trained on your own data ({name!r}), which the command "
                              f"cannot load: pass --data (one of {', '.join(available_datasets())}), or evaluate "
                              "it in Python with dfa_ext.training.evaluate(model, test_set)")
        data_dir = data_dir if data_dir is not None else trained.get("data_dir")
        options = options or dict(trained.get("data_options") or {})
    bundle = load_data(name, data_dir, augment=False, **options)
    record, spec = state[key], bundle.spec
    if (record["num_classes"], record["in_channels"]) != (spec.num_classes, spec.in_channels):
        raise ConfigError(f"{config.checkpoint} holds a network for {record['num_classes']} classes and "
                          f"{record['in_channels']} input channels; dataset {name!r} has {spec.num_classes} "
                          f"classes and {spec.in_channels} channels")
    device = resolve_device(config.device)
    metrics = evaluate(model.to(device), bundle.test, batch_size=config.batch_size, device=device,
                       autocast=autocast_for(config.amp, device))
    return {**metrics, "samples": len(bundle.test), "data": name, "model": record["name"], "kind": state["kind"]}
