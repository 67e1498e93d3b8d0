"""Turns Ctrl-C / SIGTERM into a request to stop at the next step boundary.

The training loop checks :attr:`InterruptGuard.requested` after each optimiser step, saves a
checkpoint there and stops, so no half-applied step is ever saved. A second signal aborts at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

import torch
from types import FrameType

from ..errors import DfaError
from .distributed import DistContext


class TrainingInterrupted(DfaError):
    """Training stopped on request; ``checkpoint`` is the file a rerun resumes from."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__(f"interrupted; progress saved to {checkpoint}; run the same command again to resume")
        self.checkpoint = checkpoint


class InterruptGuard:
    """Context manager that records SIGINT/SIGTERM instead of raising (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.requested = False
        self.on_signal = on_signal  # called first with each signal (e.g. to pass it on to workers)
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.on_signal is not None:
            self.on_signal(signum)
        if self.requested:  # second signal: the user really wants out now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


# Under several processes the processes agree on stopping every this many steps: each agreement is
# an all-reduce read on the host, which would stall a GPU pipeline if it ran every step.
STOP_CHECK_EVERY = 10


def stop_requested(guard: InterruptGuard, dist: DistContext, step: int) -> bool:
    """Whether any process got a stop signal; all processes must stop at the same step, so under
    several processes the answer can only be yes at multiples of ``STOP_CHECK_EVERY``."""
    if not dist.active:
        return guard.requested
    if step % STOP_CHECK_EVERY:
        return False
    return bool(dist.all_reduce_sum(torch.tensor([float(guard.requested)])).item() > 0)
