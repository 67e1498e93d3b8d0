"""The ``dfa`` command.

Each subcommand's options come from its configuration dataclass (see :mod:`dfa_ext.config`), so
``--help``, the Python API and YAML/JSON config files (``--config FILE``) always agree. Errors a
user can cause end with one line on stderr and exit status 2; a run that diverged (a NaN or
infinite loss, gradient or beta) with 3, its last checkpoint holding the last finite state; an
interrupted run exits with 130 after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
import typing
from typing import Any, Callable, Sequence

from .errors import DfaError, TrainingDiverged


def _parse_key_value(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    parsed = yaml.safe_load(value)  # "3" -> 3, "true" -> True, "a" -> "a"
    if isinstance(parsed, str):  # YAML 1.1 reads "1e5" and "3e-4" as strings; a user means numbers
        with contextlib.suppress(ValueError):
            number = float(parsed)
            parsed = number if math.isfinite(number) else parsed  # "nan" stays a word, refused by type
    return key.replace("-", "_"), parsed


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field; unset options are absent from the parsed namespace."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if args and typing.get_origin(annotation) is not tuple else annotation
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs: dict[str, Any] = dict(field.metadata.get("argparse", {}))
        if kwargs.pop("positional", False):  # e.g. the CKPT of `dfa evaluate CKPT`
            parser.add_argument(field.name, metavar=field.name.upper(), help=field.metadata.get("help", ""))
            continue
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
    """Defaults, then the ``--preset``, then the ``--config`` file, then the command line."""
    from .config import make_config, read_config_file
    from .presets import preset_values

    fields = {f.name for f in dataclasses.fields(cls)}
    cli = {k: v for k, v in vars(namespace).items() if k in fields}
    hints = typing.get_type_hints(cls)
    for key, value in cli.items():
        if hints[key] is dict:  # repeated KEY=VALUE pairs
            cli[key] = dict(value)
        elif isinstance(value, list):  # nargs="+" tuples
            cli[key] = tuple(value)
    file_values = read_config_file(namespace.config) if getattr(namespace, "config", None) else {}
    preset = preset_values(namespace.preset, namespace.command, cls) if getattr(namespace, "preset", None) else {}
    return make_config(cls, preset, file_values, cli)


def _print_fit(what: str, result: Any) -> None:
    """The closing line of a training command (``result``: a FitResult)."""
    print(f"{what}: best test top-1 {result.best_top1:.2f}%, last {result.last_top1:.2f}% "
          f"(top-5 {result.last_top5:.2f}%), {result.seconds:.0f} s; "
          f"checkpoints: {result.last_path} (last), {result.best_path} (best)")


def _train_teacher(namespace: argparse.Namespace) -> int:
    from .training.teacher import TeacherConfig, train_teacher

    config = config_from_args(TeacherConfig, namespace)
    _print_fit(f"teacher {config.model} on {config.data}", train_teacher(config))
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


def _distill(namespace: argparse.Namespace) -> int:
    from .distill import DistillConfig, run_distill

    config = config_from_args(DistillConfig, namespace)
    _print_fit(f"distill {config.method}: {config.student} on {config.data}", run_distill(config))
    return 0


def _evaluate(namespace: argparse.Namespace) -> int:
    import json

    from .training.evaluate_checkpoint import EvaluateConfig, evaluate_checkpoint

    config = config_from_args(EvaluateConfig, namespace)
    metrics = evaluate_checkpoint(config)
    if namespace.json:
        print(json.dumps(metrics))
    else:
        print(f"{metrics['model']} ({metrics['kind']} checkpoint) on {metrics['data']} test ({metrics['samples']} "
              f"images): top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
    return 0


def _demo(namespace: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, namespace))
    return 0


def _list_models(namespace: argparse.Namespace) -> int:
    from . import models

    print("\n".join(models.available_models()))
    return 0


def _list_presets(namespace: argparse.Namespace) -> int:
    from .presets import PRESETS

    for preset in PRESETS.values():
        print(f"{preset.name}: {preset.summary}")
        for command, values in [("every command", preset.common), *preset.commands.items()]:
            if values:
                print(f"  {command}: " + " ".join(f"--{k.replace('_', '-')} {_shown(v)}" for k, v in values.items()))
    return 0


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _list_datasets(namespace: argparse.Namespace) -> int:
    from . import data

    print("\n".join(data.available_datasets()))
    return 0


def _subcommands() -> list[tuple[str, str, type | None, Callable[[argparse.Namespace], int]]]:
    from .demo import DemoConfig
    from .distill import DistillConfig
    from .search import SearchConfig
    from .training.evaluate_checkpoint import EvaluateConfig
    from .training.teacher import TeacherConfig

    return [
        ("train-teacher", "train a teacher network with cross-entropy", TeacherConfig, _train_teacher),
        ("search", "stage 1: search the per-group teacher feature aggregation (bridge loss)", SearchConfig, _search),
        ("distill", "stage 2: train a student with DFA or a baseline (vanilla, kd, ofd, uniform, random)",
         DistillConfig, _distill),
        ("evaluate", "test-set top-1, top-5 and loss of a checkpoint's network", EvaluateConfig, _evaluate),
        ("demo", "the whole pipeline on the bundled MNIST digits: teacher, search, then every method over "
         "several seeds; prints and saves the comparison table", DemoConfig, _demo),
        ("models", "list the network names", None, _list_models),
        ("datasets", "list the dataset names", None, _list_datasets),
        ("presets", "list the presets (--preset NAME): option values of a measured regime", None, _list_presets),
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
            sub.add_argument("--preset", metavar="NAME", help="option values of a named regime (see `dfa presets`); "
                             "the config file and the command line win")
            sub.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (the command line wins)")
            add_config_options(sub, cls)
        if handler is _evaluate:
            sub.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand. Under ``torchrun`` every process runs it; they join one process group
    first, and only rank 0 prints results (errors are printed by every process that has one)."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    from .training import distributed
    from .training.interrupt import TrainingInterrupted

    try:
        context = distributed.init_from_env(getattr(namespace, "device", "auto"))
        quiet = contextlib.nullcontext() if context.is_main else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            return namespace.handler(namespace)
    except TrainingInterrupted as stop:
        print(f"dfa: {stop}", file=sys.stderr)
        return 130
    except TrainingDiverged as error:
        print(f"dfa: error: {error}", file=sys.stderr)
        return 3
    except DfaError as error:
        print(f"dfa: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable output folder, full disk, unreadable file
        print(f"dfa: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without saving
        print("dfa: aborted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
