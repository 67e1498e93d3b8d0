"""The search output file (dfa_ext.search.result) and its picture (dfa_ext.search.plot)."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from dfa_ext.errors import ConfigError
from dfa_ext.models import create
from dfa_ext.search.plot import TRAJECTORY_COLUMNS, plot_alpha, read_trajectory
from dfa_ext.search.result import (FORMAT, SearchResult, file_sha256,
                                   load_search_result, save_search_result)

INPUT_SHAPE = (1, 28, 28)
RESNET20_LAYERS = [[f"group{g}.block{b}" for b in range(3)] for g in range(3)]
TEACHER = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "kwargs": {},
           "checkpoint": "runs/teacher/best.pt", "sha256": "ab" * 32}


def make_result(betas=None, layers=RESNET20_LAYERS, searched=(True, True, True)) -> SearchResult:
    if betas is None:
        betas = [torch.tensor([0.5, -1.25, 2.0]), torch.tensor([0.0, 0.0, 0.0]),
                 torch.tensor([3.0, 1.0, -0.5])]
    return SearchResult.from_betas(betas, layers, searched, teacher=dict(TEACHER), student="resnet8",
                                   data="mnist", settings={"steps": 300, "lr": 3e-4, "groups": (0, 1)},
                                   seconds=12.5)


def numpy_softmax(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def resnet20():
    return create("resnet20", 10, 1)


# ---- the result and its file --------------------------------------------------------------------

def test_alpha_is_the_softmax_of_beta():
    betas = [torch.tensor([0.3, -2.0, 1.7, 0.01]), torch.tensor([5.0]), torch.tensor([-30.0, 30.0])]
    layers = [["a", "b", "c", "d"], ["e"], ["f", "g"]]
    result = make_result(betas, layers, (True, False, True))
    for group, beta in zip(result.groups, betas):
        # float64 softmax of K <= 4 entries, numpy's vs torch's: each is within ~(K + 2) u = 7e-16 of
        # the exact value (exp within 1 ulp, a K-term sum, a division), so they differ by < 1.4e-15
        np.testing.assert_allclose(group.alpha, numpy_softmax(beta.double().numpy()), rtol=0, atol=1e-14)
        assert math.isclose(sum(group.alpha), 1.0, abs_tol=1e-12)
        assert group.beta == tuple(beta.double().tolist())  # float32 values kept exactly
    assert [g.searched for g in result.groups] == [True, False, True]
    assert [g.index for g in result.groups] == [0, 1, 2]
    assert result.groups[1].alpha == (1.0,)
    for got, beta in zip(result.betas(), betas):
        assert got.dtype == torch.float32 and torch.equal(got, beta)
    for got, group in zip(result.alphas(), result.groups):
        assert got.dtype == torch.float32 and got.shape == (len(group.teacher_layers),)
        torch.testing.assert_close(got, torch.tensor(numpy_softmax(group.beta), dtype=torch.float32))


def test_save_then_load_gives_the_same_result(tmp_path):
    result = make_result()
    path = tmp_path / "search.json"
    save_search_result(path, result)
    record = json.loads(path.read_text())
    assert record["format"] == FORMAT
    assert path.read_text().startswith("{\n  ")  # pretty, for people
    loaded = load_search_result(path)
    assert loaded == result
    assert loaded.settings["groups"] == [0, 1]  # JSON-normalised at construction, so equality holds


def test_save_is_atomic_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "out" / "search.json"
    save_search_result(path, make_result(searched=(False, False, False)))
    save_search_result(path, make_result())
    assert sorted(p.name for p in path.parent.iterdir()) == ["search.json"]  # no temp files left
    assert all(g.searched for g in load_search_result(path).groups)


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    data = bytes(range(256)) * 10_000  # spans several read chunks
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_from_betas_refuses_bad_arguments():
    with pytest.raises(ValueError, match="one of each per group"):
        make_result(searched=(True, True))
    with pytest.raises(ValueError, match="1-D"):
        make_result(betas=[torch.zeros(3, 1), torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match="non-finite"):
        make_result(betas=[torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match="3 teacher layers"):
        make_result(betas=[torch.zeros(2), torch.zeros(3), torch.zeros(3)])


def _edit(record: dict, edit: str) -> None:
    """Damages a saved record in one way (the cases of test_load_refuses_a_bad_file)."""
    group = record["groups"][1]
    if edit == "wrong format":
        record["format"] = "dfa_ext.checkpoint/1"
    elif edit == "no format":
        del record["format"]
    elif edit == "no student":
        del record["student"]
    elif edit == "no group beta":
        del group["beta"]
    elif edit == "string beta":
        group["beta"][0] = "0.5"
    elif edit == "bool beta":
        group["beta"][0] = True
    elif edit == "nan beta":
        group["beta"][0] = float("nan")
    elif edit == "infinite beta":
        group["beta"][0] = float("inf")
    elif edit == "short beta":
        group["beta"].pop()
    elif edit == "wrong alpha":
        group["alpha"][0] += 1e-5
        group["alpha"][1] -= 1e-5  # still sums to 1: the check is against softmax, not the sum
    elif edit == "swapped groups":
        record["groups"].reverse()
    elif edit == "skipped index":
        record["groups"][2]["index"] = 3
    else:
        raise AssertionError(edit)


@pytest.mark.parametrize("edit, message", [
    ("wrong format", "is not a dfa_ext search result (format 'dfa_ext.checkpoint/1'"),
    ("no format", "is not a dfa_ext search result (format None"),
    ("no student", "lacks the keys ['student']"),
    ("no group beta", "groups[1] lacks the keys ['beta']"),
    ("string beta", "group 1: beta must be a list of numbers"),
    ("bool beta", "group 1: beta must be a list of numbers"),
    ("nan beta", "group 1: beta has a non-finite value"),
    ("infinite beta", "group 1: beta has a non-finite value"),
    ("short beta", "group 1: beta has 2 and alpha 3 values but the group has 3 teacher layers"),
    ("wrong alpha", "group 1: alpha is not softmax(beta) (off by 1e-05 > 1e-06)"),
    ("swapped groups", "group indices must be 0..2 in order, got [2, 1, 0]"),
    ("skipped index", "group indices must be 0..2 in order, got [0, 1, 3]"),
])
def test_load_refuses_a_bad_file(tmp_path, edit, message):
    path = tmp_path / "search.json"
    save_search_result(path, make_result())
    record = json.loads(path.read_text())
    _edit(record, edit)
    path.write_text(json.dumps(record))  # NaN/Infinity written as the JSON extensions Python reads
    with pytest.raises(ConfigError) as caught:
        load_search_result(path)
    text = str(caught.value)
    assert message in text and str(path) in text and "\n" not in text


def test_load_accepts_alpha_within_the_tolerance(tmp_path):
    path = tmp_path / "search.json"
    save_search_result(path, make_result())
    record = json.loads(path.read_text())
    record["groups"][0]["alpha"][0] += 5e-7
    path.write_text(json.dumps(record))
    assert load_search_result(path).groups[0].alpha[0] == record["groups"][0]["alpha"][0]


def test_load_refuses_a_missing_or_non_json_file(tmp_path):
    with pytest.raises(ConfigError, match="search result not found: .*nothing.json"):
        load_search_result(tmp_path / "nothing.json")
    path = tmp_path / "search.json"
    path.write_text('{"format": "dfa_ext.search/1", "groups": [')
    with pytest.raises(ConfigError, match="search.json is not a JSON file"):
        load_search_result(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="search.json is not a JSON file"):
        load_search_result(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a dfa_ext search result"):
        load_search_result(path)


# ---- the file belongs to its teacher ------------------------------------------------------------

def test_load_accepts_the_teacher_it_was_made_for(tmp_path, resnet20):
    path = tmp_path / "search.json"
    save_search_result(path, make_result())
    assert load_search_result(path, teacher=resnet20, input_shape=INPUT_SHAPE) == make_result()


@pytest.mark.parametrize("other, counts", [("resnet8", [1, 1, 1]), ("wrn_16_2", [2, 2, 2])])
def test_load_refuses_another_teacher(tmp_path, other, counts):
    path = tmp_path / "search.json"
    save_search_result(path, make_result())
    with pytest.raises(ConfigError) as caught:
        load_search_result(path, teacher=create(other, 10, 1), input_shape=INPUT_SHAPE)
    assert str(caught.value) == (f"{path} was made for a teacher with 3 groups of [3, 3, 3] layers; "
                                 f"this teacher has 3 groups of {counts} layers")


def test_load_refuses_a_teacher_with_other_layer_names(tmp_path, resnet20):
    layers = [list(names) for names in RESNET20_LAYERS]
    layers[2][1] = "group2.other"
    path = tmp_path / "search.json"
    save_search_result(path, make_result(layers=layers))
    with pytest.raises(ConfigError, match=r"group 2 has the layers .*'group2.other'.*this teacher's has"):
        load_search_result(path, teacher=resnet20, input_shape=INPUT_SHAPE)


def test_teacher_check_needs_the_input_shape(tmp_path, resnet20):
    path = tmp_path / "search.json"
    save_search_result(path, make_result())
    with pytest.raises(TypeError, match="both"):
        load_search_result(path, teacher=resnet20)


# ---- trajectory and picture ---------------------------------------------------------------------

def write_trajectory(path, result: SearchResult, steps_per_group: int = 20) -> list[dict]:
    """Searches the groups one after another (as the searcher does); alpha drifts towards the final."""
    rows, step = [], 0
    for group in result.groups:
        if not group.searched:
            continue
        for s in range(steps_per_group):
            step += 1
            beta = [b * (s + 1) / steps_per_group for b in group.beta]
            alpha = numpy_softmax(beta)
            rows += [{"step": step, "group": group.index, "layer": j, "name": name,
                      "beta": beta[j], "alpha": float(alpha[j])}
                     for j, name in enumerate(group.teacher_layers)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TRAJECTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_read_trajectory_round_trip(tmp_path):
    path = tmp_path / "trajectory.csv"
    rows = write_trajectory(path, make_result())
    read = read_trajectory(path)
    assert read == rows  # repr of a float round-trips through CSV exactly
    assert [type(read[0][c]) for c in TRAJECTORY_COLUMNS] == [int, int, int, str, float, float]


def test_read_trajectory_refuses_a_bad_file(tmp_path):
    path = tmp_path / "trajectory.csv"
    with pytest.raises(ConfigError, match="trajectory file not found"):
        read_trajectory(path)
    path.write_text("step,group,layer,name,beta\n1,0,0,a,0.5\n")
    with pytest.raises(ConfigError, match=r"lacks the trajectory columns \['alpha'\]"):
        read_trajectory(path)
    path.write_text("step,group,layer,name,beta,alpha\n1,0,0,a,0.5,0.3\n2,0,x,a,0.5,0.3\n")
    with pytest.raises(ConfigError, match="line 3: bad trajectory row"):
        read_trajectory(path)


def assert_png(path, min_size=(600, 300)) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert image.size[0] <= 4000 and image.size[1] <= 4000
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix != ".csv") == [path.name]


def test_plot_alpha_of_a_full_search(tmp_path):
    result = make_result()
    rows = write_trajectory(tmp_path / "trajectory.csv", result)
    plot_alpha(result, rows, tmp_path / "alpha.png")
    assert_png(tmp_path / "alpha.png")


def test_plot_alpha_with_unsearched_groups_and_uneven_layers(tmp_path):
    result = make_result([torch.tensor([1.0, 0.0]), torch.zeros(4), torch.tensor([0.7])],
                         [["a", "b"], ["c", "d", "e", "f"], ["g"]], (True, False, True))
    rows = write_trajectory(tmp_path / "trajectory.csv", result)
    plot_alpha(result, rows, tmp_path / "alpha.png")
    assert_png(tmp_path / "alpha.png")
    single = make_result([torch.zeros(3)], RESNET20_LAYERS[:1], (False,))
    plot_alpha(single, [], tmp_path / "alpha.png")  # one group, nothing searched, no rows
    assert_png(tmp_path / "alpha.png", min_size=(600, 250))
