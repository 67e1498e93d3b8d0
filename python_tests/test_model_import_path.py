"""create("pkg.module:factory"): networks from the user's own code (dfa_ext.models.import_path)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dfa_ext.errors import ModelError
from dfa_ext.models import CifarResNet, HookedNetwork, create, rebuild_record
from dfa_ext.models.import_path import is_import_path

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "dfa_test_user_models"

SOURCE = '''
import torchvision
from torch import nn

from dfa_ext.models import CifarResNet, create


def full(num_classes, in_channels, depth=8):
    return create(f"resnet{depth}", num_classes=num_classes, in_channels=in_channels)


def bare(width=4):  # takes neither num_classes nor in_channels
    return create("resnet8", width=width)


def via_kwargs(**kwargs):
    return CifarResNet(8, **kwargs)


class SmallNet(CifarResNet):
    def __init__(self, num_classes=10, in_channels=3, depth=8):
        super().__init__(depth, num_classes=num_classes, in_channels=in_channels)


class Zoo:
    class Cifar:
        @staticmethod
        def build(num_classes):
            return create("resnet8", num_classes=num_classes)


def torchvision_resnet(num_classes):
    return torchvision.models.resnet18(num_classes=num_classes)


def plain():
    return nn.Linear(2, 2)


NOT_CALLABLE = 3
'''


def _forget(name: str) -> None:
    sys.modules.pop(name, None)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MODULE, importable from sys.path (tmp_path prepended, restored afterwards)."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    (tmp_path / "dfa_test_broken.py").write_text("import dfa_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MODULE
    _forget(MODULE)
    _forget("dfa_test_broken")


def _image(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))


def test_is_import_path():
    assert is_import_path("pkg.module:factory") and is_import_path("mod:Outer.build")
    for name in ("resnet8", "pkg.module:", ":factory", "pkg module:f", "a:b:c"):
        assert not is_import_path(name)


# trap for every test below: create() only knew zoo names; user networks needed a code change


def test_a_factory_taking_num_classes_and_in_channels(user_module):
    model = create(f"{user_module}:full", num_classes=5, in_channels=1, depth=14)
    assert isinstance(model, CifarResNet) and len(model.groups[0]) == 2  # depth 14: 2 per group
    assert model(_image(1)).shape == (2, 5)
    assert model.model_name == f"{user_module}:full" and model.model_options == {"depth": 14}
    assert rebuild_record(model) == (f"{user_module}:full", {"depth": 14})


def test_a_factory_taking_neither_gets_only_the_options(user_module):
    model = create(f"{user_module}:bare", num_classes=5, in_channels=1, width=8)
    assert model(_image(3)).shape == (2, 10)  # its own defaults: the factory decides
    assert model.stem.conv.out_channels == 8


def test_a_kwargs_factory_gets_num_classes_and_in_channels(user_module):
    model = create(f"{user_module}:via_kwargs", num_classes=4, in_channels=2)
    assert model(_image(2)).shape == (2, 4)


def test_a_class_and_a_dotted_attribute(user_module):
    model = create(f"{user_module}:SmallNet", num_classes=3, depth=14)
    assert type(model).__name__ == "SmallNet" and model(_image()).shape == (2, 3)
    model = create(f"{user_module}:Zoo.Cifar.build", num_classes=6)
    assert model(_image()).shape == (2, 6)


def test_a_torchvision_resnet_is_wrapped(user_module):
    model = create(f"{user_module}:torchvision_resnet", num_classes=7)
    assert isinstance(model, HookedNetwork) and model.num_groups == 4
    with torch.no_grad():
        assert model(_image(), features=True).logits.shape == (2, 7)
    assert rebuild_record(model) == (f"{user_module}:torchvision_resnet", {})


def _one_line_error(name: str, **kwargs) -> str:
    with pytest.raises(ModelError) as info:
        create(name, **kwargs)
    message = str(info.value)
    assert "\n" not in message and name in message
    return message


def test_a_plain_module_is_refused(user_module):
    message = _one_line_error(f"{user_module}:plain")
    assert "returned a Linear" in message
    assert "must return a TappedNetwork, e.g. dfa_ext.models.HookedNetwork(model, groups=" in message


@pytest.mark.parametrize("attribute, kwargs, expected", [
    ("missing", {}, "has no attribute 'missing'"),
    ("Zoo.Missing.build", {}, "'dfa_test_user_models:Zoo' has no attribute 'Missing'"),
    ("NOT_CALLABLE", {}, "is a int, not a function or class"),
    ("bare", {"depth": 3}, "does not take these options"),  # refused before the factory runs
    ("via_kwargs", {"depth": 3}, "raised TypeError"),  # **kwargs passed on to a class
])
def test_bad_attributes_and_options(user_module, attribute, kwargs, expected):
    assert expected in _one_line_error(f"{user_module}:{attribute}", **kwargs)


def test_modules_that_cannot_be_imported(user_module):
    assert "no module named 'dfa_no_such_module_xyz'" in _one_line_error("dfa_no_such_module_xyz:f")
    message = _one_line_error("dfa_test_broken:f")
    assert "importing 'dfa_test_broken' failed" in message
    assert "dfa_no_such_dependency_xyz" in message


def _without_cwd(path: list, cwd: str) -> list:
    return [p for p in path if os.path.realpath(p or os.curdir) != os.path.realpath(cwd)]


def test_a_module_in_the_working_directory_is_found_without_cwd_on_sys_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # trap: the `dfa` console script has no cwd on sys.path (unlike `python -m`), so a model file
    # next to the user was not importable
    name = "dfa_test_cwd_models"
    (tmp_path / f"{name}.py").write_text("from dfa_ext.models import create\n\n"
                                         "def build(num_classes):\n"
                                         "    return create('resnet8', num_classes=num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", _without_cwd(sys.path, str(tmp_path)))
    try:
        model = create(f"{name}:build", num_classes=3)
    finally:
        _forget(name)
    assert model(_image()).shape == (2, 3)
    assert sys.path[-1] == os.getcwd()  # appended, not prepended: installed packages win
    before = list(sys.path)  # cwd is on sys.path now: a missing module adds nothing more
    _one_line_error("dfa_no_such_module_xyz:f")
    assert sys.path == before
