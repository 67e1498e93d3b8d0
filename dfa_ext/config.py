"""Run configurations: dataclasses whose fields carry their help text.

One definition per option serves the Python API (the dataclass), the command line (each field
becomes ``--field-name``) and configuration files (YAML or JSON, keys = field names). Values are
taken from, in increasing priority: the defaults, the file, the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field with its command-line help (and extra argparse settings, e.g. choices)."""
    metadata = {"help": help, "argparse": argparse_kwargs}
    if isinstance(default, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def read_config_file(path: str | os.PathLike) -> dict:
    """Reads a YAML (``.yaml``/``.yml``) or JSON file holding one mapping of option names to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:
        raise ConfigError(f"cannot parse config file {path}: {str(error).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Checks and converts a file value to the field's type (tuples from lists, ints to floats)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        if annotation is type(None) or type(None) in args:
            return None
        raise ConfigError(f"option {name!r} cannot be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"option {name!r}: {value!r} is not a {annotation}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {name!r} expects a list, got {value!r}")
        return tuple(_coerce(name, v, args[0]) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"option {name!r} expects true or false, got {value!r}")
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, (str, os.PathLike)):
        return str(value)
    if annotation in (int, float, str):
        raise ConfigError(f"option {name!r} expects {annotation.__name__}, got {value!r}")
    return value


def make_config(cls: type[T], *layers: Mapping[str, Any]) -> T:
    """Builds ``cls`` from mappings of option values, later ones winning; unknown names are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            if name not in fields:
                raise ConfigError(f"unknown option {name!r}; known options: {', '.join(sorted(fields))}")
            values[name] = _coerce(name, value, hints[name])
    return cls(**values)


def config_dict(config: Any) -> dict:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
