"""Teacher training end to end on the tiny digits set: files, accuracy, exact resume, the command."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch

from dfa_ext.cli import main as dfa_main
from dfa_ext.errors import CheckpointError, ConfigError
from dfa_ext.training import TeacherConfig, TrainingInterrupted, load_checkpoint, model_from_checkpoint, train_teacher


def tiny(tmp_path, name="run", **overrides) -> TeacherConfig:
    """resnet8 on the 8x8 digits: 1437 training images, 22 steps per epoch."""
    settings = dict(model="resnet8", data="digits", epochs=2, batch_size=64, lr=0.05, seed=11,
                    progress=False, tensorboard=False, out=str(tmp_path / name))
    settings.update(overrides)
    return TeacherConfig(**settings)


def weights(path) -> dict:
    return load_checkpoint(path)["model"]["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run every resume test compares with."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny(tmp)
    return config, train_teacher(config)


def test_training_writes_its_files_and_learns(reference_run):
    config, result = reference_run
    out = result.out_dir
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.csv", "config.json"}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"train_ce", "train_top1", "test_loss", "test_top1", "test_top5", "lr"} <= rows[0].keys()
    assert float(rows[-1]["test_top1"]) == pytest.approx(result.last_top1)
    assert result.best_top1 == max(float(r["test_top1"]) for r in rows)
    assert result.last_top1 > 50.0  # 10 classes: chance is 10%
    assert json.loads((out / "config.json").read_text())["model"] == "resnet8"
    state = load_checkpoint(out / "last.pt", kind="teacher")
    assert state["epoch"] == 2 and state["batch"] == 0 and state["step"] == 44


def test_eval_every_evaluates_every_nth_and_the_last_epoch(tmp_path, reference_run):
    _, reference = reference_run
    result = train_teacher(tiny(tmp_path, epochs=3, eval_every=2))
    rows = list(csv.DictReader(open(result.out_dir / "metrics.csv")))
    tested = [r["test_top1"] != "nan" for r in rows]
    assert tested == [False, True, True]  # epoch 2 (the second) and the last
    assert result.last_top1 == pytest.approx(float(rows[-1]["test_top1"]))
    assert result.best_top1 == max(float(r["test_top1"]) for r in rows if r["test_top1"] != "nan")
    assert all(r["train_ce"] != "nan" for r in rows)  # training metrics of every epoch


def test_checkpoint_rebuilds_the_trained_network(reference_run):
    config, result = reference_run
    from dfa_ext.data import load_data

    model = model_from_checkpoint(result.last_path)
    data = load_data("digits", augment=False)
    images = torch.stack([data.test[i][0] for i in range(len(data.test))])
    labels = torch.tensor([data.test[i][1] for i in range(len(data.test))])
    with torch.no_grad():
        accuracy = 100.0 * (model(images).argmax(1) == labels).sum().item() / len(labels)
    assert accuracy == pytest.approx(result.last_top1, abs=1e-6)


def _interrupt_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:  # a real Ctrl-C, delivered to this process
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


@pytest.mark.parametrize("stop_step", [9, 22, 30])  # mid-epoch 1, the last step of epoch 1, mid-epoch 2
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, reference_run, stop_step):
    config = tiny(tmp_path)
    with pytest.raises(TrainingInterrupted) as stopped:
        train_teacher(config, on_step=_interrupt_at(stop_step))
    state = load_checkpoint(stopped.value.checkpoint)
    assert state["step"] == stop_step
    result = train_teacher(tiny(tmp_path))
    assert_same_weights(weights(result.last_path), weights(reference_run[1].last_path))
    assert result.best_top1 == reference_run[1].best_top1
    rows = list(csv.DictReader(open(result.out_dir / "metrics.csv")))
    reference_rows = list(csv.DictReader(open(reference_run[1].out_dir / "metrics.csv")))
    for row, ref in zip(rows, reference_rows, strict=True):
        for key in ("train_ce", "train_top1", "test_top1", "test_loss"):
            assert float(row[key]) == pytest.approx(float(ref[key]), rel=1e-9), key


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, reference_run):
    """A crash (no chance to save) loses only the steps after the last ``checkpoint_every``."""
    def crash(step):
        if step == 17:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train_teacher(tiny(tmp_path, checkpoint_every=5), on_step=crash)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 15
    result = train_teacher(tiny(tmp_path, checkpoint_every=5))
    assert_same_weights(weights(result.last_path), weights(reference_run[1].last_path))


def test_finished_run_is_not_trained_again(reference_run):
    config, result = reference_run
    again = train_teacher(config, on_step=lambda step: pytest.fail("trained again"))
    assert again.best_top1 == result.best_top1
    assert again.last_top1 == pytest.approx(result.last_top1)


def test_resume_refuses_a_different_run_and_no_resume_protects_old_results(tmp_path, reference_run):
    out = reference_run[1].out_dir
    with pytest.raises(CheckpointError, match="different run.*model"):
        train_teacher(tiny(tmp_path, model="resnet14", out=str(out)))
    with pytest.raises(ConfigError, match="already holds a run"):
        train_teacher(tiny(tmp_path, resume=False, out=str(out)))


def test_seeded_runs_repeat_and_seeds_differ(tmp_path):
    a = train_teacher(tiny(tmp_path, "a", epochs=1))
    b = train_teacher(tiny(tmp_path, "b", epochs=1))
    c = train_teacher(tiny(tmp_path, "c", epochs=1, seed=12))
    assert_same_weights(weights(a.last_path), weights(b.last_path))
    wa, wc = weights(a.last_path), weights(c.last_path)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].is_floating_point())


def test_bf16_autocast_and_step_schedule_train(tmp_path):
    result = train_teacher(tiny(tmp_path, epochs=1, batch_size=256, lr=0.1, amp="bf16", schedule="step", milestones=(0.5,),
                                deterministic=True, grad_clip=5.0))
    assert result.last_top1 > 20.0


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        train_teacher(tiny(tmp_path, epochs=0))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train_teacher(tiny(tmp_path, amp="fp16"))


# ---- the command -------------------------------------------------------------------------------

def test_command_trains_with_a_config_file_and_command_line_overrides(tmp_path, capsys):
    config_file = tmp_path / "teacher.yaml"
    config_file.write_text("model: resnet8\ndata: digits\nepochs: 5\nbatch_size: 128\nlr: 0.05\n")
    out = tmp_path / "cli"
    code = dfa_main(["train-teacher", "--config", str(config_file), "--epochs", "1", "--out", str(out),
                     "--no-progress", "--no-tensorboard", "--milestones", "0.3", "0.6", "--schedule", "step",
                     "--data-options", "test_fraction=0.25", "split_seed=3"])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["batch_size"] == 128 and saved["milestones"] == [0.3, 0.6]
    assert saved["data_options"] == {"test_fraction": 0.25, "split_seed": 3}
    assert "best test top-1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet7"], "resnet7"),
    (["--data", "imagenet22k"], "imagenet22k"),
    (["--data", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--epochs", "0"], "epochs"),
    (["--config", "/nonexistent/c.yaml"], "config file not found"),
])
def test_command_user_errors_are_one_line(tmp_path, capsys, argv, message):
    code = dfa_main(["train-teacher", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("dfa: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_command_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        dfa_main(["train-teacher", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--data-dir", "--epochs", "--lr", "--schedule", "--seed", "--deterministic",
                   "--amp", "--checkpoint-every", "--no-resume", "--tensorboard", "--config"):
        assert option in text
    assert "(default: resnet20)" in text and "(default: cosine)" in text


def test_command_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = dfa_main(["train-teacher", "--data", "digits", "--model", "resnet8", "--no-progress",
                     "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dfa: error:") and str(blocker) in err and err.count("\n") == 1
