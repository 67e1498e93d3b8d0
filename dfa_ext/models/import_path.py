"""Models from the user's own code: ``create("pkg.module:factory", ...)``.

The factory (a function or class; the attribute may be dotted, "mod:Outer.build") is called with
the model options, plus ``num_classes=`` and ``in_channels=`` when its signature takes them.  It
returns a :class:`TappedNetwork`, or a torchvision-style ResNet, which is wrapped in a
:class:`HookedNetwork`.  Every failure to import, find, call or accept the factory's result is a
one-line :class:`ModelError` naming the path.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from types import ModuleType
from typing import Any, Callable, Dict, Mapping, Optional

from torch import nn

from ..errors import ModelError
from .hooked import _tapped_or_none
from .taps import TappedNetwork

_IDENT = r"[A-Za-z_]\w*"
_IMPORT_PATH = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)")


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form "pkg.module:factory" (attribute possibly dotted)."""
    return isinstance(name, str) and _IMPORT_PATH.fullmatch(name) is not None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _cwd_on_path() -> bool:
    cwd = os.path.realpath(os.getcwd())
    return any(os.path.realpath(entry or os.curdir) == cwd for entry in sys.path)


def _import(module_name: str, path: str) -> ModuleType:
    """The module, retried with the working directory on sys.path: ``python -m dfa_ext`` has it
    there, but the ``dfa`` console script does not, and a user's model file usually lives there."""
    for attempt in range(2):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            itself = module_name == missing or module_name.startswith(missing + ".")
            if itself and attempt == 0 and not _cwd_on_path():
                sys.path.append(os.getcwd())  # appended: never shadows an installed package
                importlib.invalidate_caches()
                continue
            if itself:
                raise ModelError(f"model {path!r}: no module named {missing!r} (looked in sys.path "
                                 "and the working directory); pass an importable "
                                 "'pkg.module:factory'") from None
            raise ModelError(f"model {path!r}: importing {module_name!r} failed: "
                             f"{_one_line(error)}") from error
        except ImportError as error:
            raise ModelError(f"model {path!r}: importing {module_name!r} failed: "
                             f"{_one_line(error)}") from error
    raise AssertionError("unreachable")


def _resolve(path: str) -> Callable[..., Any]:
    """The factory named by ``path``."""
    module_name, attribute = _IMPORT_PATH.fullmatch(path).groups()
    target: Any = _import(module_name, path)
    parts = attribute.split(".")
    for i, part in enumerate(parts):
        if not hasattr(target, part):
            found = ":".join([module_name, ".".join(parts[:i])]) if i else module_name
            raise ModelError(f"model {path!r}: {found!r} has no attribute {part!r}; pass "
                             "'pkg.module:factory' naming a function or class")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model {path!r}: {attribute!r} is a {type(target).__name__}, not a "
                         "function or class; pass 'pkg.module:factory' naming one")
    return target


def _signature(factory: Callable[..., Any]) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # no signature (some builtins and C types)
        return None


def _call_arguments(signature: Optional[inspect.Signature], options: Mapping[str, Any],
                    num_classes: int, in_channels: int) -> Dict[str, Any]:
    """``options`` plus num_classes / in_channels where the factory's signature takes them (named
    parameters or ``**kwargs``; without a signature, the options only)."""
    arguments = dict(options)
    if signature is None:
        return arguments
    parameters = signature.parameters.values()
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if var_keyword or key in named:
            arguments[key] = value
    return arguments


def build_from_import_path(path: str, num_classes: int, in_channels: int,
                           options: Mapping[str, Any]) -> TappedNetwork:
    """Calls the factory "pkg.module:factory" and returns its network as a TappedNetwork.

    The network maps images [B, in_channels, H, W] to logits [B, num_classes] when the factory
    takes those two arguments; otherwise the factory alone decides its shapes.
    """
    if not is_import_path(path):
        raise ModelError(f"{path!r} is not an import path; pass 'pkg.module:factory'")
    factory = _resolve(path)
    signature = _signature(factory)
    arguments = _call_arguments(signature, options, num_classes, in_channels)
    if signature is not None:
        try:
            signature.bind(**arguments)
        except TypeError as error:  # bad options: say so before running the factory
            raise ModelError(f"model {path!r} does not take these options: {_one_line(error)}; "
                             f"it was given {sorted(arguments)}") from None
    try:
        result = factory(**arguments)
    except TypeError as error:  # e.g. options a **kwargs factory passes on to its network
        raise ModelError(f"model {path!r} raised TypeError: {_one_line(error)}; check the options "
                         f"{sorted(arguments)}") from error
    tapped = _tapped_or_none(result) if isinstance(result, nn.Module) else None
    if tapped is None:
        raise ModelError(f"model {path!r} returned a {type(result).__name__}; the factory must "
                         "return a TappedNetwork, e.g. dfa_ext.models.HookedNetwork(model, "
                         "groups=[[...], ...])")
    return tapped
