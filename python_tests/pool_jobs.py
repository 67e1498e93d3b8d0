"""Jobs for the run-pool tests: module-level functions, so spawned worker processes can import them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from dfa_ext.training.interrupt import InterruptGuard, TrainingInterrupted


def square(x: int) -> tuple[int, int, int]:
    """x squared, the worker's pid and its intra-op thread count."""
    return x * x, os.getpid(), torch.get_num_threads()


def fail(message: str) -> None:
    raise ValueError(message)


def wait_for_a_stop(folder: str) -> None:
    """Stands for a training run: announces itself, then runs until a stop signal, saves, raises."""
    Path(folder, f"started-{os.getpid()}").touch()
    with InterruptGuard() as guard:
        deadline = time.monotonic() + 120
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)
    Path(folder, f"saved-{os.getpid()}").touch()
    raise TrainingInterrupted(str(Path(folder, f"saved-{os.getpid()}")))
