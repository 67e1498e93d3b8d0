"""pytest-benchmark microbenchmarks of the ops (``pytest bench --benchmark-only``; ``make bench``).

Shared here: the import path of the benchmark helpers and the copy bandwidth of each device,
measured once per session, against which every op's achieved bandwidth is reported."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth  # noqa: E402

import dfa_ext  # noqa: E402,F401  (registers torch.ops.dfa.*)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: compiles with torch.compile (slow on the CPU)")


@pytest.fixture(scope="session")
def copy_bytes_per_second():
    """Bytes/s of a device-local copy (read + write), per device, measured on first use."""
    measured: dict[str, float] = {}

    def of(device: torch.device) -> float:
        if str(device) not in measured:
            measured[str(device)] = copy_bandwidth(device)
        return measured[str(device)]
    return of
