"""pytest configuration of the dfa_ext suite; shared helpers live in dfa_helpers.py."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

import dfa_ext  # noqa: F401  (registers torch.ops.dfa.* before any test module builds inputs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: compiles with torch.compile (inductor); the slowest tests")
    config.addinivalue_line("markers", "rounding: compares float results within a derived or calibrated bound "
                            "(rounding.py); make test runs these once more with a lesser CPU's kernels")


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Restores torch's intra-op thread count after a test that changes it."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def one_thread(restore_threads: None) -> None:
    """Tiny tensors: extra intra-op threads only add synchronisation (a lot on a busy 2-core machine)."""
    torch.set_num_threads(1)
