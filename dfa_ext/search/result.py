"""The search output file: per teacher group, the layer names, beta and alpha = softmax(beta).

Stage 1 (the search) writes it with :func:`save_search_result`; stage 2 (distillation) reads it
with :func:`load_search_result`, which refuses a damaged file or one made for another teacher
with a one-line :class:`ConfigError`. The file is pretty JSON so a person can read the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import reference
from ..errors import ConfigError
from ..models import probe_groups
from ..training.checkpoint import atomic_write_text

FORMAT = "dfa_ext.search/1"
ALPHA_TOLERANCE = 1e-6  # |alpha - softmax(beta)| allowed in a file (JSON floats round-trip exactly)
TEACHER_KEYS = ("model", "num_classes", "in_channels", "kwargs", "checkpoint", "sha256")
_RESULT_KEYS = ("teacher", "student", "data", "groups", "settings", "seconds")
_GROUP_KEYS = ("index", "teacher_layers", "beta", "alpha", "searched")


def softmax(beta: Sequence[float]) -> tuple[float, ...]:
    """alpha = softmax(beta) over the K layers of a group, computed in float64."""
    return tuple(reference.alpha(torch.tensor(beta, dtype=torch.float64), torch.float64).tolist())


def _numbers(values: Any, what: str) -> tuple[float, ...]:
    # bool is an int subclass: refuse it explicitly so `true` is not read as 1.0
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} must be a list of numbers, got {values!r:.80}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} has a non-finite value: {list(values)!r:.80}")
    return tuple(float(v) for v in values)


def _json_copy(value: Any, what: str) -> Any:
    # Normalise through JSON (tuples -> lists) so a result equals its reloaded self, and fail
    # here rather than at save time when something is not JSON-friendly.
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} is not JSON-friendly: {error}") from None


@dataclass(frozen=True)
class GroupAggregation:
    """The mixing weights of teacher group ``index``: K layers, K betas, K alphas.

    Construction checks the invariants (K >= 1, same K everywhere, finite beta, alpha =
    softmax(beta)) and raises ``ValueError``; sequences are stored as tuples of floats.
    """

    index: int
    teacher_layers: tuple[str, ...]
    beta: tuple[float, ...]
    alpha: tuple[float, ...]
    searched: bool  # False: the group was not searched, beta is still its initial value

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise ValueError(f"group index must be an int >= 0, got {self.index!r}")
        where = f"group {self.index}"
        layers = self.teacher_layers
        if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"{where}: teacher_layers must be a non-empty list of names, got {layers!r:.80}")
        beta = _numbers(self.beta, f"{where}: beta")
        alpha = _numbers(self.alpha, f"{where}: alpha")
        k = len(layers)
        if len(beta) != k or len(alpha) != k:
            raise ValueError(f"{where}: beta has {len(beta)} and alpha {len(alpha)} values "
                             f"but the group has {k} teacher layers")
        expected = softmax(beta)
        worst = max(abs(a - e) for a, e in zip(alpha, expected))
        if worst > ALPHA_TOLERANCE:
            raise ValueError(f"{where}: alpha is not softmax(beta) (off by {worst:.3g} > "
                             f"{ALPHA_TOLERANCE:g}): alpha {list(alpha)}, softmax(beta) {list(expected)}")
        if not isinstance(self.searched, bool):
            raise ValueError(f"{where}: searched must be true or false, got {self.searched!r}")
        object.__setattr__(self, "teacher_layers", tuple(layers))  # frozen: only way to normalise
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "alpha", alpha)


@dataclass(frozen=True)
class SearchResult:
    """What stage 1 found: one :class:`GroupAggregation` per teacher group, plus provenance.

    ``teacher`` = {"model", "num_classes", "in_channels", "kwargs", "checkpoint" (path str),
    "sha256" (hex digest of the checkpoint file)}; ``settings`` is the search configuration;
    ``seconds`` the search wall time. Construction checks the invariants (``ValueError``).
    """

    teacher: dict
    student: str
    data: str
    groups: tuple[GroupAggregation, ...]
    settings: dict
    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, dict) or any(k not in self.teacher for k in TEACHER_KEYS):
            raise ValueError(f"teacher must be a dict with keys {list(TEACHER_KEYS)}, "
                             f"got {self.teacher!r:.120}")
        for field in ("student", "data"):
            if not isinstance(getattr(self, field), str):
                raise ValueError(f"{field} must be a string, got {getattr(self, field)!r:.80}")
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must be a dict, got {self.settings!r:.80}")
        seconds = _numbers([self.seconds], "seconds")[0]
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        groups = tuple(self.groups)
        if not groups or not all(isinstance(g, GroupAggregation) for g in groups):
            raise ValueError("groups must be a non-empty list of GroupAggregation")
        indices = [g.index for g in groups]
        if indices != list(range(len(groups))):
            raise ValueError(f"group indices must be 0..{len(groups) - 1} in order, got {indices}")
        object.__setattr__(self, "teacher", _json_copy(self.teacher, "teacher"))
        object.__setattr__(self, "settings", _json_copy(self.settings, "settings"))
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "seconds", seconds)

    def betas(self) -> list[Tensor]:
        """One float32 tensor [K_i] of architecture parameters per group."""
        return [torch.tensor(g.beta, dtype=torch.float32) for g in self.groups]

    def alphas(self) -> list[Tensor]:
        """One float32 tensor [K_i] of mixing weights (summing to 1) per group."""
        return [torch.tensor(g.alpha, dtype=torch.float32) for g in self.groups]

    def layer_counts(self) -> list[int]:
        """[K_0, ..., K_{G-1}]."""
        return [len(g.teacher_layers) for g in self.groups]

    @classmethod
    def from_betas(cls, betas: Sequence[Tensor], layer_names: Sequence[Sequence[str]],
                   searched: Sequence[bool], **fields: Any) -> "SearchResult":
        """Builds the result from the searched betas (one tensor [K_i] per group, any device).

        ``fields`` are the other constructor arguments (teacher, student, data, settings,
        seconds). alpha is softmax(beta) in float64 so the file is exact to ~1e-16.
        """
        if not len(betas) == len(layer_names) == len(searched):
            raise ValueError(f"got {len(betas)} betas, {len(layer_names)} layer-name lists and "
                             f"{len(searched)} searched flags; need one of each per group")
        groups = []
        for i, (beta, names, done) in enumerate(zip(betas, layer_names, searched)):
            beta = torch.as_tensor(beta).detach()
            if beta.dim() != 1:
                raise ValueError(f"group {i}: beta must be 1-D [K], got shape {tuple(beta.shape)}")
            values = beta.to("cpu", torch.float64).tolist()
            groups.append(GroupAggregation(i, tuple(names), tuple(values), softmax(values), bool(done)))
        return cls(groups=tuple(groups), **fields)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (ties a search result to one teacher checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_search_result(path: str | os.PathLike, result: SearchResult) -> None:
    """Writes ``result`` atomically as pretty JSON tagged ``"format": FORMAT``."""
    record = {"format": FORMAT, **asdict(result)}
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def load_search_result(path: str | os.PathLike, *, teacher: nn.Module | None = None,
                       input_shape: tuple[int, int, int] | None = None) -> SearchResult:
    """Reads and checks a file written by :func:`save_search_result`.

    With ``teacher`` (a TappedNetwork) and ``input_shape`` = (C, H, W), also checks that the file
    was made for a teacher with the same groups: same count, same K and layer names per group.

    Raises:
        ConfigError: the file is missing, not JSON, not of this format, incomplete,
            inconsistent, or made for another teacher.
    """
    if (teacher is None) != (input_shape is None):
        raise TypeError("pass both teacher and input_shape, or neither")
    result = _read(Path(path))
    if teacher is not None:
        check_teacher(result, teacher, input_shape, path)
    return result


def _read(path: Path) -> SearchResult:
    if not path.is_file():
        raise ConfigError(f"search result not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ConfigError(f"{path} is not a JSON file: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ConfigError(f"{path} is not a dfa_ext search result (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in _RESULT_KEYS if k not in record]
    if missing:
        raise ConfigError(f"{path} lacks the keys {missing}")
    try:
        if not isinstance(record["groups"], list):
            raise ValueError(f"groups must be a list, got {record['groups']!r:.80}")
        groups = []
        for position, group in enumerate(record["groups"]):
            if not isinstance(group, dict):
                raise ValueError(f"groups[{position}] must be an object, got {group!r:.80}")
            lacking = [k for k in _GROUP_KEYS if k not in group]
            if lacking:
                raise ValueError(f"groups[{position}] lacks the keys {lacking}")
            groups.append(GroupAggregation(**{k: group[k] for k in _GROUP_KEYS}))
        return SearchResult(groups=tuple(groups), **{k: record[k] for k in _RESULT_KEYS if k != "groups"})
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None


def check_teacher(result: SearchResult, teacher: nn.Module, input_shape: tuple[int, int, int],
                   path: str | os.PathLike) -> None:
    shapes = probe_groups(teacher, input_shape)
    mine, theirs = result.layer_counts(), [len(s.names) for s in shapes]
    if mine != theirs:
        raise ConfigError(f"{path} was made for a teacher with {len(mine)} groups of {mine} layers; "
                          f"this teacher has {len(theirs)} groups of {theirs} layers")
    for group, shape in zip(result.groups, shapes):
        if group.teacher_layers != tuple(shape.names):
            raise ConfigError(f"{path} was made for a teacher whose group {group.index} has the layers "
                              f"{list(group.teacher_layers)}; this teacher's has {list(shape.names)}")
