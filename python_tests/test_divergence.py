"""Divergence: NaN and infinite losses, gradients and betas stop a run (or skip its steps) before
any non-finite state is saved, in every trainer and through the command."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from dfa_ext.cli import main as dfa_main
from dfa_ext.errors import TrainingDiverged
from dfa_ext.search import Architect, run_search
from dfa_ext.training import TeacherConfig, load_checkpoint
from dfa_ext.training.finite import FiniteGuard
from dfa_ext.training.loop import fit
from dfa_ext.training.teacher import ClassifierTask
from dfa_ext import models
from test_search import search_config, teacher_checkpoint  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = torch.tensor(math.nan)


def finite(value: float = 1.0) -> torch.Tensor:
    return torch.tensor(value)


# ---- the guard ---------------------------------------------------------------------------------

def test_stop_mode_reports_the_first_bad_step_its_terms_and_learning_rate():
    guard = FiniteGuard("stop", 3, torch.device("cpu"))
    for step in range(1, 8):
        terms = {"ce": NAN if step == 5 else finite(), "kd": torch.tensor(math.inf) if step == 6 else finite()}
        assert guard.observe(step, 0.1 * step, terms)  # records only: never a decision (no host sync)
    with pytest.raises(TrainingDiverged, match=r"at step 5: non-finite ce \(learning rate 0\.5\)") as error:
        guard.check()
    assert error.value.step == 5 and "kd" not in str(error.value)


def test_stop_mode_passes_finite_steps_and_restarts_its_record_at_each_check():
    guard = FiniteGuard("stop", 3, torch.device("cpu"))
    for step in range(1, 21):
        guard.observe(step, 0.1, {"ce": finite(step)})
        if step % 10 == 0:
            guard.check()
    guard.observe(21, 0.1, {"ce": finite(), "gradient norm": NAN})  # a new term: the old record is settled
    with pytest.raises(TrainingDiverged, match="step 21: non-finite gradient norm"):
        guard.check()


def test_skip_mode_drops_bad_steps_and_stops_after_the_limit_in_a_row():
    guard = FiniteGuard("skip", 3, torch.device("cpu"))
    pattern = [True, False, False, True, False, False]  # finite?
    decisions = [guard.observe(step, 0.1, {"ce": finite() if ok else NAN}) for step, ok in enumerate(pattern, 1)]
    assert decisions == pattern and guard.skipped == 4
    restored = FiniteGuard("skip", 3, torch.device("cpu"))
    restored.load_state_dict(guard.state_dict())  # a resumed run continues the count and the run
    with pytest.raises(TrainingDiverged, match="step 7: 3 non-finite steps in a row, the last in ce"):
        restored.observe(7, 0.1, {"ce": NAN})
    assert restored.skipped == 5
    assert FiniteGuard("skip", 3, torch.device("cpu")).observe(7, 0.1, {"ce": NAN}) is False  # a fresh run: 1 in a row


def test_loss_scaling_skips_are_not_divergence_until_the_limit_in_a_row():
    """Under fp16 the gradient scaler drops overflowing steps itself: only a long run of them stops."""
    guard = FiniteGuard("stop", 3, torch.device("cpu"), loss_scaling=True)
    for step in range(1, 11):
        assert guard.observe(step, 0.1, {"ce": NAN if step in (2, 5, 6, 9, 10) else finite()})
    guard.check()  # isolated and paired non-finite steps: normal under loss scaling
    assert guard.skipped == 5
    guard.observe(11, 0.1, {"ce": NAN})  # the run 9, 10, 11 crosses the check: still counted
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row under fp16"):
        guard.check()


def test_a_state_holding_a_non_finite_tensor_is_refused():
    guard = FiniteGuard("stop", 3, torch.device("cpu"))
    good = {"weights": {"w": torch.ones(3)}, "steps": torch.tensor([1, 2]), "lr": math.nan}
    guard.check_state(good, "last.pt")  # integer tensors and plain numbers are not weights
    guard.saved = "last.pt holds the state after step 10"
    bad = {"weights": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([1.0, math.inf])}}}}
    with pytest.raises(TrainingDiverged, match=r"optimizer\.state\.0\.momentum_buffer; last.pt was not overwritten "
                                                r"\(last.pt holds the state after step 10\)"):
        guard.check_state(bad, "last.pt")


# ---- the trainers ------------------------------------------------------------------------------

def tiny(tmp_path, name="run", **overrides) -> TeacherConfig:
    """resnet8 on the 8x8 digits, batch 64: 22 steps per epoch."""
    settings = dict(model="resnet8", data="digits", epochs=1, batch_size=64, lr=0.05, seed=3, progress=False,
                    tensorboard=False, out=str(tmp_path / name))
    settings.update(overrides)
    return TeacherConfig(**settings)


class PoisonedTask(ClassifierTask):
    """A classifier whose loss is NaN at the chosen (1-based) training steps."""

    def __init__(self, config: TeacherConfig, poisoned: set[int]) -> None:
        spec = config.load(config.seed).spec
        torch.manual_seed(config.seed)
        model = models.create(config.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
        super().__init__(model, {"name": config.model, "num_classes": spec.num_classes,
                                 "in_channels": spec.in_channels, "kwargs": {}})
        self.poisoned, self.calls = poisoned, 0

    def forward(self, images, labels):
        logits, losses = super().forward(images, labels)
        self.calls += 1
        if self.calls in self.poisoned:
            losses = {"ce": losses["ce"] * math.nan}
        return logits, losses


def run_fit(config: TeacherConfig, task: ClassifierTask, on_step=None):
    return fit(task, config.load(config.seed), config, config.out, kind="teacher", signature={"test": "divergence"},
               on_step=on_step)


def run_recording_weights(config: TeacherConfig, task: ClassifierTask):
    """Runs ``task``; returns the result, ``same(a, b)`` (whether the weights after steps a and b
    are equal) and the weights after every step."""
    weights = {}

    def record(step):
        weights[step] = [p.detach().clone() for p in task.classifier.parameters()]

    result = run_fit(config, task, on_step=record)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(weights[a], weights[b]))

    return result, same, weights


def test_a_diverged_run_stops_and_its_checkpoint_keeps_the_last_finite_state(tmp_path):
    config = tiny(tmp_path, checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match="at step 13: non-finite ce") as error:
        run_fit(config, PoisonedTask(config, {13}))
    assert f"{tmp_path / 'run' / 'last.pt'} holds the state after step 10" in str(error.value)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"]["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "best.pt").exists()  # never evaluated, never "best"


def test_skip_drops_exactly_the_bad_steps_and_counts_them(tmp_path):
    config = tiny(tmp_path, on_nonfinite="skip")
    result, same, _ = run_recording_weights(config, PoisonedTask(config, {7, 8}))

    assert same(6, 7) and same(7, 8) and not same(8, 9) and not same(5, 6)
    header, values = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    metrics = dict(zip(header, values))
    assert float(metrics["skipped_steps"]) == 2.0 and math.isfinite(float(metrics["train_ce"]))
    assert load_checkpoint(result.last_path)["nonfinite"] == {"skipped": 2, "run": 0}


def test_skip_stops_after_the_limit_of_bad_steps_in_a_row(tmp_path):
    config = tiny(tmp_path, on_nonfinite="skip", max_consecutive_skips=3)
    with pytest.raises(TrainingDiverged, match="at step 7: 3 non-finite steps in a row"):
        run_fit(config, PoisonedTask(config, set(range(5, 23))))


def test_weights_spoilt_without_a_bad_loss_are_never_saved(tmp_path):
    """The last line of defence: whatever made them non-finite, such weights are not written."""
    config = tiny(tmp_path, on_nonfinite="skip", max_consecutive_skips=100, checkpoint_every=5)
    task = PoisonedTask(config, set())

    def spoil(step):
        if step == 12:
            with torch.no_grad():
                next(task.classifier.parameters()).fill_(math.nan)

    with pytest.raises(TrainingDiverged, match=r"non-finite values in weights\.classifier\..*was not overwritten"):
        run_fit(config, task, on_step=spoil)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 10


def test_command_from_the_issue_exits_3_in_one_line_and_keeps_the_earlier_checkpoint(tmp_path, capsys):
    out = tmp_path / "teacher"
    common = ["train-teacher", "--data", "digits", "--model", "resnet8", "--out", str(out), "--no-progress",
              "--no-tensorboard"]
    assert dfa_main(common + ["--epochs", "1"]) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    capsys.readouterr()
    assert dfa_main(common + ["--epochs", "2", "--lr", "1e5"]) == 3  # resumes, then diverges in epoch 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dfa: error: training diverged at step ")
    assert "learning rate" in err and f"{out / 'last.pt'} holds the state after step 11" in err
    assert {name: (out / name).read_bytes() for name in before} == before


def poison_beta_gradient(monkeypatch, call: int) -> None:
    """The architect's ``call``-th beta gradient becomes NaN."""
    real, calls = Architect.gradient, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        grad = real(self, *args, **kwargs)
        return grad * math.nan if len(calls) == call else grad

    monkeypatch.setattr(Architect, "gradient", poisoned)


def test_search_stops_on_a_non_finite_beta_gradient(tmp_path, teacher_checkpoint, monkeypatch):
    poison_beta_gradient(monkeypatch, 3)
    with pytest.raises(TrainingDiverged, match=r"at step 3: non-finite beta gradient \(learning rate 0\.05\)"):
        run_search(search_config(tmp_path, teacher_checkpoint, warmup_steps=0, checkpoint_every=2))
    assert load_checkpoint(tmp_path / "search" / "last.pt")["step"] == 2


def test_search_skips_a_non_finite_beta_gradient_and_the_weights_still_learn(tmp_path, teacher_checkpoint, monkeypatch):
    poison_beta_gradient(monkeypatch, 3)
    run_search(search_config(tmp_path, teacher_checkpoint, warmup_steps=0, on_nonfinite="skip"))
    rows = list(csv.DictReader(open(tmp_path / "search" / "alpha_trajectory.csv")))
    beta = {(int(r["step"]), int(r["layer"])): float(r["beta"]) for r in rows if r["group"] == "0"}
    assert beta[3, 0] == beta[2, 0] and beta[4, 0] != beta[3, 0] and beta[2, 0] != beta[1, 0]
    state = load_checkpoint(tmp_path / "search" / "last.pt")
    assert state["nonfinite"] == [{"skipped": 1, "run": 0}, {"skipped": 0, "run": 0}]


def test_distill_and_demo_stop_on_divergence_with_status_3(tmp_path, capsys):
    common = ["--data", "digits", "--student", "resnet8", "--no-progress", "--no-tensorboard"]
    assert dfa_main(["distill", "--method", "vanilla", "--epochs", "1", "--lr", "1e5", "--out",
                     str(tmp_path / "distill"), *common]) == 3
    assert dfa_main(["demo", "--methods", "vanilla", "--seeds", "0", "1", "--workers", "2", "--distill-epochs", "1",
                     "--distill-config", "lr=1e5", "--out", str(tmp_path / "demo"),
                     "--data-options", *common]) == 3  # no data options: the preset's are for mnist
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("dfa: error: training diverged at step ") for line in err)


# ---- a finite loss with a non-finite gradient ---------------------------------------------------

class PoisonedGradientTask(PoisonedTask):
    """A classifier whose loss stays finite at every step, but whose gradient of one weight (the
    first convolution's) is NaN at the chosen (1-based) training steps: only the gradient norm
    the guard observes can tell."""

    def __init__(self, config: TeacherConfig, poisoned: set[int]) -> None:
        super().__init__(config, set())  # the loss is never poisoned
        self.gradient_poisoned = poisoned
        first = next(self.classifier.parameters())
        first.register_hook(lambda grad: grad * math.nan if self.calls in self.gradient_poisoned else grad)

    def forward(self, images, labels):
        logits, losses = super().forward(images, labels)
        if self.calls in self.gradient_poisoned:  # the loss of that step alone cannot tell
            assert all(torch.isfinite(v).all() for v in losses.values())
        return logits, losses


def test_stop_mode_stops_at_the_step_of_a_non_finite_gradient_under_a_finite_loss(tmp_path):
    """Exists for a guard that does not observe the gradient norm: a finite loss with a NaN
    gradient would then apply a NaN update, and the run would only stop a step later on the NaN
    loss that update causes (``at step 14: non-finite ce``). Checked to fail with that bug planted
    (``"gradient norm": norm`` dropped from the terms the loop hands ``nonfinite.observe`` in
    dfa_ext/training/loop.py; also ``allow(None)`` for ``allow(norm)`` in optim_step.py)."""
    config = tiny(tmp_path, checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match=r"at step 13: non-finite gradient norm \(learning rate") as error:
        run_fit(config, PoisonedGradientTask(config, {13}))
    assert f"{tmp_path / 'run' / 'last.pt'} holds the state after step 10" in str(error.value)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"]["state_dict"].values() if v.is_floating_point())


def test_skip_mode_drops_exactly_the_update_of_a_non_finite_gradient_under_a_finite_loss(tmp_path):
    """Exists for a guard that does not observe the gradient norm: in skip mode the NaN update of
    step 9 would then be applied, and the run would stop three steps later (the NaN losses it
    causes, three in a row). Checked to fail with that bug planted (``"gradient norm": norm``
    dropped from the terms the loop hands ``nonfinite.observe`` in dfa_ext/training/loop.py; also
    ``allow(None)`` for ``allow(norm)`` in optim_step.py)."""
    config = tiny(tmp_path, on_nonfinite="skip", max_consecutive_skips=3)
    result, same, weights = run_recording_weights(config, PoisonedGradientTask(config, {9}))

    assert same(8, 9)  # step 9's update dropped ...
    assert not same(7, 8) and not same(9, 10)  # ... and only that one
    assert all(torch.isfinite(w).all() for w in weights[max(weights)])
    assert max(weights) == 22  # the run finished its epoch
    metrics = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))[-1]
    assert float(metrics["skipped_steps"]) == 1.0 and math.isfinite(float(metrics["train_ce"]))
    state = load_checkpoint(result.last_path)
    assert state["nonfinite"] == {"skipped": 1, "run": 0}
    assert all(torch.isfinite(v).all() for v in state["model"]["state_dict"].values() if v.is_floating_point())
