"""The ledger of a preparation: which units are finished, and who is working on which.

Layout, under ``<output>/.prepare/``::

    plan.json              the settings and units (fogjax.data.prepare.plan)
    done/u000012.json      unit 12 is finished: its shards, token and document counts
    locks/u000012.lock     held (flock) by the process preparing unit 12
    locks/finalise.lock    held by the process writing metadata.json

A unit is finished when its record exists; the record is written (atomically) only after every
shard of the unit is on disk under its final name. A unit without a record may have left shards
or ``.tmp`` files behind (a killed worker): the next process to claim the unit deletes exactly
those files, which only ever match its own names, and prepares it again. Nothing else is ever
deleted, so finished work survives Ctrl-C, SIGTERM and SIGKILL.

Claims are ``flock`` locks, released by the kernel when their process dies, so two commands on
one output (two hosts given overlapping units, or a rerun while an orphan worker finishes) never
write the same unit at once. On a file system without working ``flock`` (some Lustre mounts),
claims are skipped with one warning: then give each host its own units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fogjax.data.shards import write_text

LEDGER_DIR = ".prepare"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_warned_no_locks = False


@dataclasses.dataclass(frozen=True)
class Claim:
    held: bool  # This process holds the lock.
    resumed: bool  # The lock file existed: the unit was started before and may have left files.


class Ledger:
    """The ``.prepare`` folder of one output (see the module docstring)."""

    def __init__(self, output: Path):
        self.output = output
        self.dir = output / LEDGER_DIR
        self.plan_path = self.dir / "plan.json"
        self._done = self.dir / "done"
        self._locks = self.dir / "locks"

    def create(self) -> None:
        for folder in (self.dir, self._done, self._locks):
            folder.mkdir(exist_ok=True)

    def done_units(self) -> set[int]:
        """Indices of the finished units."""
        if not self._done.is_dir():
            return set()
        return {
            int(p.stem[1:])
            for p in self._done.iterdir()
            if p.suffix == ".json" and p.stem.startswith("u") and p.stem[1:].isdigit()
        }

    def record(self, unit: int) -> dict[str, Any] | None:
        """The finished unit's record, or None if it is not finished.

        Raises:
          ValueError: the record is damaged (naming it and the fix).
        """
        path = self._done / f"u{unit:06d}.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise ValueError(
                f"{path} is damaged ({e}). Delete it: the unit is then prepared again."
            ) from None

    def write_record(self, unit: int, record: dict[str, Any]) -> None:
        write_text(self._done / f"u{unit:06d}.json", json.dumps(record) + "\n")

    def discard_partial(self, stem: str) -> list[Path]:
        """Deletes what an unfinished unit left: its shards ``<stem>_*.npy`` and temporary files
        ``.<stem>_*.npy.tmp.*``. Call only while holding the unit's claim, and only when it is
        ``resumed`` (a scan of the output folder). Returns the paths."""
        gone = [
            p
            for p in self.output.iterdir()
            if (p.name.startswith(f"{stem}_") and p.name.endswith(".npy"))
            or p.name.startswith(f".{stem}_")
        ]
        for p in gone:
            p.unlink(missing_ok=True)
        return gone

    @contextlib.contextmanager
    def claim(self, name: str, wait: bool = False) -> Iterator[Claim]:
        """Holds the lock ``locks/<name>.lock`` for the block. The claim is not ``held``
        (without waiting) when another live process holds it, unless ``wait``; it is ``resumed``
        when the lock file existed before: someone started this unit, so files may be left."""
        global _warned_no_locks
        path = self._locks / f"{name}.lock"
        resumed = path.exists()
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield Claim(False, resumed)
                return
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                if not _warned_no_locks:
                    logging.warning(
                        "%s: this file system does not support flock (%s); units are not "
                        "claimed, so give each host its own units (--num-hosts/--host-index).",
                        self._locks,
                        e,
                    )
                    _warned_no_locks = True
            try:
                yield Claim(True, resumed)
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(f, fcntl.LOCK_UN)
