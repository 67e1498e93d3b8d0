"""Divergence: non-finite losses, gradients and states, caught before they reach a checkpoint.

Every trainer hands :class:`FiniteGuard` the named tensors of each step (its loss terms, the
gradient norm, the search's beta). With ``on_nonfinite="stop"`` the guard records on the device
whether and where a value first went non-finite, and the trainer reads that record only where it
synchronises anyway (every :data:`CHECK_EVERY` steps, before every checkpoint and evaluation), so
a GPU is never stalled once per step. With ``"skip"`` the guard reads each step's flag (one host
synchronisation per step, as a gradient scaler does) and the trainer drops that step's update.

Under fp16 loss scaling the scaler already drops steps whose gradients overflow; those skipped
steps are expected, not divergence, so a non-finite loss only counts towards the
``max_consecutive_skips`` limit there. :meth:`FiniteGuard.check_state` is the last line of defence:
no checkpoint holding a non-finite tensor is ever written.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import TrainingDiverged
from .distributed import DistContext, current_context
from .run_options import NONFINITE_CHOICES

# Steps between reads of the device-side record in "stop" mode: a non-finite step is reported at
# most this many steps late, and the weights it spoilt are never saved (the checkpoint reads it first).
CHECK_EVERY = 10

# What to try, by trainer: its learning-rate and clipping options.
HINT = "lower --lr, add --warmup-epochs or --grad-clip, or pass --on-nonfinite skip to drop such steps"
SEARCH_HINT = ("lower --lr or --arch-lr, add --grad-clip or --arch-grad-clip, or pass --on-nonfinite skip "
               "to drop such steps")


class FiniteGuard:
    """Watches the named scalar tensors of each training step for NaN and infinity.

    Args:
        mode: "stop" (raise at the next check) or "skip" (the trainer drops the step's update).
        max_consecutive_skips: raise after this many non-finite steps in a row in "skip" mode
            (and under fp16 loss scaling, whose skipped steps are otherwise normal).
        device: where the record lives (the training device).
        loss_scaling: fp16 with a gradient scaler, which skips overflowing steps itself.
        hint: what to try instead, quoted by the error (the trainer's options).

    ``saved`` says what the last checkpoint holds; the trainer updates it and errors quote it.
    """

    def __init__(self, mode: str, max_consecutive_skips: int, device: torch.device, *,
                 loss_scaling: bool = False, dist: DistContext | None = None, hint: str = HINT) -> None:
        if mode not in NONFINITE_CHOICES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_CHOICES}, got {mode!r}")
        self.mode, self.limit, self.loss_scaling, self.hint = mode, max_consecutive_skips, loss_scaling, hint
        self.dist = dist or current_context()
        self.device = device
        self.saved = "no checkpoint was written yet"  # the trainer says what its last.pt holds
        self._names: tuple[str, ...] = ()
        self._lrs: dict[int, float] = {}  # learning rates of the steps since the last check
        self._reset_record()
        self.step_ok = torch.ones((), dtype=torch.bool, device=device)  # the last observed step was finite
        self.skipped = 0  # steps whose update was dropped (host count; fp16 steps are added at checks)
        self._run = 0     # non-finite steps in a row ("skip" mode, on the host)

    def _reset_record(self) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        # first bad step (-1: none), consecutive bad steps now, longest run, bad steps, per-term flags
        self._first, self._now, self._longest, self._count = zero - 1, zero.clone(), zero.clone(), zero.clone()
        self._flags = torch.zeros(len(self._names), dtype=torch.bool, device=self.device)

    def observe(self, step: int, lr: float, terms: Mapping[str, torch.Tensor | None]) -> bool:
        """Records step ``step`` (1-based: the step about to be applied); returns whether its
        update may be applied (always True in "stop" mode and under loss scaling)."""
        terms = {name: value for name, value in terms.items() if value is not None}
        names = tuple(terms)
        if names != self._names:  # another set of terms (a new group's losses): settle the old record
            self.check()
            self._names = names
            self._reset_record()
        flags = torch.stack([~torch.isfinite(v.detach()).all() for v in terms.values()])
        self.step_ok = ~flags.any()  # on the device: whether this step's numbers may be summed
        if self.mode == "skip" and not self.loss_scaling:
            return self._decide(step, lr, flags)
        self._lrs[step] = lr
        bad = ~self.step_ok
        first = bad & (self._first < 0)
        self._first = torch.where(first, step, self._first)
        self._flags = torch.where(first, flags, self._flags)
        self._now = (self._now + 1) * bad
        self._longest = torch.maximum(self._longest, self._now)
        self._count += bad
        return True

    def _decide(self, step: int, lr: float, flags: torch.Tensor) -> bool:
        """ "skip" mode: one synchronisation (and one all-reduce under several processes)."""
        if self.dist.active:  # every process must drop the same steps
            flags = self.dist.all_reduce_sum(flags.double().cpu()) > 0
        flags = flags.cpu()
        if not flags.any():
            self._run = 0
            return True
        self.skipped, self._run = self.skipped + 1, self._run + 1
        if self._run >= self.limit:
            raise self._error(step, lr, flags.tolist(), f"{self._run} non-finite steps in a row, the last in")
        return False

    def check(self) -> None:
        """Reads the record (a synchronisation): raises :class:`TrainingDiverged` on divergence."""
        error = self.pending()
        if error is not None:
            raise error

    def pending(self) -> TrainingDiverged | None:
        """Reads the record (a synchronisation): the divergence it shows, if any (its ``step``
        says where, so a trainer with several guards can report the earliest)."""
        if self.mode == "skip" and not self.loss_scaling:
            return None  # decided at every step
        record = torch.cat([torch.stack([self._first, self._longest, self._count]).double(),
                            self._flags.double()]).cpu()
        if self.dist.active:  # the earliest bad step of any process; longest run, counts, terms: the most
            record[0] = -record[0] if record[0] >= 0 else -math.inf
            record = self.dist.all_reduce_max(record)
            record[0] = -record[0] if math.isfinite(record[0]) else -1
        first, longest, count = int(record[0]), int(record[1]), int(record[2])
        flags = [bool(f) for f in record[3:]]
        lrs, self._lrs = self._lrs, {}
        if first < 0:
            self._reset_record()
            return None
        lr = lrs.get(first, math.nan)
        if not self.loss_scaling:
            return self._error(first, lr, flags, "non-finite")
        self.skipped += count  # the scaler dropped these steps
        if longest >= self.limit:
            return self._error(first, lr, flags, f"{longest} non-finite steps in a row under fp16 loss scaling, "
                                                 "the first in")
        keep_run = self._now.clone()  # a run still going on continues across checks
        self._reset_record()
        self._now = keep_run
        return None

    def _error(self, step: int, lr: float, flags: list[bool], what: str) -> TrainingDiverged:
        terms = [name for name, bad in zip(self._names, flags) if bad] or ["?"]
        error = TrainingDiverged(f"training diverged at step {step}: {what} {', '.join(terms)} "
                                 f"(learning rate {lr:.4g}); {self.saved}; hint: {self.hint}")
        error.step = step
        return error

    def check_state(self, state: Mapping[str, Any], path: str | os.PathLike) -> None:
        """Refuses to write ``state`` to ``path`` if a tensor in it is not finite, whatever made it so
        (a collective under several processes: every process must call it). Call :meth:`check`
        first, so that a divergence the record shows is reported with its step."""
        bad = nonfinite_entries(state)
        if self.dist.active and self.dist.all_reduce_max(torch.tensor([float(bool(bad))])).item() > 0:
            bad = bad or ["the state of another process"]  # every process stops, not only the one that saw it
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingDiverged(f"training diverged: non-finite values in {shown}; {path} was not "
                                   f"overwritten ({self.saved}); hint: {self.hint}")

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "run": self._run}

    def load_state_dict(self, state: Mapping[str, int] | None) -> None:
        state = state or {}
        self.skipped, self._run = int(state.get("skipped", 0)), int(state.get("run", 0))


def gradient_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
    """The 2-norm of all gradients, on their device (no synchronisation); None without gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Keys (``a.b.0``) of the floating-point tensors in a nested state that hold NaN or infinity."""
    if isinstance(state, torch.Tensor):
        return [prefix or "tensor"] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, Mapping):
        items: Iterable = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [bad for key, value in items for bad in nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))]


def check_all(guards: Iterable[FiniteGuard]) -> None:
    """:meth:`FiniteGuard.check` of several guards, raising the earliest divergence among them."""
    errors = [error for error in (guard.pending() for guard in guards) if error is not None]
    if errors:
        raise min(errors, key=lambda error: error.step)
