"""Errors a user can cause and fix (bad names, missing files, corrupt checkpoints).

The ``dfa`` command prints their message on one line and exits non-zero, without a traceback;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class DfaError(Exception):
    """Base of the user-fixable errors; the message says what was wrong and what was expected."""


class ModelError(DfaError, ValueError):
    """Unknown model name, bad model arguments, or a teacher and student that cannot be paired."""


class DataError(DfaError, ValueError):
    """A dataset that is missing, malformed, or asked for with bad arguments."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset folder or file that is not where the user said it is."""


class CheckpointError(DfaError, ValueError):
    """A checkpoint that is missing, corrupt, or from an incompatible run."""


class ConfigError(DfaError, ValueError):
    """A bad option value or configuration file."""


class TrainingDiverged(DfaError):
    """A loss, gradient or weight became NaN or infinite; the last checkpoint holds the last finite
    state (the ``dfa`` command exits with status 3). ``step`` is where it was first seen."""

    step: int = -1
