"""A user's own teacher, student, data and loop: the Python entries take modules and plain datasets,
record what they really used, refuse another run's folder, leave the caller's RNG alone; the CLI
names a network by import path, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dfa_ext import AggregationSearch, SearchConfig, run_distill, run_search, train_teacher
from dfa_ext.distill import DistillConfig
from dfa_ext.errors import CheckpointError, ConfigError
from dfa_ext.models import HookedNetwork
from dfa_ext.search.architect import Architect
from dfa_ext.training import model_from_checkpoint
from dfa_ext.training.checkpoint import load_checkpoint
from dfa_ext.training.teacher import TeacherConfig
from dfa_helpers import assert_top1_near_ties

pytestmark = pytest.mark.usefixtures("one_thread")

# The networks of a user's package: written to a file so the CLI can import them by path.
NETS = textwrap.dedent('''
    import torch
    from torch import nn
    from dfa_ext.models import HookedNetwork


    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)))


    class SmallCNN(nn.Module):
        def __init__(self, width, depth, num_classes=10, in_channels=1):
            super().__init__()
            self.stage1 = nn.Sequential(Block(in_channels, width), *(Block(width, width) for _ in range(depth - 1)))
            self.stage2 = nn.Sequential(Block(width, 2 * width, 2),
                                        *(Block(2 * width, 2 * width) for _ in range(depth - 1)))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

        def forward(self, x):
            return self.head(self.stage2(self.stage1(x)))


    def head(model, h):
        return model.head(h)


    def cnn(width=8, depth=1, num_classes=10, in_channels=1):
        net = SmallCNN(width, depth, num_classes, in_channels)
        groups = [[f"{s}.{i}" for i in range(depth)] for s in ("stage1", "stage2")]
        return HookedNetwork(net, groups, stages=["stage1", "stage2"], head=head)
''')


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_package")
    (folder / "user_nets.py").write_text(NETS)
    sys.path.insert(0, str(folder))
    try:
        import user_nets
        yield folder, user_nets
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("user_nets", None)


def _digits(n_train=256, n_test=128, seed=0):
    """Random 8x8 one-channel images whose class is readable (a per-class mean pattern + noise)."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 8, 8, generator=generator)
    labels = torch.arange(n_train + n_test) % 10
    images = patterns[labels] + 0.5 * torch.randn(n_train + n_test, 1, 8, 8, generator=generator)
    return (TensorDataset(images[:n_train], labels[:n_train]), TensorDataset(images[n_train:], labels[n_train:]))


@pytest.fixture(scope="module")
def trained_teacher(nets, tmp_path_factory):
    """A teacher module of the user's own, trained by train_teacher from a plain dataset."""
    _, user_nets = nets
    torch.manual_seed(0)
    teacher = user_nets.cnn(width=8, depth=3)
    out = tmp_path_factory.mktemp("teacher")
    train_teacher(TeacherConfig(epochs=2, batch_size=32, lr=0.05, out=str(out), progress=False, tensorboard=False),
                  model=teacher, data=_digits())
    return teacher.eval(), out


def _search_config(out, **more):
    return SearchConfig(out=str(out), steps_per_group=4, warmup_steps=1, batch_size=32, progress=False,
                        tensorboard=False, **more)


def test_search_takes_a_student_module_and_a_plain_dataset_and_records_them(nets, trained_teacher, tmp_path):
    _, user_nets = nets
    teacher, _ = trained_teacher
    torch.manual_seed(1)
    student = user_nets.SmallCNN(4, 1)  # a plain module: wrapped below, its checkpoint cannot rebuild it
    tapped = HookedNetwork(student, [["stage1.0"], ["stage2.0"]], stages=["stage1", "stage2"], head=user_nets.head)
    before = {k: v.clone() for k, v in tapped.state_dict().items()}
    result = run_search(_search_config(tmp_path / "search"), teacher=teacher, student=tapped, data=_digits()[0])
    # the search trained a copy: the caller's student is as it was
    assert all(torch.equal(before[k], v) for k, v in tapped.state_dict().items())
    assert [len(g.alpha) for g in result.groups] == [3, 3]
    record = json.loads((tmp_path / "search" / "search.json").read_text())
    # what was really used, not the config's defaults ("mnist", augment true): trap 5
    assert record["data"] == "custom" and record["settings"]["augment"] is None
    assert record["student"].endswith("user_nets.SmallCNN") and record["settings"]["student"] == record["student"]
    # stage 2 takes the result as it is (no file path to rebuild)
    distilled = run_distill(DistillConfig(method="dfa", aggregation=result, epochs=1, batch_size=32,
                                          out=str(tmp_path / "distill"), progress=False, tensorboard=False),
                            teacher=teacher, student=user_nets.cnn(4, 1), data=_digits())
    config_json = json.loads((tmp_path / "distill" / "config.json").read_text())
    assert config_json["aggregation"] == "the SearchResult given in Python" and config_json["data"] == "custom"
    assert [g["beta"] for g in load_checkpoint(distilled.last_path)["signature"]["aggregation"]] == \
        [list(map(float, torch.tensor(g.beta).float())) for g in result.groups]
    # the student given in the config works the same (trap 1: was a raw TypeError)
    again = run_search(_search_config(tmp_path / "search2", student=tapped), teacher=teacher, data=_digits()[0])
    assert [g.beta for g in again.groups] == [g.beta for g in result.groups]


def test_a_finished_search_is_not_reused_for_another_teacher_or_student(nets, trained_teacher, tmp_path):
    """Trap 5: the same folder with a different in-memory teacher returned the old alpha."""
    _, user_nets = nets
    teacher, _ = trained_teacher
    data = _digits()[0]
    run_search(_search_config(tmp_path), teacher=teacher, student=user_nets.cnn(4, 1), data=data)
    other = user_nets.cnn(width=8, depth=3)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="different run.*teacher_weights"):
        run_search(_search_config(tmp_path), teacher=other, student=user_nets.cnn(4, 1), data=data)
    with pytest.raises(CheckpointError, match="different run.*student_structure"):
        run_search(_search_config(tmp_path), teacher=teacher, student=user_nets.cnn(6, 1), data=data)
    run_search(_search_config(tmp_path), teacher=teacher, student=user_nets.cnn(4, 1), data=data)  # the same run


def test_the_trainers_leave_the_callers_rng_as_it_was(nets, trained_teacher, tmp_path):
    """Trap 5: run_search reseeded the caller's global torch RNG (and numpy's, random's)."""
    import random

    _, user_nets = nets
    teacher, _ = trained_teacher
    students, data = [user_nets.cnn(4, 1) for _ in range(2)], _digits()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    want = torch.rand(3), np.random.rand(), random.random()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    run_search(_search_config(tmp_path / "s"), teacher=teacher, student=students[0], data=data[0])
    run_distill(DistillConfig(method="ofd", epochs=1, batch_size=32, out=str(tmp_path / "d"), progress=False,
                              tensorboard=False), teacher=teacher, student=students[1], data=data)
    got = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_distill_trains_a_student_module_in_place_and_its_checkpoint_says_how_to_reload_it(nets, trained_teacher,
                                                                                          tmp_path):
    _, user_nets = nets
    teacher, _ = trained_teacher
    torch.manual_seed(2)
    plain = HookedNetwork(user_nets.SmallCNN(4, 1), [["stage1.0"], ["stage2.0"]], stages=["stage1", "stage2"],
                          head=user_nets.head)
    config = DistillConfig(method="ofd", epochs=1, batch_size=32, out=str(tmp_path / "plain"), progress=False,
                           tensorboard=False)
    result = run_distill(config, teacher=teacher, student=plain, data=_digits())
    state = load_checkpoint(result.last_path)
    assert state["model"]["name"] is None and state["model"]["class"].endswith("user_nets.SmallCNN")
    for key, value in plain.state_dict().items():  # trained in place: the module holds the last weights
        assert torch.equal(state["model"]["state_dict"][key], value), key
    with pytest.raises(CheckpointError, match=r"given as a module.*load checkpoint\['model'\]\['state_dict'\]"):
        model_from_checkpoint(result.last_path)
    # built by create() from an import path: the checkpoint rebuilds it (resume, evaluate, teach in turn)
    from dfa_ext.models import create

    named = create("user_nets:cnn", num_classes=10, in_channels=1, width=4, depth=1)
    config.out = str(tmp_path / "named")
    result = run_distill(config, teacher=teacher, student=named, data=_digits())
    rebuilt = model_from_checkpoint(result.last_path)
    assert type(rebuilt.model) is type(named.model) and rebuilt.group_names() == named.group_names()
    for key, value in named.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    from dfa_ext.training.evaluate_checkpoint import EvaluateConfig, evaluate_checkpoint

    with pytest.raises(ConfigError, match="trained on your own data .'custom'., which the command cannot load"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=str(result.last_path)))
    assert evaluate_checkpoint(EvaluateConfig(checkpoint=str(result.last_path), data="digits"))["samples"] > 0


def test_search_and_distill_refuse_a_module_given_twice_and_a_student_of_another_type(nets, trained_teacher, tmp_path):
    _, user_nets = nets
    teacher, _ = trained_teacher
    student = user_nets.cnn(4, 1)
    with pytest.raises(ConfigError, match="student is given twice"):
        run_search(_search_config(tmp_path, student=student), teacher=teacher, student=student, data=_digits()[0])
    with pytest.raises(ConfigError, match="student must be a network name"):
        run_search(_search_config(tmp_path, student=3), teacher=teacher, data=_digits()[0])


def test_the_parts_of_the_search_default_to_the_measured_recipe():
    """Trap 2: Architect's default lr was DARTS' 3e-4 while the recipe is 0.01."""
    import inspect

    defaults = SearchConfig()
    params = inspect.signature(Architect).parameters
    assert params["lr"].default == defaults.arch_lr == 1e-2
    assert params["adam_betas"].default == defaults.arch_betas
    assert params["weight_decay"].default == defaults.arch_weight_decay


def test_aggregation_search_in_a_users_loop_is_run_search(nets, trained_teacher, tmp_path):
    """The object a user's loop drives and the command are one implementation: the same batches
    give the same betas, bit for bit (float64)."""
    from dfa_ext.data import as_bundle
    from dfa_ext.data.loader import batch_stream
    from dfa_ext.data.split import split_train_val
    from dfa_ext.training.seeding import seed_everything

    _, user_nets = nets
    teacher, _ = trained_teacher
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            torch.manual_seed(0)
            data = _digits()[0]
            data = TensorDataset(data.tensors[0].double(), data.tensors[1])
            teacher64 = user_nets.cnn(width=8, depth=3)
            teacher64.load_state_dict(teacher.state_dict())
            teacher64.double().eval()
            student = user_nets.cnn(4, 1).double()
            config = _search_config(tmp_path / "cmd")
            want = run_search(config, teacher=teacher64, student=student, data=data)

            seed_everything(config.seed)
            search = AggregationSearch(teacher64, student, (1, 8, 8), config=config)
            train, val = split_train_val(as_bundle(data).train, config.val_fraction, config.seed)
            streams = [batch_stream(d, config.batch_size, seed=config.seed + k) for k, d in ((0, train), (1, val))]
            steps = 0
            while not search.done:
                search.step(next(streams[0]), next(streams[1]))
                steps += 1
        finally:
            torch.set_default_dtype(torch.float32)
    assert steps == 8 and search.config.arch_lr == 1e-2
    assert [g.beta for g in search.result().groups] == [g.beta for g in want.groups]


def test_cli_trains_searches_distils_and_evaluates_networks_named_by_import_path(nets, tmp_path):
    """Trap 8: the CLI and config files accepted only zoo names. The console script, as a user runs
    it from the folder of their module (it is not on sys.path there unless the package adds it)."""
    folder, _ = nets
    dfa = Path(sys.executable).parent / "dfa"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}
    common = ["--data", "digits", "--no-progress", "--no-tensorboard"]

    def run(*args):
        done = subprocess.run([str(dfa), *args, *common[:2]] if args[0] == "evaluate" else [str(dfa), *args, *common],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run("train-teacher", "--model", "user_nets:cnn", "--model-options", "width=8", "depth=3", "--epochs", "2",
        "--batch-size", "64", "--out", str(tmp_path / "teacher"))
    student = ["--student", "user_nets:cnn", "--student-options", "width=4", "depth=1"]
    out = run("search", "--teacher", str(tmp_path / "teacher" / "last.pt"), *student, "--steps-per-group", "4",
              "--warmup-steps", "1", "--out", str(tmp_path / "search"))
    assert "search user_nets:cnn -> user_nets:cnn on digits" in out
    run("distill", "--teacher", str(tmp_path / "teacher" / "last.pt"), *student, "--method", "dfa",
        "--aggregation", str(tmp_path / "search" / "search.json"), "--epochs", "1", "--batch-size", "64",
        "--out", str(tmp_path / "distill"))
    out = run("evaluate", str(tmp_path / "distill" / "best.pt"))
    assert out.startswith("user_nets:cnn (distill checkpoint) on digits test")
    # and the distilled student teaches in turn
    run("distill", "--teacher", str(tmp_path / "distill" / "best.pt"), *student, "--method", "kd", "--epochs", "1",
        "--batch-size", "64", "--out", str(tmp_path / "again"))


def test_the_epoch_loop_takes_the_users_own_loaders_and_the_search_says_what_it_needs(nets, tmp_path):
    """"Ready DataLoaders for the user who owns the loading": the trainers iterate them epoch by
    epoch (their sampler gets set_epoch); the search, which splits its data, asks for the dataset."""
    from torch.utils.data import DataLoader, DistributedSampler

    _, user_nets = nets
    train, test = _digits()
    sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0)  # set_epoch -> its order
    loaders = (DataLoader(train, batch_size=32, sampler=sampler), DataLoader(test, batch_size=100))
    config = TeacherConfig(epochs=2, lr=0.05, out=str(tmp_path / "t"), progress=False, tensorboard=False)
    model = user_nets.cnn(width=8, depth=1)
    result = train_teacher(config, model=model, data=loaders)
    assert sampler.epoch == 1 and load_checkpoint(result.last_path)["step"] == 2 * len(loaders[0])
    # the test loader's batches were evaluated as they came: the numbers of a hand computation
    model.eval()
    with torch.no_grad():
        assert_top1_near_ties(model(test.tensors[0]), test.tensors[1], result.last_top1)
    with pytest.raises(ConfigError, match="run_search splits its data .* dfa_ext.AggregationSearch with your own batches"):
        run_search(_search_config(tmp_path / "s"), teacher=model, student=user_nets.cnn(4, 1), data=loaders)
