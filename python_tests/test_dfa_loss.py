"""DFALoss, the stage-2 feature loss as a module for a user's own loop: the formula written out, every
way to name an aggregation, only the connectors as parameters, one graph under torch.compile, 16-bit
autocast with a float32 teacher, and DistributedDataParallel."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dfa_ext import DFALoss, models
from dfa_ext.errors import ConfigError, ModelError
from dfa_ext.margins import teacher_margins
from dfa_ext.search.result import SearchResult, save_search_result
from dfa_helpers import independent_partial_l2, randomize_bn
from rounding import F64

# float bounds that must hold on any CPU (rounding.py): rerun under a lesser CPU by make test
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.rounding]
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = models.create("resnet20", 10, 1).eval()  # K = 3 layers per group
    randomize_bn(teacher, weight_spread=1.0)  # margins that differ per channel
    student = models.create("resnet8", 10, 1)
    return teacher, student


def _features(teacher, student, dtype=torch.float64, seed=1):
    images = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.no_grad():
        t = teacher.to(dtype)(images, features=True)
    return student.to(dtype).train()(images, features=True), t


def _by_hand(loss, student_out, teacher_out, alphas, layers, margins, weights=(0.25, 0.5, 1.0), gamma=1e-3):
    """gamma_fd * sum_i w_i * mean_b partial_l2, from the formula (method.md section 6), float64."""
    total = 0.0
    for i, w in enumerate(weights):
        maps = [teacher_out.groups[i].layers[j] for j in layers[i]]
        # the loss keeps beta in float32 (as checkpoints do): its alpha is the given one to 1e-7,
        # and the formula is evaluated at the beta it holds
        torch.testing.assert_close(torch.softmax(loss.beta(i).double(), 0),
                                   torch.as_tensor(alphas[i], dtype=torch.float64), rtol=1e-6, atol=1e-7)
        beta = loss.beta(i).double()
        mapped = loss.st_connectors[i](student_out.groups[i].last)
        total = total + w * independent_partial_l2(mapped, maps, beta, margins[i][list(layers[i])]).mean()
    return gamma * total


def _search_result(teacher, alphas):
    names = [p.names for p in models.probe_groups(teacher, SHAPE)]
    betas = [torch.log(torch.tensor(a, dtype=torch.float64)) for a in alphas]
    info = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "kwargs": {}, "checkpoint": "", "sha256": ""}
    return SearchResult.from_betas(betas, names, [True] * 3, teacher=info, student="resnet8", data="digits",
                                   settings={}, seconds=0.0)


SEARCHED = [(0.2, 0.3, 0.5), (0.6, 0.1, 0.3), (0.1, 0.1, 0.8)]
CASES = {  # aggregation -> (alphas, layers) per group
    "ofd": ([(1.0,)] * 3, [(2,)] * 3),
    "uniform": ([(1 / 3,) * 3] * 3, [(0, 1, 2)] * 3),
    "fixed": ([(0.3 / 1.0, 0.7)] * 3, [(1, 2)] * 3),
    "per-group": ([(0.5, 0.5), (1.0,), (0.25, 0.75)], [(0, 1), (2,), (0, 2)]),
    "search result": (SEARCHED, [(0, 1, 2)] * 3),
    "search.json": (SEARCHED, [(0, 1, 2)] * 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_aggregation_gives_the_formula_written_out(nets, case, tmp_path):
    teacher, student = nets
    aggregation = {"ofd": "ofd", "uniform": "uniform", "fixed": [0.0, 0.3, 0.7],
                   "per-group": [[0.5, 0.5, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 3.0]],
                   "search result": _search_result(teacher, SEARCHED)}.get(case)
    if case == "search.json":
        aggregation = tmp_path / "search.json"
        save_search_result(aggregation, _search_result(teacher, SEARCHED))
    torch.manual_seed(5)
    loss = DFALoss(teacher, student, aggregation, input_shape=SHAPE).double()
    student_out, teacher_out = _features(teacher, student)
    alphas, layers = CASES[case]
    margins = [m.double() for m in teacher_margins(teacher, SHAPE)]
    want = _by_hand(loss, student_out, teacher_out, alphas, layers, margins)
    got, terms = loss(student_out, teacher_out, per_group=True)
    # float64 against float64, summed in another order (rounding.F64 derives the bound)
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(sum(terms), got, rtol=1e-12, atol=0)
    # the gradient reaches the student and the connectors, never the teacher
    got.backward()
    assert all(p.grad is not None for p in loss.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    if case == "ofd":  # negative control: the uniform target is another loss, far outside rtol 1e-10
        uniform = DFALoss(teacher, student, "uniform", input_shape=SHAPE).double()
        uniform.load_state_dict({k: v for k, v in loss.state_dict().items() if k.startswith("st_connectors.")},
                                strict=False)
        other = uniform(student_out, teacher_out).detach()
        assert abs(float(other - want.detach())) > 1e-3 * abs(float(want.detach()))


def test_its_parameters_are_the_connectors_only(nets):
    """Trap 3: FeatureDistiller's parameters included the frozen teacher."""
    teacher, student = nets
    loss = DFALoss(teacher, student, "uniform", input_shape=SHAPE)
    assert {id(p) for p in loss.parameters()} == {id(p) for p in loss.st_connectors.parameters()}
    assert not any(k.startswith(("teacher", "student", "classifier")) for k in loss.state_dict())
    assert sorted(k for k in loss.state_dict() if not k.startswith("st_connectors.")) == \
        sorted([f"beta_{i}" for i in range(3)] + [f"margins_{i}" for i in range(3)])


def test_bad_aggregations_and_features_are_refused_in_one_line(nets):
    teacher, student = nets
    with pytest.raises(ConfigError, match="aggregation must be 'ofd'"):
        DFALoss(teacher, student, "dfa", input_shape=SHAPE)
    with pytest.raises(ConfigError, match="gives 2 alpha lists; the teacher has 3"):
        DFALoss(teacher, student, [[1, 2, 3], [1, 2, 3]], input_shape=SHAPE)
    with pytest.raises(ConfigError, match="margin_place"):
        DFALoss(teacher, student, input_shape=SHAPE, margin_place="mixture")
    with pytest.raises(ConfigError, match="not found|cannot"):
        DFALoss(teacher, student, "missing/search.json", input_shape=SHAPE)
    loss = DFALoss(teacher, student, input_shape=SHAPE)
    student_out, teacher_out = _features(teacher, student, torch.float32)
    with pytest.raises(ModelError, match="pairs 3 layer groups; got 2 student"):
        loss(student_out.groups[:2], teacher_out)
    with pytest.raises(TypeError, match="student_features must be what a tapped network returns"):
        loss(student_out.logits, teacher_out)


def test_one_graph_under_torch_compile(nets):
    teacher, student = nets
    teacher, student = teacher.float(), student.float()
    loss = DFALoss(teacher, student, _search_result(teacher, SEARCHED), input_shape=SHAPE)

    def step(images, labels):
        with torch.no_grad():
            t = teacher(images, features=True)
        s = student(images, features=True)
        return F.cross_entropy(s.logits, labels) + loss(s, t)

    torch._dynamo.reset()
    images, labels = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    explanation = torch._dynamo.explain(step)(images, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_autocast_student_meets_a_float32_teacher(nets, dtype):
    """Trap 7: teacher features computed outside autocast met a bf16 student and the op refused them
    ("'student' must have the dtype of the feature maps"); the loss now reconciles the dtypes."""
    teacher, student = nets
    teacher, student = teacher.float(), student.float()
    loss = DFALoss(teacher, student, _search_result(teacher, SEARCHED), input_shape=SHAPE)
    images = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = teacher(images, features=True)  # float32
    student.eval()  # BN in eval mode: the same normalisation in both runs
    with torch.autocast("cpu", dtype):
        s = student(images, features=True)
        assert s.groups[0].last.dtype == dtype
        low = loss(s, t)
    full = loss(student(images, features=True), t)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # 16-bit convolutions in the student and connector: each output carries a relative error of a
    # few units of 2^-9 (bf16) or 2^-12 (fp16); the loss, a mean of squared differences between
    # those maps and the float32 target, moves by a fraction of that (4e-5 and 1e-5 here). 1 % is far
    # above it on any CPU, and far below the factor-of-2 changes of a wrong target or dropped margin.
    assert abs(float(low.detach() - full.detach())) <= 0.01 * float(full.detach())
    low.backward()
    assert all(torch.isfinite(p.grad).all() for p in loss.parameters())


def test_it_trains_under_distributed_data_parallel(nets, tmp_path):
    """Wrapped as a user wraps their student (one process here: the wrapper's hooks and buffer
    broadcast run; the gradient equals the unwrapped loss's)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    teacher, student = nets
    teacher, student = teacher.float(), student.float()
    torch.manual_seed(3)
    loss = DFALoss(teacher, student, "uniform", input_shape=SHAPE)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(loss)
        s, t = _features(teacher, student, torch.float32)
        wrapped(s, t).backward()
        got = [p.grad.clone() for p in loss.parameters()]
        loss.zero_grad()
        s, t = _features(teacher, student, torch.float32)
        loss(s, t).backward()
        for a, b in zip(got, loss.parameters()):
            torch.testing.assert_close(a, b.grad, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_the_distillers_feature_term_is_this_loss(nets):
    """Stage 2 is built on DFALoss: one place for the formula."""
    from dfa_ext.distill import FeatureDistiller, group_targets, stage_weights

    teacher, student = nets
    pairs = models.pair_networks(teacher, student, SHAPE)
    distiller = FeatureDistiller(student, teacher, {"name": "resnet8", "num_classes": 10, "in_channels": 1},
                                 pairs=pairs, targets=group_targets("uniform", pairs),
                                 margins=teacher_margins(teacher, SHAPE), weights=stage_weights(3))
    assert isinstance(distiller.feature_loss, DFALoss)
    images, labels = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    _, losses = distiller.double()(images.double(), labels)
    s, t = distiller.classifier(images.double(), features=True), teacher(images.double(), features=True)
    torch.testing.assert_close(losses["fd"], distiller.feature_loss(s, t), rtol=1e-12, atol=0)
    json.dumps(distiller.aggregation())  # JSON-friendly, as the run signature needs
