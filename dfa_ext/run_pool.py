"""Independent training runs side by side, each in its own worker process.

Small networks on a CPU use cores badly: one run with two intra-op threads is far from twice as
fast as one thread, while two single-thread runs side by side are. ``run_pool`` runs picklable
jobs (a module-level function and its argument) in ``workers`` processes with ``threads``
intra-op threads each, and yields their results as they finish; ``workers == 1`` runs them one
after the other in this process (GPUs, torchrun, debugging).

Workers run in their own process group, so a terminal's Ctrl-C reaches only this process, which
passes each SIGINT or SIGTERM on to every worker exactly once: the first makes each run stop at
its next step boundary after saving (the trainers' own interrupt handling) and the pool then
raises :class:`TrainingInterrupted`; a second one aborts at once, as in a single run.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from .training.interrupt import InterruptGuard, TrainingInterrupted

R = TypeVar("R")
Job = tuple[Callable[[Any], R], Any]


def auto_workers(device: str, jobs: int) -> tuple[int, int]:
    """(workers, threads each) for ``jobs`` runs: on a CPU, one worker per core (at most 4, at
    most one per job) sharing the cores; on a GPU, one run at a time."""
    from .training.run_options import resolve_device

    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if resolve_device(device).type != "cpu" or jobs <= 1:
        return 1, torch.get_num_threads()
    workers = max(1, min(4, cores, jobs))
    return workers, max(1, cores // workers)


# Seconds between a worker's checks that the pool's process is still alive.
PARENT_CHECK_SECONDS = 0.5


def _init_worker(threads: int, parent: int) -> None:
    torch.set_num_threads(threads)
    os.setpgrp()  # out of the terminal's group: signals come from the pool's process, once each
    threading.Thread(target=_exit_with, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_with(parent: int) -> None:
    """Ends this worker once ``parent`` (the pool's process) is gone. Out of the command's process
    group, a worker would outlive a SIGKILL of that group (or a crash of the command) and go on
    training and writing into its run folder, racing the command started again."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)  # as if killed with its parent: what it saved so far is complete (atomic writes)


def _call(job: Job) -> Any:
    function, argument = job
    return function(argument)


def run_pool(jobs: Sequence[Job], *, workers: int, threads: int = 1) -> Iterator[tuple[int, Any]]:
    """Runs ``jobs`` and yields ``(index, result)`` as each finishes (in order when ``workers`` is 1).

    At most ``workers`` jobs are handed out at a time, so after a stop no queued job starts.

    Raises:
        TrainingInterrupted: a run was interrupted (every run in flight has saved its checkpoint).
        Whatever a job raised (the runs in flight are stopped, after saving, first).
    """
    if workers <= 1:
        for index, job in enumerate(jobs):
            yield index, _call(job)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, os.getpid()))
    queue = iter(enumerate(jobs))
    pending: dict[Future, int] = {}
    interrupted: TrainingInterrupted | None = None
    failure: BaseException | None = None

    def hand_out() -> None:
        for index, job in queue:
            pending[pool.submit(_call, job)] = index
            return

    with InterruptGuard(on_signal=lambda signum: _forward(pool, signum)) as guard:
        try:
            for _ in range(workers):
                hand_out()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    error = future.exception()
                    if isinstance(error, TrainingInterrupted):
                        interrupted = interrupted or error
                    elif error is not None and failure is None:
                        failure = error
                        _forward(pool, signal.SIGINT)  # the runs in flight save and stop
                    elif error is None:
                        yield index, future.result()
                    if interrupted is None and failure is None and not guard.requested:
                        hand_out()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise failure
    if interrupted is not None or guard.requested:
        raise interrupted or TrainingInterrupted("the runs of this command")


def _forward(pool: ProcessPoolExecutor, signum: int) -> None:
    """Passes a signal this process got on to every worker."""
    for process in list(getattr(pool, "_processes", {}).values()):
        try:
            os.kill(process.pid, signum)
        except (ProcessLookupError, AttributeError):
            pass
