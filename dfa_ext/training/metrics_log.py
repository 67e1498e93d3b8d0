"""Per-epoch metrics: a CSV file (always) and TensorBoard scalars (when installed)."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Mapping

from .checkpoint import atomic_write_text


class MetricsLog:
    """Appends one row per epoch to ``<out>/metrics.csv``; mirrors it to TensorBoard.

    Args:
        out_dir: run folder.
        start_epoch: the epoch a resumed run starts at; rows of later epochs (written after the
            last checkpoint of the interrupted run) are dropped so each epoch appears once.
        tensorboard: True (require it), False (off) or None (use it when installed).
        enabled: False on non-main processes.
    """

    def __init__(self, out_dir: str | os.PathLike, *, start_epoch: int = 0,
                 tensorboard: bool | None = None, enabled: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.csv"
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        self._rows = self._read_rows(start_epoch)
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise
            else:
                self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_epoch)

    def _read_rows(self, start_epoch: int) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return [row for row in csv.DictReader(handle) if int(row.get("epoch", 0)) < start_epoch]

    def log(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Records the metrics of ``epoch`` (0-based) and rewrites the CSV atomically."""
        if not self.enabled:
            return
        row = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
        self._rows.append(row)
        columns: list[str] = []
        for r in self._rows:
            columns += [c for c in r if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(self.path, buffer.getvalue())
        if self._writer is not None:
            for key, value in metrics.items():
                if not math.isnan(float(value)):  # e.g. test metrics of an epoch not evaluated
                    self._writer.add_scalar(key, float(value), epoch)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
