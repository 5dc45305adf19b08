"""One trainer per workdir: an exclusive lock file holding the owner's host and pid.

Two trainers on one workdir would both run, and the second's checkpoints would silently replace
the first's. :class:`WorkdirLock` creates ``<workdir>/trainer.lock`` with ``O_EXCL`` (atomic on
local and network file systems) and writes ``{"host", "pid", "since"}`` into it. A lock left by a
process that died (SIGKILL, OOM, a node crash) is detected as stale when its host is this host and
its pid no longer runs, and is taken over with a warning. A lock held from another host cannot be
checked from here, so it is refused with the command that removes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

LOCK_FILE = "trainer.lock"


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Exists, owned by another user.
        return True
    return True


def _read_holder(path: str) -> dict | None:
    """The lock's JSON record; None if it cannot be read (being written, or garbage)."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` holds ``<workdir>/trainer.lock`` for the block.

    Raises:
      WorkdirLockedError: a live process (or one on another host) holds the lock.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._record = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self._record, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, f)
        return True

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:
            # Unparsable: a writer between create and write (a few microseconds), or garbage
            # left by a crash. Only the latter is old.
            with contextlib.suppress(OSError):
                return time.time() - os.path.getmtime(self.path) > 10.0
            return True  # Vanished meanwhile: try again.
        return holder.get("host") == self._record["host"] and not _pid_alive(
            int(holder.get("pid", -1))
        )

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = _read_holder(self.path)
            if not self._is_stale(holder):
                who = (
                    f"process {holder.get('pid')} on host {holder.get('host')} (since "
                    f"{holder.get('since')})"
                    if holder
                    else "a process that left it unreadable"
                )
                raise WorkdirLockedError(
                    f"{os.path.dirname(self.path)} is in use by another trainer: {who} holds "
                    f"{self.path}. Wait for it or stop it, or use another --workdir. If that "
                    f"process is gone (e.g. on another node), delete {self.path} and retry."
                )
            log.warning(
                "Taking over the stale lock %s of %s (no longer running).", self.path, holder
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        raise WorkdirLockedError(f"Could not take {self.path}: other processes keep racing for it.")

    def release(self) -> None:
        """Removes the lock file if it is still ours."""
        if self.held:
            self.held = False
            holder = _read_holder(self.path)
            if holder and all(holder.get(k) == v for k, v in self._record.items()):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[None]:
    """The workdir's lock for the block, taken by process 0 for the whole job; every process
    raises :class:`WorkdirLockedError` if it cannot be taken (they agree, so none trains alone)."""
    import jax

    from fogjax.distributed import all_processes

    lock = WorkdirLock(workdir)
    error: WorkdirLockedError | None = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            error = e
    if not all_processes(error is None):
        raise error or WorkdirLockedError(f"{workdir} is locked (see process 0's error).")
    try:
        yield
    finally:
        lock.release()
