"""The alpha picture of a search: final alpha per group and layer, and alpha over the steps.

Uses :class:`matplotlib.figure.Figure` with the Agg canvas directly, never pyplot: no global
state, no display, safe to call from any thread.
"""

from __future__ import annotations

import csv
import os
from io import BytesIO
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import ConfigError
from ..training.checkpoint import atomic_write_bytes
from .result import SearchResult

# Long format, one row per (step, layer) of the group searched at that step; step is the global
# step (1-based), group and layer are 0-based.
TRAJECTORY_COLUMNS = ("step", "group", "layer", "name", "beta", "alpha")
_TYPES = {"step": int, "group": int, "layer": int, "name": str, "beta": float, "alpha": float}


def read_trajectory(path: str | os.PathLike) -> list[dict]:
    """Rows of a trajectory CSV with typed values (ints for step/group/layer, floats for beta/alpha).

    Raises:
        ConfigError: the file is missing, lacks a column, or holds a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trajectory file not found: {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in TRAJECTORY_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ConfigError(f"{path} lacks the trajectory columns {missing}")
        rows = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            try:
                rows.append({c: _TYPES[c](row[c]) for c in TRAJECTORY_COLUMNS})
            except (TypeError, ValueError):
                raise ConfigError(f"{path} line {line}: bad trajectory row {row}") from None
    return rows


def plot_alpha(result: SearchResult, trajectory: Sequence[dict], path: str | os.PathLike,
               *, dpi: int = 110) -> None:
    """Writes a PNG: left a heat map of the final alpha [group, layer], right alpha over steps.

    ``trajectory`` holds rows as from :func:`read_trajectory`; a group without rows (never
    searched) shows its final alpha as flat lines and a note. Written atomically.
    """
    num_groups = len(result.groups)
    fig = Figure(figsize=(12, max(3.6, 2.3 * num_groups)), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas to this figure only (no pyplot backend switch)
    grid = fig.add_gridspec(num_groups, 2, width_ratios=(1, 1.15))
    _heat_map(fig.add_subplot(grid[:, 0]), result)
    axes = [fig.add_subplot(grid[i, 1]) for i in range(num_groups)]
    for ax, group in zip(axes, result.groups):
        _trajectory_panel(ax, group, [r for r in trajectory if r["group"] == group.index])
    axes[-1].set_xlabel("step")
    fig.suptitle(f"DFA search: {result.teacher.get('model', '?')} -> {result.student} on {result.data}")
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))


def _heat_map(ax, result: SearchResult) -> None:
    counts = result.layer_counts()
    values = np.full((len(counts), max(counts)), np.nan)  # groups differ in K: pad, then mask
    for i, group in enumerate(result.groups):
        values[i, :len(group.alpha)] = group.alpha
    cmap = colormaps["viridis"].with_extremes(bad="0.92")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):  # dark text on the light (high) end of viridis
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(values.shape[1]), [f"layer {j}" for j in range(values.shape[1])],
                  rotation=45 if values.shape[1] > 4 else 0)
    ax.set_yticks(range(len(counts)), [f"group {g.index}" + ("" if g.searched else "\n(not searched)")
                                       for g in result.groups])
    ax.set_title("final alpha")
    ax.figure.colorbar(image, ax=ax, label="alpha", shrink=0.8)


def _trajectory_panel(ax, group, rows: list[dict]) -> None:
    k = len(group.alpha)
    for layer, name in enumerate(group.teacher_layers):
        points = sorted((r["step"], r["alpha"]) for r in rows if r["layer"] == layer)
        if points:
            steps, alphas = zip(*points)
            ax.plot(steps, alphas, label=name, linewidth=1.2)
        else:  # never searched: nothing moved, so show where alpha sits
            ax.axhline(group.alpha[layer], label=name, linewidth=1.2, linestyle="--",
                       color=f"C{layer % 10}")
    if rows:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    else:
        ax.text(0.5, 0.5, "not searched" if not group.searched else "no trajectory rows",
                transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_xticks([])  # no steps to show
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"alpha, group {group.index}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + (k > 6), frameon=False)
