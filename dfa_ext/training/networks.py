"""The networks a run trains or learns from, given by name or as modules, and how a checkpoint
records them so that it can rebuild them (resume, ``dfa evaluate``, a student teaching in turn)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import models
from ..errors import ConfigError


def network_record(model: nn.Module, num_classes: int, in_channels: int, name: str | None = None,
                   options: dict | None = None) -> dict[str, Any]:
    """How to rebuild ``model``: ``name`` (a zoo name or "pkg.module:factory") and ``kwargs`` for
    ``dfa_ext.models.create``; for a module built otherwise, ``name`` None and its ``class``."""
    if name is None:
        rebuild = models.rebuild_record(model)
        if rebuild is not None:
            name, options = rebuild
    inner = getattr(model, "model", model)  # a HookedNetwork's wrapped module names the class
    return {"name": name, "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
            "num_classes": num_classes, "in_channels": in_channels, "kwargs": dict(options or {})}


def network_label(record: dict[str, Any]) -> str:
    """What a report calls the network of ``record``: its name, else its class."""
    return record["name"] or record["class"]


def split_network_option(value: Any, given: nn.Module | None, what: str) -> tuple[str | None, nn.Module | None]:
    """A config field (``student``, ``model``) may hold a module instead of a name: returns (the name
    to keep in the config, the module), refusing a module given twice or a value of another type."""
    if isinstance(value, nn.Module):
        if given is not None:
            raise ConfigError(f"{what} is given twice (in the config and as the {what}= argument): give it once")
        return None, value
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{what} must be a network name, an import path 'pkg.module:factory' or an nn.Module, "
                          f"got {type(value).__name__}")
    return value, given

