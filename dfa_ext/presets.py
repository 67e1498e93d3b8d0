"""Named sets of option values (``--preset NAME``): a regime measured to work, reachable in one word.

A preset gives values to some options of some commands; the layers are, in increasing priority:
the defaults, the preset, the ``--config`` file, the command line. ``dfa presets`` lists them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """``common`` applies to every command that has the option; ``commands`` to one command each."""

    name: str
    summary: str
    common: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)

    def values(self, command: str, fields: set[str]) -> dict[str, Any]:
        """The preset's values for ``command`` among the option names ``fields``."""
        merged = {**self.common, **self.commands.get(command, {})}
        return {k: copy.deepcopy(v) for k, v in merged.items() if k in fields}  # a config never aliases the preset


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def preset_values(name: str, command: str, cls: type) -> dict[str, Any]:
    """The values preset ``name`` gives the options of ``cls`` (the config class of ``command``),
    e.g. ``DistillConfig(**preset_values("mnist-1k", "distill", DistillConfig), teacher=...)``."""
    import dataclasses

    return get_preset(name).values(command, {f.name for f in dataclasses.fields(cls)})


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS)) or 'none'}") from None


# The regime of the study in bench/RESULTS.md: a student small enough to need the teacher, trained
# to convergence, and fast enough on two CPU cores for five seeds of every method.
_STUDENT = {"student": "resnet8", "student_options": {"width": 2}}
MNIST_1K = register(Preset(
    name="mnist-1k",
    summary="1,000 training / 4,000 test MNIST digits at 14x14; ResNet-20 teacher, ResNet-8 width-2 student "
            "(the dfa demo's regime)",
    common={"data": "mnist", "data_options": {"test_fraction": 0.8, "image_size": 14, "padding": 1}},
    commands={
        "train-teacher": {"model": "resnet20", "epochs": 60, "lr": 0.1, "batch_size": 64, "eval_every": 10},
        "search": {**_STUDENT},
        "distill": {**_STUDENT, "epochs": 160, "lr": 0.1, "batch_size": 32, "eval_every": 10},
    },
))
