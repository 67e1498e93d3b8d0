"""Timing, bandwidth and memory helpers shared by the dfa_ext benchmarks.

Times are medians over repeated runs after warm-up; on CUDA the device is synchronised around
each run.  Achieved bandwidth is compared with a device-local copy measured in the same run.
Memory-bound ops are timed cache-cold: their callers rotate through enough input sets
(``cold_copies``) that each set has left the last-level cache (``last_level_cache_bytes``) before
it is read again; otherwise a table of inputs a few times the cache's size measures the cache.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time
from typing import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 15,
                min_seconds: float = 0.5) -> float:
    """Median wall time of fn() in seconds (at least `repeats` runs, more until min_seconds)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def last_level_cache_bytes(device: torch.device) -> int:
    """The last-level cache a benchmark's inputs must not fit in: a GPU's L2, or the largest CPU
    cache sysfs lists (cpu0's; 32 MiB assumed when sysfs says nothing)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    largest = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        largest = max(largest, int(text.rstrip("KkMmGg")) * scale)
    return largest or 32 << 20


def cold_copies(set_bytes: int, device: torch.device, factor: int = 4) -> int:
    """How many input sets to rotate through so that a set is out of the last-level cache when its
    turn comes: together they hold ``factor`` x the cache (each set is then read at most every
    ``factor`` cache-fulls)."""
    return max(2, -(-factor * last_level_cache_bytes(device) // max(set_bytes, 1)))


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Achieved bytes/s of dst.copy_(src) (bytes read + bytes written) for an nbytes buffer."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during fn() above what was allocated before it (outputs included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    # CPU: replay every allocation and free the profiler saw, in time order.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    running = peak = 0
    for _, size in sorted(sizes):
        running += size
        peak = max(peak, running)
    return peak


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit_table(title: str, table: str, markdown: str | None) -> None:
    """Prints a benchmark's title and Markdown table, and writes both to ``markdown`` when given."""
    print(title + "\n\n" + table)
    if markdown:
        with open(markdown, "w") as f:
            f.write(title + "\n\n" + table + "\n")


def dfa_op_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Seconds per fn() spent inside the ``dfa::`` ops, forward and backward (profiler: self CPU
    time on a CPU, kernel time on a GPU)."""
    fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        _sync(device)
    events = [e for e in prof.key_averages() if e.key.startswith("dfa::")]
    if device.type == "cuda":
        total_us = sum(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) for e in events)
    else:
        total_us = sum(e.self_cpu_time_total for e in events)
    return total_us / 1e6 / repeats


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The teacher/student pair and the batch of a trainer-step benchmark (CIFAR-100 shapes by default)."""
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100)
