"""The ``dfa`` command.

Each subcommand's options come from its configuration dataclass (see :mod:`dfa_ext.config`), so
``--help``, the Python API and YAML/JSON config files (``--config FILE``) always agree. Errors a
user can cause end with one line on stderr and exit status 2; an interrupted run exits with 130
after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Sequence

from .errors import DfaError


def _parse_key_value(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), yaml.safe_load(value)  # "3" -> 3, "true" -> True, "a" -> "a"


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field; unset options are absent from the parsed namespace."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if args and typing.get_origin(annotation) is not tuple else annotation
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs: dict[str, Any] = dict(field.metadata.get("argparse", {}))
        shown = "unset" if default is None else default
        kwargs.update(default=argparse.SUPPRESS, help=f"{field.metadata.get('help', '')} (default: {shown})",
                      dest=field.name)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(annotation)[0], metavar="X")
        elif base is dict or annotation is dict:
            kwargs.update(nargs="*", type=_parse_key_value, metavar="KEY=VALUE")
        elif base in (int, float, str):
            kwargs["type"] = base
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def config_from_args(cls: type, namespace: argparse.Namespace) -> Any:
    """Defaults, then the ``--config`` file, then the command line."""
    from .config import make_config, read_config_file

    fields = {f.name for f in dataclasses.fields(cls)}
    cli = {k: v for k, v in vars(namespace).items() if k in fields}
    hints = typing.get_type_hints(cls)
    for key, value in cli.items():
        if hints[key] is dict:  # repeated KEY=VALUE pairs
            cli[key] = dict(value)
        elif isinstance(value, list):  # nargs="+" tuples
            cli[key] = tuple(value)
    file_values = read_config_file(namespace.config) if getattr(namespace, "config", None) else {}
    return make_config(cls, file_values, cli)


def _train_teacher(namespace: argparse.Namespace) -> int:
    from .training.teacher import TeacherConfig, train_teacher

    config = config_from_args(TeacherConfig, namespace)
    result = train_teacher(config)
    print(f"teacher {config.model} on {config.data}: best test top-1 {result.best_top1:.2f}%, "
          f"last {result.last_top1:.2f}% (top-5 {result.last_top5:.2f}%), {result.seconds:.0f} s; "
          f"checkpoints: {result.last_path} (last), {result.best_path} (best)")
    return 0


def _search(namespace: argparse.Namespace) -> int:
    from .search import SearchConfig, run_search

    config = config_from_args(SearchConfig, namespace)
    result = run_search(config)
    print(f"search {result.teacher['model']} -> {result.student} on {result.data} ({result.seconds:.0f} s):")
    for group in result.groups:
        lead = max(range(len(group.alpha)), key=group.alpha.__getitem__)
        alphas = " ".join(f"{a:.3f}" for a in group.alpha)
        print(f"  group {group.index}: alpha [{alphas}]  lead {group.teacher_layers[lead]}"
              + ("" if group.searched else "  (not searched)"))
    print(f"aggregation: {config.out}/search.json, picture: {config.out}/alpha.png")
    return 0


def _list_models(namespace: argparse.Namespace) -> int:
    from . import models

    print("\n".join(models.available_models()))
    return 0


def _list_datasets(namespace: argparse.Namespace) -> int:
    from . import data

    print("\n".join(data.available_datasets()))
    return 0


def _subcommands() -> list[tuple[str, str, type | None, Callable[[argparse.Namespace], int]]]:
    from .search import SearchConfig
    from .training.teacher import TeacherConfig

    return [
        ("train-teacher", "train a teacher network with cross-entropy", TeacherConfig, _train_teacher),
        ("search", "stage 1: search the per-group teacher feature aggregation (bridge loss)", SearchConfig, _search),
        ("models", "list the network names", None, _list_models),
        ("datasets", "list the dataset names", None, _list_datasets),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfa", description="DFA knowledge distillation: train a teacher, "
                                     "search the feature aggregation, distil a student.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary, cls, handler in _subcommands():
        sub = commands.add_parser(name, help=summary, description=summary,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter if cls is None
                                  else argparse.HelpFormatter)
        if cls is not None:
            sub.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (the command line wins)")
            add_config_options(sub, cls)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    from .training.interrupt import TrainingInterrupted

    try:
        return namespace.handler(namespace)
    except TrainingInterrupted as stop:
        print(f"dfa: {stop}", file=sys.stderr)
        return 130
    except DfaError as error:
        print(f"dfa: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable output folder, full disk, unreadable file
        print(f"dfa: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without saving
        print("dfa: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
