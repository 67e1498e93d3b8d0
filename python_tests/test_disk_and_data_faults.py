"""Faults around the disk and the data: a checkpoint that cannot be written (disk full, file size
limit) and a corrupt dataset file (a malformed CIFAR batch, an unreadable image, read in a loader
worker or not). Each ends the ``dfa`` command with one line on stderr naming the file, without a
traceback, and leaves the files already on disk intact."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
from PIL import Image

from dfa_ext.cli import main as dfa_main
from dfa_ext.data.image_folder import read_image
from dfa_ext.data.loader import make_loader
from dfa_ext.errors import CheckpointError, DataError
from dfa_ext.training import load_checkpoint, train_teacher
from dfa_ext.training.checkpoint import atomic_write_bytes, save_checkpoint
from test_data import write_cifar10, write_cifar100, write_image_folder, write_pickle
from test_pipeline_cli import _dfa
from test_teacher_training import tiny

QUIET = ["--no-progress", "--no-tensorboard", "--device", "cpu"]


def assert_one_error_line(code: int, stderr: str, *names: str) -> str:
    """The command failed with exit status 2 and exactly one ``dfa: error:`` line naming ``names``."""
    assert code == 2, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfa: error: "), stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- checkpoints that cannot be written ------------------------------------------------------

# 10 % of digits for training: 2 steps of 64 per epoch
SMALL_DIGITS = {"epochs": 1, "data_options": {"test_fraction": 0.9}}


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """The output folder of a one-epoch resnet8 teacher on digits (copied by each test)."""
    out = train_teacher(tiny(tmp_path_factory.mktemp("trained"), **SMALL_DIGITS)).out_dir
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    return out


class FullDisk:
    """A file on a disk with ``room`` bytes free: the write that would pass them fails with ENOSPC."""

    def __init__(self, handle: BinaryIO, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, one_epoch, monkeypatch):
    out = Path(shutil.copytree(one_epoch, tmp_path / "run"))
    before = (out / "last.pt").read_bytes()
    real_fdopen = os.fdopen
    # 64 KiB free per file: config.json is written, the first checkpoint (after one step) is not
    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullDisk(real_fdopen(fd, *args, **kwargs),
                                                                         room=64 * 1024))
    with pytest.raises(CheckpointError) as info:
        train_teacher(tiny(tmp_path, **{**SMALL_DIGITS, "epochs": 2}, checkpoint_every=1))
    monkeypatch.undo()
    last = out / "last.pt"
    assert str(info.value) == f"cannot write {last}: No space left on device; the previous {last} is intact"
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert last.read_bytes() == before
    assert leftovers(out) == []


@pytest.mark.parametrize("fault", ["no space", "bug", "interrupt"])
@pytest.mark.parametrize("previous", [True, False], ids=["previous", "first"])
def test_only_write_failures_become_checkpoint_errors(tmp_path, fault, previous):
    """A failed write is a CheckpointError saying what is left; anything else propagates unchanged.
    Either way the temporary file is gone."""
    path = tmp_path / "c.pt"
    if previous:
        save_checkpoint(path, {"kind": "teacher", "v": 1})
        before = path.read_bytes()
    raised = {"no space": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "bug": TypeError("a bug"),
              "interrupt": KeyboardInterrupt()}[fault]

    def write(handle: BinaryIO) -> None:
        handle.write(b"partial")
        raise raised

    expected = CheckpointError if fault == "no space" else type(raised)
    with pytest.raises(expected) as info:
        atomic_write_bytes(path, write)
    if fault == "no space":
        kept = f"the previous {path} is intact" if previous else "nothing was written"
        assert str(info.value) == f"cannot write {path}: No space left on device; {kept}"
    else:
        assert info.value is raised
    if previous:
        assert path.read_bytes() == before
    else:
        assert not path.exists()
    assert leftovers(tmp_path) == []


def test_a_file_size_limit_ends_the_command_with_one_line(tmp_path, one_epoch):
    """A real failed write: the run is resumed under a file size limit (RLIMIT_FSIZE) of half of
    last.pt, far above config.json, so its first checkpoint (after one step) cannot be written.
    Python ignores SIGXFSZ, so the write fails with EFBIG instead of the signal killing the process."""
    out = Path(shutil.copytree(one_epoch, tmp_path / "run"))
    last, before = out / "last.pt", (out / "last.pt").read_bytes()
    limit = len(before) // 2

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = _dfa("train-teacher", "--model", "resnet8", "--data", "digits", "--data-options", "test_fraction=0.9",
                "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--seed", "11", "--checkpoint-every", "1",
                "--out", str(out), *QUIET, preexec_fn=limit_file_size)
    line = assert_one_error_line(done.returncode, done.stderr, str(last))
    assert line == f"dfa: error: cannot write {last}: File too large; the previous {last} is intact"
    assert last.read_bytes() == before
    assert load_checkpoint(last, kind="teacher")["epoch"] == 1
    assert leftovers(out) == []


# ---- corrupt dataset files -------------------------------------------------------------------

_PIXELS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize("data, record, problem", [
    ("cifar10", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},
     "'data' must be a non-empty integer array [N, 3072] (N 32x32 RGB images), got (2, 3000) uint8"),
    ("cifar10", {b"data": _PIXELS, b"labels": [0, 1, 2]},
     "'labels' must be 2 integers (one per image), got shape (3,)"),
    ("cifar10", {b"data": _PIXELS, b"labels": [0, [1, 2]]},
     "'labels' must be 2 integers (one per image), got an irregular nested sequence"),
    ("cifar10", {b"data": _PIXELS, b"labels": [10, 3]}, "'labels' must be in 0..9 (10 classes), found 10"),
    ("cifar10", {b"data": _PIXELS, b"labels": [-1, 3]}, "'labels' must be in 0..9 (10 classes), found -1"),
    ("cifar100", {b"data": _PIXELS, b"fine_labels": [0, 100]},
     "'fine_labels' must be in 0..99 (100 classes), found 100 (1 of 2 out of range)"),
], ids=["columns", "rows", "ragged-labels", "label-10", "label-minus-1", "cifar100-label-100"])
def test_a_corrupt_cifar_batch_gives_one_line_naming_it(tmp_path, capsys, data, record, problem):
    if data == "cifar10":
        write_cifar10(tmp_path)
        batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    else:
        write_cifar100(tmp_path)
        batch = tmp_path / "cifar-100-python" / "train"
    write_pickle(batch, record)
    code = dfa_main(["train-teacher", "--data", data, "--data-dir", str(tmp_path), "--model", "resnet8",
                     "--epochs", "1", "--out", str(tmp_path / "run"), *QUIET])
    line = assert_one_error_line(code, capsys.readouterr().err, f"{batch}: {problem}")
    assert line.startswith(f"dfa: error: {batch}: ")
    assert not (tmp_path / "run").exists()


class _BadItem(torch.utils.data.Dataset):
    """Items 0..3, of which item 2 cannot be read."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index == 2:
            raise DataError("/data/2.png: cannot read this image")
        return torch.zeros(1), 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_worker_fails_with_the_datasets_own_message(workers):
    """torch re-raises a worker's exception with its whole traceback as the message; the loader
    restores the one line the dataset raised."""
    with pytest.raises(DataError) as info:
        list(make_loader(_BadItem(), 2, train=False, num_workers=workers))
    assert str(info.value) == "/data/2.png: cannot read this image"


# PNGs of 12x12 pixels; given mean and std, no training image is read before training starts
IMAGE_OPTIONS = ["--data-options", "image_size=12", "mean=[0.5,0.5,0.5]", "std=[0.25,0.25,0.25]"]


@pytest.mark.parametrize("split, workers", [("train", 0), ("train", 2), ("test", 0)],
                         ids=["training", "training-in-workers", "evaluation"])
def test_an_unreadable_image_ends_the_command_with_one_line(tmp_path, capsys, split, workers):
    """The image is read lazily: while training (in this process or in loader workers) or while
    evaluating, after a training epoch."""
    write_image_folder(tmp_path / "images")
    bad = tmp_path / "images" / split / "cat" / "1.png"
    bad.write_bytes(b"not a png")
    args = ["train-teacher", "--data", "imagefolder", "--data-dir", str(tmp_path / "images"), *IMAGE_OPTIONS,
            "--model", "resnet8", "--epochs", "1", "--batch-size", "3", "--num-workers", str(workers),
            "--out", str(tmp_path / "run"), *QUIET]
    if workers:  # as a user runs it: a fresh process, whose workers are forked from it
        done = _dfa(*args)
        code, stderr = done.returncode, done.stderr
    else:
        code, stderr = dfa_main(args), capsys.readouterr().err
    line = assert_one_error_line(code, stderr)
    assert line == f"dfa: error: {bad}: cannot read this image (not an image in a format PIL reads)"


def test_an_unreadable_image_when_estimating_the_statistics(tmp_path, capsys):
    """Without mean and std, training images are read when the dataset is loaded."""
    write_image_folder(tmp_path / "images")
    bad = tmp_path / "images" / "train" / "dog" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = dfa_main(["train-teacher", "--data", "imagefolder", "--data-dir", str(tmp_path / "images"),
                     "--model", "resnet8", "--epochs", "1", "--out", str(tmp_path / "run"), *QUIET])
    assert_one_error_line(code, capsys.readouterr().err, f"{bad}: cannot read this image")


def test_an_image_too_large_to_decode_is_a_data_error(tmp_path):
    """PIL refuses an image of over 2 * 89 million pixels (a decompression bomb) with an error of its
    own, not an OSError."""
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(path)
    png = bytearray(path.read_bytes())
    png[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width and height, then its CRC
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    path.write_bytes(bytes(png))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot read this image .*exceeds limit"):
        read_image(str(path), 12)
