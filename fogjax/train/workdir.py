"""The workdir is the run: its lock, its config and config history, its summary.

- **Lock.** Two trainers on one workdir would both run, and the second's checkpoints would
  silently replace the first's. :class:`WorkdirLock` creates ``<workdir>/trainer.lock`` with
  ``O_EXCL`` (atomic on local and network file systems) and writes ``{"host", "pid", "since"}``
  into it. A lock left by a process that died (SIGKILL, OOM, a node crash) is detected as stale
  when its host is this host and its pid no longer runs, and is taken over with a warning. A lock
  held from another host cannot be checked from here, so it is refused with the command that
  removes it.
- **Config.** ``config.json`` is the current config, ``config_history/step_<N>.json`` every
  config a start used that differed from the previous one. A resumed run whose model changed in a
  way that keeps every array's shape (rope_base, input_scale, softmax_scale, train.seq_len, ...)
  would restore silently and train another model: :func:`config_changes` lists such differences
  against the config the checkpoints were written with; the trainer refuses them unless
  ``train.allow_config_change=True``. :func:`load_run_config` is how readers (evaluate, generate,
  export) get the config of a run.
- **Summary.** ``summary.json`` (:data:`SUMMARY_FILE`), written when a run ends.

Every file here is written through :func:`write_atomic`: a crash mid-write never leaves a
truncated file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from fogjax.distributed import all_processes

log = logging.getLogger(__name__)

LOCK_FILE = "trainer.lock"
CONFIG_FILE = "config.json"
HISTORY_DIR = "config_history"
SUMMARY_FILE = "summary.json"
# What defines the model a checkpoint holds; other fields (steps, LR, logging) may change freely.
MODEL_DEFINING = ("model", "train.seq_len")


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through ``<path>.tmp`` and a rename; if the write or the
    rename fails (a full disk), the old ``path`` is left as it was and the ``.tmp`` removed.
    The data reaches the disk before the rename, so a power loss leaves the old or the new file,
    never an empty one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, record: Any) -> None:
    """``record`` as indented JSON, atomically (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(record, indent=1, default=str))


# --- The lock -----------------------------------------------------------------


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


# --- The run config and its history ---------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _model_defining(config_dict: dict) -> dict[str, Any]:
    flat = _flatten(config_dict)
    return {
        k: v
        for k, v in flat.items()
        if any(k == p or k.startswith(p + ".") for p in MODEL_DEFINING)
    }


def _read_config(path: str) -> dict:
    """The JSON object in ``path``; ValueError saying what is wrong with it."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON (truncated, edited, not text).
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    return saved


def _history_files(workdir: str) -> list[str]:
    """``config_history/step_<N>.json`` paths, oldest (smallest N) first."""
    history = os.path.join(workdir, HISTORY_DIR)
    if not os.path.isdir(history):
        return []
    names = [f for f in os.listdir(history) if re.fullmatch(r"step_\d+\.json", f)]
    return [os.path.join(history, f) for f in sorted(names, key=lambda f: int(f[5:-5]))]


def load_saved(workdir: str) -> dict | None:
    """The workdir's current ``config.json`` as a dict, or None if there is none.

    An unreadable ``config.json`` (truncated, edited) is replaced by its copy, the newest
    ``config_history/step_<N>.json`` (:func:`record` writes that entry with the same text just
    before it), with a warning naming both files; ValueError naming the file and the fix if no
    copy can be read either.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        return _read_config(path)
    except ValueError as e:
        problem = str(e)
    for copy in reversed(_history_files(workdir)):
        try:
            saved = _read_config(copy)
        except ValueError:
            continue
        log.warning(
            "%s is unreadable (%s); using its copy %s, the config of the run's latest start. "
            "A trainer rewrites %s; to restore it by hand: cp %s %s",
            path,
            problem,
            copy,
            CONFIG_FILE,
            copy,
            path,
        )
        return saved
    raise ValueError(
        f"{path} is unreadable ({problem}) and {os.path.join(workdir, HISTORY_DIR)} holds no "
        "readable copy of it. Restore it from a backup (it is the run's config as JSON), or "
        "train in another --workdir."
    )


def config_changes(saved: dict, config: Any) -> list[str]:
    """``['model.rope_base: 500000.0 -> 10000.0', ...]``: model-defining fields that differ."""
    before = _model_defining(saved)
    after = _model_defining(json.loads(config.to_json_best_effort()))
    return [
        f"{k}: {before.get(k, '(absent)')!r} -> {after.get(k, '(absent)')!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]


def refuse_changes(changes: list[str], workdir: str) -> None:
    """ValueError listing ``changes`` and the two ways on."""
    raise ValueError(
        f"The checkpoints in {workdir} were written with another model config: "
        + "; ".join(changes)
        + ". Resume with the original values, or accept the change with "
        "--config.train.allow_config_change=True (every config used is kept in "
        f"{os.path.join(workdir, HISTORY_DIR)}), or use another --workdir. Nothing was changed."
    )


def record(workdir: str, config: Any, start_step: int) -> None:
    """Writes ``config.json`` and, when it differs from the last one kept, a history entry."""
    text = config.to_json_best_effort(indent=2)
    history = os.path.join(workdir, HISTORY_DIR)
    os.makedirs(history, exist_ok=True)
    kept = _history_files(workdir)
    last = None
    if kept:
        with open(kept[-1]) as f:
            last = f.read()
    if last != text:
        write_atomic(os.path.join(history, f"step_{start_step}.json"), text)
    write_atomic(os.path.join(workdir, CONFIG_FILE), text)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config (``<workdir>/config.json``) as a ConfigDict.

    Raises FileNotFoundError naming the file when the workdir holds no run.
    """
    saved = load_saved(workdir)
    if saved is None:
        raise FileNotFoundError(
            f"{os.path.join(workdir, CONFIG_FILE)} not found: --workdir must be a directory "
            "written by python -m fogjax.train."
        )
    return ml_collections.ConfigDict(saved)
