"""Atomic checkpoint files and the models stored in them.

A checkpoint is a dict saved with ``torch.save``; it always has ``format``, ``kind`` (what wrote
it: "teacher", "search", "distill") and ``model`` (how to rebuild the network: the name and
arguments of ``dfa_ext.models.create``) besides the weights. Files are written to a temporary
name in the same folder, flushed to disk, then renamed over the old one, so an interruption
leaves either the old or the new file, never a truncated one; a write that fails (disk full, no
permission, file size limit) raises CheckpointError and also leaves the old file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, cast

import torch
from torch import nn

from ..errors import CheckpointError

FORMAT = "dfa_ext.checkpoint/1"


class _WatchedFile:
    """A binary file that remembers the first OSError its ``write`` raised.

    ``torch.save`` reports a write that failed (disk full, file size limit) as a RuntimeError of its
    zip writer ("unexpected pos ..."), raised while closing the archive, with the OSError only as
    context; this keeps the real cause. Every other attribute is the file's own.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``.

    Raises:
        CheckpointError: the file could not be written (no space, no permission, file size limit):
            ``path`` is as it was before and the temporary file is removed. Other exceptions
            (a bug in ``write``, KeyboardInterrupt) propagate unchanged, also without a temporary.
    """
    path = Path(path)
    tmp: str | None = None
    watched: _WatchedFile | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            watched = _WatchedFile(handle)
            write(cast(BinaryIO, watched))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            with contextlib.suppress(OSError):  # keep the error that matters
                Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            cause: OSError | None = error
        elif isinstance(error, Exception) and watched is not None:
            cause = watched.error  # set when torch.save's RuntimeError hides a failed write
        else:
            cause = None  # KeyboardInterrupt, SystemExit
        if cause is None:
            raise
        kept = f"the previous {path} is intact" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot write {path}: {cause.strerror or cause}; {kept}") from cause
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Writes ``state`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    state = {"format": FORMAT, **state}
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, *, kind: str | tuple[str, ...] | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint`.

    Loads with ``weights_only=True``: a checkpoint from elsewhere cannot run code.

    Raises:
        CheckpointError: the file is missing, is not a dfa_ext checkpoint, is corrupt, or is not
            of the expected ``kind``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a torch file "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dfa_ext checkpoint (expected format {FORMAT!r})")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and state.get("kind") not in kinds:
        raise CheckpointError(f"{path} is a {state.get('kind')!r} checkpoint; expected {' or '.join(kinds)}")
    return state


def model_from_checkpoint(state_or_path: dict | str | os.PathLike, *, key: str = "model") -> nn.Module:
    """Rebuilds the network a checkpoint describes and loads its weights (in eval mode).

    ``state[key]`` holds ``{"name", "num_classes", "in_channels", "kwargs", "state_dict"}``; a network
    that was given as a module (``name`` None) cannot be rebuilt: CheckpointError says what to do.
    """
    from .. import models

    state = state_or_path if isinstance(state_or_path, dict) else load_checkpoint(state_or_path)
    record = state.get(key)
    if isinstance(record, dict) and "name" in record and record["name"] is None:
        where = "" if isinstance(state_or_path, dict) else f"{state_or_path} "
        raise CheckpointError(
            f"the checkpoint {where}holds a {record.get('class', 'custom')} network given as a module, which it "
            f"cannot rebuild: build the network yourself and load checkpoint['{key}']['state_dict'] (and pass the "
            "module, e.g. teacher=...), or build it with dfa_ext.models.create('pkg.module:factory') next time")
    try:
        spec = state[key]
        model = models.create(spec["name"], num_classes=spec["num_classes"],
                              in_channels=spec["in_channels"], **spec.get("kwargs", {}))
        model.load_state_dict(spec["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint does not hold a usable {key!r} network: "
                              f"{str(error).splitlines()[0][:300]}") from None
    return model.eval()


def model_record(model: nn.Module, name: str | None, num_classes: int, in_channels: int,
                 kwargs: dict | None = None, **more: Any) -> dict:
    """What :func:`model_from_checkpoint` needs, with a CPU copy of the weights (``name`` None: a
    network given as a module, which a checkpoint cannot rebuild; ``more``: e.g. its ``class``)."""
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"name": name, "num_classes": num_classes, "in_channels": in_channels,
            "kwargs": dict(kwargs or {}), **more, "state_dict": state_dict}


def check_same_run(saved: dict, signature: dict, path: str | os.PathLike) -> None:
    """Refuses to resume ``path`` when its run signature differs from this run's."""
    differing = [k for k in signature if saved.get(k) != signature[k]]
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} there, {signature[k]!r} now" for k in differing)
        raise CheckpointError(f"{path} belongs to a different run ({details}); choose another output "
                              f"folder or pass --no-resume after moving it away")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a network's state (every parameter and buffer: name, dtype, shape, bytes): two
    runs with this fingerprint saw the same weights, whether they came from a file or from memory."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(_tensor_bytes(value))
    return digest.hexdigest()


def structure_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a network's architecture (module classes, parameter and buffer names, shapes and
    dtypes), not its values: a run resumed with the same kind of network, freshly built, matches."""
    parts = [f"{path}:{type(module).__qualname__}" for path, module in model.named_modules()]
    parts += [f"{name}:{value.dtype}:{tuple(value.shape)}" for name, value in model.state_dict().items()]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()
