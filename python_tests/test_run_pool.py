"""Runs side by side in worker processes: results, threads, errors, and a stop signal that every
worker gets exactly once (so each saves before stopping)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import pool_jobs
from dfa_ext.run_pool import auto_workers, run_pool
from dfa_ext.training.interrupt import TrainingInterrupted


def test_jobs_run_in_worker_processes_with_their_thread_count():
    results = dict(run_pool([(pool_jobs.square, x) for x in range(5)], workers=2, threads=1))
    assert sorted(results) == list(range(5))
    assert [r[0] for _, r in sorted(results.items())] == [0, 1, 4, 9, 16]
    assert all(pid != os.getpid() and threads == 1 for _, pid, threads in results.values())
    in_process = list(run_pool([(pool_jobs.square, 3)], workers=1))
    assert in_process[0][0] == 0 and in_process[0][1][:2] == (9, os.getpid())


def test_a_failing_job_raises_its_error():
    with pytest.raises(ValueError, match="broken run"):
        list(run_pool([(pool_jobs.square, 1), (pool_jobs.fail, "broken run")], workers=2))


def test_a_stop_signal_reaches_every_worker_once_and_each_saves(tmp_path):
    def stop_when_both_started():
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C reaches the pool's process

    threading.Thread(target=stop_when_both_started, daemon=True).start()
    with pytest.raises(TrainingInterrupted):
        list(run_pool([(pool_jobs.wait_for_a_stop, str(tmp_path))] * 3, workers=2))
    assert len(list(tmp_path.glob("saved-*"))) == 2  # both runs in flight saved; the third never started


def test_auto_workers_one_per_core_on_a_cpu():
    workers, threads = auto_workers("cpu", jobs=12)
    cores = len(os.sched_getaffinity(0))
    assert workers == min(4, cores) and threads == max(1, cores // workers)
    assert auto_workers("cpu", jobs=1)[0] == 1
