"""The ``dfa`` command end to end: the demo pipeline at a tiny size, ``distill`` and ``evaluate``,
and the one-line errors a user can cause."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from dfa_ext import models
from dfa_ext.cli import main as dfa_main
from dfa_ext.data import load_data
from dfa_ext.training import model_from_checkpoint
from dfa_ext.training.checkpoint import model_record, save_checkpoint

METHODS = ("vanilla", "kd", "ofd", "dfa")
TINY_DEMO = ["--teacher", "resnet14", "--teacher-epochs", "1", "--search-config", "steps_per_group=3", "warmup_steps=1",
             "--distill-epochs", "1", "--seeds", "0", "1", "--no-progress", "--no-tensorboard"]
DEMO_DATA = {"test_fraction": 0.8, "image_size": 14, "padding": 1}  # the demo's default (mnist-1k) data


def _dfa(*args: str, cwd=None, **options) -> subprocess.CompletedProcess:
    """The console entry point as a user runs it (a fresh process, 2 threads), with every Python
    warning an error (spawned workers included: a normal run prints none); ``options`` go to
    ``subprocess.run`` (e.g. ``preexec_fn``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "error"}
    return subprocess.run([sys.executable, "-m", "dfa_ext", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600, **options)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`dfa demo` on the bundled MNIST digits, every stage at a tiny size, its output in a pipe
    (as under nohup or CI) with the progress reports on."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = _dfa("demo", "--out", str(out), *[arg for arg in TINY_DEMO if arg != "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr and "\r" not in done.stderr + done.stdout, done.stderr[-3000:]
    return out, done.stdout


def test_demo_writes_the_table_of_every_method(demo):
    out, stdout = demo
    for name in ("results.md", "results.csv", "runs.csv", "alpha.png", "teacher/last.pt", "search/search.json"):
        assert (out / name).is_file(), name
    assert (out / "alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table in stdout
    for method in METHODS:
        assert f"| {method} | 2 |" in table
    for other in ("vanilla", "kd", "ofd"):  # DFA against every other method, paired by seed
        assert f"- dfa - {other}: " in table and "(paired over 2 seeds, 95 % CI [" in table
    # one search for both seeds: the table says its ± leaves out the search's variance
    assert "Note: dfa used one search (seed 0) for all 2 stage-2 seeds" in table
    summary = list(csv.DictReader((out / "results.csv").open()))
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [row["method"] for row in summary] == list(METHODS)
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in ("0", "1"))
    for row in summary:  # the summary is the mean and sample std of the runs
        top1 = torch.tensor([float(r["last_top1"]) for r in runs if r["method"] == row["method"]], dtype=torch.float64)
        assert float(row["top1_mean"]) == pytest.approx(top1.mean().item())
        assert float(row["top1_std"]) == pytest.approx(top1.std().item())
    for method in METHODS:
        for seed in (0, 1):
            student = model_from_checkpoint(out / "distill" / method / f"seed{seed}" / "last.pt")
            assert student.model_name == "resnet8"


def test_finished_demo_only_reprints_its_table(demo, tmp_path):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    table = (out / "results.md").read_text()
    again = _dfa("demo", "--out", str(out), *TINY_DEMO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert table in again.stdout and (out / "results.md").read_text() == table  # the seconds too
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} == before  # nothing trained again


def test_evaluate_prints_the_numbers_of_the_checkpoint(demo, capsys):
    out, _ = demo
    checkpoint = out / "distill" / "dfa" / "seed0" / "best.pt"
    assert dfa_main(["evaluate", str(checkpoint), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, test = model_from_checkpoint(checkpoint), load_data("mnist", **DEMO_DATA).test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([int(test[i][1]) for i in range(len(test))])
    with torch.no_grad():
        logits = model(images)
    assert printed["data"] == "mnist" and printed["samples"] == 4000 and printed["kind"] == "distill"
    # The command evaluates in batches of 512 in the layout of its choice, this test in one batch:
    # the logits may differ by float32 rounding (a few u of their size, far below 1e-4 of it), so a
    # sample whose k-th and (k+1)-th logits lie that close may be counted differently (none here,
    # as a rule); the loss, a float32 mean of 4000 positive terms either way, within 1e-5 (~170 u).
    top = logits.topk(6, 1).values
    for k, key in ((1, "top1"), (5, "top5")):
        ties = int(((top[:, k - 1] - top[:, k]) <= 1e-4 * top.abs().amax(1)).sum())
        mine = 100.0 * (logits.topk(k, 1).indices == labels[:, None]).any(1).double().mean().item()
        assert abs(printed[key] - mine) <= 100.0 * ties / len(labels) + 1e-9, (key, printed[key], mine, ties)
    assert printed["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert dfa_main(["evaluate", str(out / "teacher" / "last.pt")]) == 0
    assert "top-1" in capsys.readouterr().out
    assert dfa_main(["evaluate", str(out / "search" / "last.pt"), "--json"]) == 0  # the search's student
    assert json.loads(capsys.readouterr().out)["model"] == "resnet8"


def _teacher(tmp_path, name, arch="resnet20", in_channels=1):
    model = models.create(arch, num_classes=10, in_channels=in_channels)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, {"kind": "teacher", "model": model_record(model, arch, 10, in_channels)})
    return str(path)


def test_distill_command_and_its_user_errors(demo, tmp_path, capsys):
    out, _ = demo
    teacher, aggregation = str(out / "teacher" / "last.pt"), str(out / "search" / "search.json")
    # The demo's MNIST teacher on the 8x8 digits keeps these runs short; it is refused unless asked for.
    run = ["distill", "--data", "digits", "--epochs", "1", "--no-progress", "--no-tensorboard", "--no-check-teacher-data"]
    assert dfa_main([*run, "--teacher", teacher, "--aggregation", aggregation, "--out", str(tmp_path / "ok")]) == 0
    assert "distill dfa: resnet8 on digits: best test top-1" in capsys.readouterr().out
    checked = [a for a in run if a != "--no-check-teacher-data"]
    code = dfa_main([*checked, "--method", "kd", "--teacher", teacher, "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on 'mnist' (14px images); this run uses 'digits' (8px)" in err, err
    code = dfa_main([*checked, "--data", "mnist", "--data-options", "image_size=14", "--method", "kd", "--teacher",
                     teacher, "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err  # the demo's split holds 4,000 test digits; the default split trains on 3,000 of them
    assert code == 2 and "was trained on another train/test split" in err and err.count("\n") == 1, err
    relabelled = tmp_path / "search_on_digits.json"
    relabelled.write_text(json.dumps({**json.loads(open(aggregation).read()), "data": "digits"}))
    code = dfa_main([*checked, "--data", "mnist", "--data-options", "test_fraction=0.8", "image_size=14", "padding=1",
                     "--teacher", teacher, "--aggregation", str(relabelled),
                     "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "was searched on 'digits'; this run uses 'mnist'" in err and err.count("\n") == 1, err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 100)
    wrong_channels = _teacher(tmp_path, "rgb", in_channels=3)
    cases = [
        (["--teacher", str(tmp_path / "missing.pt"), "--aggregation", aggregation], "checkpoint not found"),
        (["--teacher", teacher, "--aggregation", str(tmp_path / "missing.json")], "search result not found"),
        (["--teacher", teacher, "--aggregation", aggregation, "--student", "mobilenet"], "unknown model 'mobilenet'"),
        (["--teacher", teacher, "--aggregation", aggregation, "--student", "torchvision:resnet18"], "cannot pair"),
        (["--teacher", _teacher(tmp_path, "deep", "resnet20"), "--aggregation", aggregation],
         "was made for a teacher"),
        (["--teacher", str(broken), "--aggregation", aggregation], "corrupt"),
        (["--teacher", wrong_channels, "--method", "kd"], "3 input channels"),
        (["--method", "kd"], "teacher is required"),
        (["--teacher", teacher], "aggregation is required"),
    ]
    for argv, message in cases:
        code = dfa_main([*run, "--out", str(tmp_path / "bad"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    for argv, message in [([str(broken)], "corrupt"), ([str(tmp_path / "none.pt")], "checkpoint not found"),
                          ([teacher, "--data", "imagefolder", "--data-dir", str(tmp_path / "no")], "no")]:
        code = dfa_main(["evaluate", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


# Errors a user can make on the demo's command line, and a piece of what must be said. Every one is
# refused before a stage starts (hours of training in the real regime): argparse's errors end with a
# line naming the option, the demo's own are one line.
DEMO_USER_ERRORS = [
    (["--seeds"], "dfa demo: error: argument --seeds: expected at least one argument"),
    (["--seeds", "0", "0"], "dfa: error: seeds must name at least one seed, each once, got [0, 0]"),
    (["--methods", "vanilla", "magic"], "dfa demo: error: argument --methods: invalid choice: 'magic'"),
    (["--teacher-epochs", "0"], "dfa: error: teacher_epochs must be a positive integer, got 0"),
    (["--workers", "-1"], "dfa: error: workers must be >= 0, got -1"),
    (["--data", "nosuch"], "dfa: error: unknown dataset 'nosuch'"),
    (["--teacher", "resnet9"], "dfa: error: model 'resnet9': a CIFAR ResNet needs depth = 6n + 2"),
    (["--student", "resnet9"], "dfa: error: model 'resnet9': a CIFAR ResNet needs depth = 6n + 2"),
    (["--student-options", "width=0"], "dfa: error: model 'resnet8': width must be a positive int"),
    (["--teacher-config", "lr=-1"], "dfa: error: --teacher-config: lr must be >= 0, got -1.0"),
    (["--search-config", "bogus=1"], "dfa: error: --search-config: unknown option 'bogus'; known options: "),
    (["--search-config", "val_fraction=1.5"], "dfa: error: --search-config: val_fraction must be in (0, 1), got 1.5"),
    (["--distill-config", "kd_weight=2"], "dfa: error: --distill-config: kd_weight must be in [0, 1], got 2"),
    (["--distill-config", "method=kd"], "dfa: error: --distill-config: method cannot be set here"),
    (["--distill-config", "seed=3"], "dfa: error: --distill-config: seed cannot be set here"),
    (["--search-config", "out=x"], "dfa: error: --search-config: out cannot be set here"),
]


def _versions(folder) -> dict:
    """(inode, mtime, size) of every file: an atomic rewrite shows as a new inode."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_demo_user_errors_are_refused_before_anything_is_written(demo, tmp_path, capsys):
    out, _ = demo
    before = _versions(out)
    for argv, message in DEMO_USER_ERRORS:
        for folder in (out, tmp_path / "new"):  # a finished demo's folder, and a folder not yet made
            try:
                code = dfa_main(["demo", "--out", str(folder), *TINY_DEMO, *argv])
            except SystemExit as exit_:  # argparse
                code = exit_.code
            err = capsys.readouterr().err
            assert code == 2 and err.splitlines()[-1].startswith(message), (argv, err)
            if message.startswith("dfa: error:"):
                assert err.count("\n") == 1, (argv, err)
            assert not (tmp_path / "new").exists(), argv
            assert _versions(out) == before, argv


def test_user_error_from_the_real_entry_point_has_no_traceback(tmp_path):
    done = _dfa("distill", "--teacher", str(tmp_path / "missing.pt"), "--method", "kd", "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("dfa: error: checkpoint not found") and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["distill", "evaluate", "demo"])
def test_help_explains_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        dfa_main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--config FILE" in text
    if command != "evaluate":
        assert "--seed" in text and "(default: 0)" in text
    assert text.count("(default:") >= 5
