"""Presets: ``--preset NAME`` fills a command's options; the config file and the command line win."""

from __future__ import annotations

import json

import pytest

from dfa_ext.cli import build_parser, config_from_args
from dfa_ext.cli import main as dfa_main
from dfa_ext.distill import DistillConfig
from dfa_ext.errors import ConfigError
from dfa_ext.presets import MNIST_1K, PRESETS, preset_values
from dfa_ext.search import SearchConfig
from dfa_ext.training.teacher import TeacherConfig


def _config(cls, argv):
    return config_from_args(cls, build_parser().parse_args(argv))


@pytest.mark.parametrize("command, cls", [("train-teacher", TeacherConfig), ("search", SearchConfig),
                                          ("distill", DistillConfig)])
def test_every_value_of_every_preset_is_an_option_of_its_command(command, cls):
    for preset in PRESETS.values():
        values = preset_values(preset.name, command, cls)
        given = {**preset.common, **preset.commands.get(command, {})}
        assert set(preset.commands.get(command, {})) <= set(values), "a command value names no option"
        config = cls(**values)  # parses: right types, a valid configuration
        for key, value in values.items():
            assert getattr(config, key) == value
        assert {k for k in given if k in values} == set(values)


def test_preset_fills_the_options_and_the_config_file_and_command_line_win(tmp_path):
    distill = _config(DistillConfig, ["distill", "--preset", "mnist-1k"])
    assert (distill.data, distill.data_options) == ("mnist", {"test_fraction": 0.8, "image_size": 14, "padding": 1})
    assert (distill.student, distill.student_options, distill.epochs) == ("resnet8", {"width": 2}, 160)
    teacher = _config(TeacherConfig, ["train-teacher", "--preset", "mnist-1k"])
    assert (teacher.model, teacher.epochs, teacher.batch_size) == ("resnet20", 60, 64)
    file = tmp_path / "options.json"
    file.write_text(json.dumps({"epochs": 7, "lr": 0.2}))
    layered = _config(DistillConfig, ["distill", "--preset", "mnist-1k", "--config", str(file), "--lr", "0.3"])
    assert (layered.epochs, layered.lr, layered.batch_size) == (7, 0.3, 32)  # file > preset; CLI > file
    assert _config(DistillConfig, ["distill"]).epochs != 160  # no preset: the defaults


def test_a_config_never_shares_the_presets_dictionaries():
    config = _config(DistillConfig, ["distill", "--preset", "mnist-1k"])
    config.data_options["image_size"] = 28
    config.student_options["width"] = 8
    assert MNIST_1K.common["data_options"]["image_size"] == 14
    assert MNIST_1K.commands["distill"]["student_options"]["width"] == 2


def test_unknown_preset_is_one_line_and_presets_are_listed(capsys):
    assert dfa_main(["distill", "--preset", "nope", "--method", "vanilla"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'; available: mnist-1k" in err and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_values("nope", "distill", DistillConfig)
    assert dfa_main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mnist-1k: ") and "distill: --student resnet8 --student-options width=2 --epochs 160" in out


def test_key_value_options_read_exponent_numbers_as_numbers():
    """YAML 1.1 reads ``1e5`` as a string; ``--distill-config lr=1e5`` means a number."""
    from dfa_ext.cli import _parse_key_value

    assert _parse_key_value("lr=1e5") == ("lr", 1e5)
    assert _parse_key_value("gamma-fd=3e-4") == ("gamma_fd", 3e-4)
    assert _parse_key_value("name=abc") == ("name", "abc")
    assert _parse_key_value("lr=nan") == ("lr", "nan")  # refused later as not a number
