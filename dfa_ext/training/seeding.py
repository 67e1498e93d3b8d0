"""Seeds and deterministic mode for the trainers."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and every GPU), numpy and ``random``: model initialisation depends on it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels everywhere (slower on GPUs; CPU training is deterministic anyway).

    With it, an op that has no deterministic implementation raises instead of silently varying.
    """
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != enabled:  # the call imports inductor: seconds per process
        torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def rng_state() -> dict:
    """The torch RNG states, for a checkpoint (data order and augmentation are seeded separately)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leaves the caller's RNG states (torch's CPU and CUDA generators, numpy's, ``random``'s) as they
    were: the trainers seed them for their own runs, which must not change what the caller draws next."""
    torch_state, numpy_state, python_state = rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
