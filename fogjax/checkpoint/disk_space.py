"""A full disk under the checkpoints: refused before orbax writes, named when it happens anyway.

A checkpoint that does not fit used to surface as ~400 lines of orbax and tensorstore tracebacks
from its background threads, ending in "No space left on device", exit code 2 ("bad input") and
no ``summary.json``. Now :func:`check_room` compares the disk's free space with what the
checkpoint can take (every array's bytes, uncompressed: an upper bound) before a save starts,
and :func:`is_disk_full` recognises the error when the disk fills up during a save anyway (another
writer); both end as :class:`DiskFullError`, whose message names the disk, its free space, the
latest checkpoint and the fix. The trainer exits with its own code, 4, and resumes from the
latest checkpoint once there is room again (orbax removes the partial ``.orbax-checkpoint-tmp``
folder at the next start).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from typing import Any

import jax
import numpy as np


class DiskFullError(OSError):
    """The disk holding the workdir has no room for the next write; the message says which disk,
    what is left, and how to resume."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


class _DiskFullRecords(logging.Filter):
    """Drops log records about "No space left on device" (orbax's background threads log the
    failure of a save, with its traceback, from each thread involved)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (is_disk_full(error) or _names_enospc(record.getMessage()))


def quiet_disk_full_logs() -> None:
    """For a command line that reports a full disk itself, in one line (the trainer, the study):
    orbax's and asyncio's logs of the same failure, hundreds of lines, are dropped."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DiskFullRecords) for f in logger.filters):
            logger.addFilter(_DiskFullRecords())


def _names_enospc(text: str) -> bool:
    return "No space left on device" in text or "os_error_code='28'" in text


def mount_point(path: str) -> str:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe(path: str) -> str:
    """'the disk of P (mounted at M, 12.0 MiB free of 80.0 MiB)'."""
    try:
        usage = shutil.disk_usage(mount_point(path))
        room = f", {mib(usage.free)} free of {mib(usage.total)}"
    except OSError:
        room = ""
    return f"the disk of {path} (mounted at {mount_point(path)}{room})"


def is_disk_full(error: BaseException | None) -> bool:
    """True if ``error``, or an exception it was raised from, is "No space left on device" (an
    OSError with ENOSPC, or orbax / tensorstore's text of one)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if _names_enospc(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def resume_advice(saved_steps: list[int]) -> str:
    latest = f"step {saved_steps[-1]}" if saved_steps else "none yet"
    return (
        f"The latest checkpoint is {latest}. Free space there (or lower "
        "train.keep_checkpoints, or move the workdir to a larger disk), then run the same "
        "command again to resume from it."
    )


def full_error(directory: str, error: BaseException, saved_steps: list[int]) -> DiskFullError:
    """A :class:`DiskFullError` for ``error``, a write under ``directory`` that failed with
    ENOSPC, naming the disk and what to do."""
    where = getattr(error, "filename", None) or directory
    return DiskFullError(
        f"No space left on {describe(str(where))}: a write there failed. "
        + resume_advice(saved_steps)
    )


def no_room_error(directory: str, step: int, need: int, saved_steps: list[int]) -> DiskFullError:
    """A :class:`DiskFullError` for checkpoint ``step`` (``need`` bytes at most), not written."""
    return DiskFullError(
        f"Checkpoint step {step} was not written: {describe(directory)} has no room for it (a "
        f"checkpoint needs up to {mib(need)}). " + resume_advice(saved_steps)
    )


def state_bytes(state: Any) -> int:
    """Bytes of every array of ``state``, once each (what a checkpoint stores, uncompressed)."""
    return sum(
        math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(state)
        if hasattr(x, "dtype")
    )


def fits(directory: str, need: int) -> bool:
    """Whether ``need`` bytes fit on the disk of ``directory`` (True when its free space cannot
    be known, e.g. on object storage)."""
    if "://" in directory:
        return True
    try:
        return shutil.disk_usage(mount_point(directory)).free >= need
    except OSError:
        return True
