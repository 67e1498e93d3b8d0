"""The alpha trajectory of a search: beta and alpha of the searched group after every step."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import torch

from .. import reference
from ..training.checkpoint import atomic_write_text
from .plot import TRAJECTORY_COLUMNS


class AlphaTrajectory:
    """Rows ``step, group, layer, name, beta, alpha`` (see :mod:`dfa_ext.search.plot`).

    ``record`` keeps beta on its device; ``flush`` turns what was recorded into rows with one
    device-to-host copy, so a GPU search is not synchronised at every step.
    """

    def __init__(self, layer_names: Sequence[Sequence[str]], rows: list[dict] | None = None) -> None:
        self.layer_names = layer_names
        self.rows: list[dict] = list(rows or [])
        self._pending: list[tuple[int, int, torch.Tensor]] = []

    def record(self, step: int, group: int, beta: torch.Tensor) -> None:
        self._pending.append((step, group, beta.detach().clone()))

    def flush(self) -> list[dict]:
        """The rows recorded since the last flush (also appended to ``rows``)."""
        if not self._pending:
            return []
        betas = torch.cat([b for _, _, b in self._pending]).double().cpu().split(
            [b.numel() for _, _, b in self._pending])
        new = []
        for (step, group, _), beta in zip(self._pending, betas):
            alpha = reference.alpha(beta, torch.float64)
            new += [{"step": step, "group": group, "layer": j, "name": self.layer_names[group][j],
                     "beta": b, "alpha": a} for j, (b, a) in enumerate(zip(beta.tolist(), alpha.tolist()))]
        self._pending.clear()
        self.rows += new
        return new

    def write_csv(self, path: str | Path) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=TRAJECTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(path, buffer.getvalue())
