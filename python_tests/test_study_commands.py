"""experiments/study.py: every command a study would run is one ``dfa`` accepts, with the values it
means (checked without training anything: the study is run with ``--dry-run``).

A typo in a study's options (a probe regime's ``--student-options``, a preset name, a method) would
otherwise surface an hour into a sweep, as one failed run among many."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shlex
import sys
from pathlib import Path

import pytest

from dfa_ext import cli, models
from dfa_ext.data.registry import dataset_options
from dfa_ext.errors import ConfigError, DfaError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location("study_under_test", EXPERIMENTS / "study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("study_under_test", None)
        sys.path.remove(str(EXPERIMENTS))


def dry_run(study, *argv: str) -> list[list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        study.main([*argv, "--dry-run"])
    lines = [line for line in out.getvalue().splitlines() if line.startswith("dfa ")]
    assert lines, f"{argv}: no command"
    return [shlex.split(line)[1:] for line in lines]


def parsed_config(argv: list[str]):
    """The config ``dfa ARGV`` would run with (parser, preset, then values), or the error it raises;
    its networks are built and its data options checked too (an unknown key there is only refused
    when the run gets to it)."""
    namespace = cli.build_parser().parse_args(argv)
    cls = {name: c for name, _, c, _ in cli._subcommands()}[namespace.command]
    config = cli.config_from_args(cls, namespace)
    network = (config.model, config.model_options) if namespace.command == "train-teacher" else \
        (config.student, config.student_options)
    models.create(network[0], num_classes=10, in_channels=1, **network[1])
    unknown = set(config.data_options) - set(dataset_options(config.data))
    if unknown:
        raise ConfigError(f"unknown data options {sorted(unknown)}")
    return config


STUDIES = [["regime"], ["stability"], ["gamma"], ["compare"], ["ablation"], ["oracle"], ["margins"], ["probe"],
           ["compare", "--methods", "vanilla", "ofd", "dfa", "--seeds", "3"]]


@pytest.mark.parametrize("argv", STUDIES, ids=lambda a: " ".join(a))
def test_every_command_of_a_study_is_one_dfa_accepts(study, argv, tmp_path):
    for command in dry_run(study, *argv, "--out", str(tmp_path)):
        config = parsed_config(command)  # raises SystemExit (argparse) or DfaError on a bad option
        assert str(config.out).startswith(str(tmp_path))


def test_the_preset_reaches_every_command_and_the_default_folder(study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folders are relative: nothing may land in the checkout
    commands = dry_run(study, "compare", "--preset", "mnist-1k", "--methods", "vanilla", "dfa", "--seeds", "0")
    assert all(c[c.index("--preset") + 1] == "mnist-1k" for c in commands)
    assert {c[0] for c in commands} == {"train-teacher", "search", "distill"}
    assert all(c[c.index("--out") + 1].startswith("runs/study/") for c in commands)
    other = dry_run(study, "compare", "--preset", "elsewhere", "--methods", "vanilla", "--seeds", "0")
    assert all(c[c.index("--out") + 1].startswith("runs/study-elsewhere/") for c in other)
    assert not (tmp_path / "runs").exists()  # a dry run creates no folder


def test_a_probe_regime_reaches_its_students_only(study, tmp_path):
    commands = dry_run(study, "probe", "--regimes", "w16-28px-e30-g1e-2", "--seeds", "0", "--out", str(tmp_path))
    configs = {(c[0], c[c.index("--method") + 1] if "--method" in c else ""): parsed_config(c) for c in commands}
    teacher = configs[("train-teacher", "")]
    assert teacher.data_options["image_size"] == 28 and teacher.model == "resnet20"
    for method in ("vanilla", "ofd", "kd"):
        student = configs[("distill", method)]
        assert student.student_options == {"width": 16} and student.epochs == 30
        assert student.data_options == teacher.data_options
    assert configs[("distill", "ofd")].gamma_fd == pytest.approx(1e-2)
    assert configs[("distill", "kd")].gamma_fd != pytest.approx(1e-2)  # the OFD-only option stays OFD's


@pytest.mark.parametrize("bad", [["--student-options", "widht=16"], ["--data-options", "image_sise=28"],
                                 ["--methd", "kd"], ["--preset", "mnist-1K"]], ids=lambda a: a[0])
def test_the_negative_control_a_bad_option_is_caught(study, bad):
    """The check above can fail: a misspelt option, key or preset is refused."""
    with pytest.raises((SystemExit, DfaError)):
        with contextlib.redirect_stderr(io.StringIO()):
            parsed_config(["distill", "--preset", "mnist-1k", "--method", "vanilla", *bad, "--out", "x"])


def test_a_probe_regime_keeps_its_teacher_whichever_regimes_run(study, tmp_path):
    """The teacher folder of a data setting does not depend on the --regimes list (it once was the
    setting's rank among the regimes asked for: a report of other regimes read another folder)."""
    def teachers(*regimes: str) -> dict[str, str]:
        commands = dry_run(study, "probe", "--regimes", *regimes, "--seeds", "0", "--out", str(tmp_path))
        return {c[c.index("--out") + 1].split("/probe/")[1].split("/")[0]: c[c.index("--teacher") + 1]
                for c in commands if c[0] == "distill" and "--teacher" in c}

    alone = teachers("w4-28px-e60")
    together = teachers("w8-14px", "w4-28px-e60")
    assert together["w4-28px-e60"] == alone["w4-28px-e60"] != together["w8-14px"]
