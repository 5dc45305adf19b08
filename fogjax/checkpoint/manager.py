"""Checkpoints of a run: train state + data-iterator state + metadata, with orbax.

One step directory holds three items:

- ``state``: the train state pytree (params, opt_state, fp8 state, step) as sharded arrays;
- ``data``: each process's data-iterator state, one JSON file per process (hosts read different
  shards, so their iterator states differ);
- ``meta``: a small JSON dict (tokens seen, elapsed time, config, model signature).

Saves are asynchronous and atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it
when complete, so a crash mid-save leaves the previous checkpoint as the latest. Restore checks
the saved tree against the expected one before reading any array, and falls back from an
unreadable latest checkpoint to the one before it. Every array's checksum
(:mod:`fogjax.checkpoint.checksums`) is recorded in ``meta`` at save and verified after restore, so
a checkpoint whose bytes were changed in place counts as unreadable too. A reader
(``read_only=True``, e.g. ``fogjax.evaluate`` on a live run) never deletes or creates anything.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from fogjax.checkpoint import disk_space
from fogjax.checkpoint.checksums import checksums, mismatches
from fogjax.checkpoint.compatibility import (
    CheckpointMismatchError,
    StatePrecisionMismatchError,
    path_str,
    precision_problems,
    shape_problems,
)
from fogjax.distributed import all_processes
from fogjax.optim.state_precision import LAYOUT_FIELDS

log = logging.getLogger(__name__)

_BYTES_KEY = "__base64__"
# The key of ``meta`` under which save() records the state's per-array checksums.
_CHECKSUMS_KEY = "array_checksums"


def _encode(obj: Any) -> Any:
    """JSON-ready copy of ``obj``: bytes become {'__base64__': str}, numpy values plain Python."""
    if isinstance(obj, bytes):
        return {_BYTES_KEY: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.ndarray | np.generic | jax.Array):
        return np.asarray(obj).tolist()
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return _encode(obj.to_dict())
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_BYTES_KEY}:
            return base64.b64decode(obj[_BYTES_KEY])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    state: Any


@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    pass


class _PerProcessJsonHandler(ocp.CheckpointHandler):
    """Writes ``process_<i>-of-<n>.json`` per process, as grain's own orbax handler does."""

    @staticmethod
    def _file(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: _DataSave) -> None:
        self._file(directory).write_text(json.dumps(_encode(args.state)))

    def restore(self, directory: epath.Path, args: _DataRestore | None = None) -> Any:
        path = self._file(directory)
        if not path.exists():
            written = sorted(p.name for p in directory.iterdir())
            # Written with another process count: the caller derives the position another way.
            log.warning(
                "No data-iterator state for this process in %s (found %s); the trainer derives "
                "the data position from the restored step.",
                directory,
                written,
            )
            return None
        return _decode(json.loads(path.read_text()))

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


def _abstract(tree: Any) -> Any:
    """``tree`` with arrays replaced by structs; every leaf must say where it lands."""
    tree = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if getattr(leaf, "sharding", None) is None:
            # Caught here: inside the restore loop it would read as a corrupt checkpoint.
            raise ValueError(
                f"abstract_state leaf {path_str(path)!r} has no sharding; build the target with "
                "jax.eval_shape and attach the state shardings (ShapeDtypeStruct(sharding=...))."
            )
    return tree


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Save and restore (train state, data state, metadata) under ``directory``.

    Args:
      directory: where step directories live (created if missing), e.g. ``<workdir>/checkpoints``.
      keep: how many of the latest checkpoints to keep.
      async_save: write in a background thread; :meth:`save` returns once arrays are on host.
      save_every: :meth:`save` writes only on multiples of this, unless ``force=True``.
      read_only: a reader beside a live trainer: never creates, cleans or deletes anything
        (orbax's cleanup would delete the trainer's in-flight ``<step>.orbax-checkpoint-tmp``).

    Every process must call :meth:`save` and :meth:`restore` (orbax synchronises them).
    """

    def __init__(
        self,
        directory: str,
        keep: int,
        async_save: bool = True,
        save_every: int = 1,
        read_only: bool = False,
    ):
        if "://" not in str(directory):
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.StandardSave)
        registry.add("state", ocp.args.StandardRestore)
        data_handler = _PerProcessJsonHandler()
        registry.add("data", _DataSave, data_handler)
        registry.add("data", _DataRestore, data_handler)
        registry.add("meta", ocp.args.JsonSave)
        registry.add("meta", ocp.args.JsonRestore)
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
                enable_async_checkpointing=async_save,
                # Leftovers of a save that crashed midway: never steps, so safe to remove.
                cleanup_tmp_directories=True,
            )
        self.read_only = read_only
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        # Unreadable steps skipped by restore(): training continues from an older step, so the
        # next save deletes them (else retention would keep them and drop good ones).
        self._stale: list[int] = []

    def latest_step(self) -> int | None:
        """The newest step (saved, or being saved by this instance; it may prove unreadable)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step kept, oldest first, including one still being written asynchronously."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: Any,
        metadata: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Start saving checkpoint ``step``; True if a save was started.

        ``state`` is a pytree of jax arrays; ``data_state`` this process's iterator state (JSON
        types or bytes); ``metadata`` a JSON-able dict written once, by process 0. Returns False
        when the step is not a multiple of ``save_every`` (unless ``force``) or already saved.
        Blocks only for the device-to-host copy, so ``state`` may be donated right after.
        """
        if self.read_only:
            raise ValueError(f"Checkpointer({self.directory}, read_only=True) cannot save.")
        self._move_stale_aside()
        existing = self.all_steps()
        if step in existing:
            return False
        if existing and existing[-1] > step:
            raise ValueError(
                f"Cannot save step {step} in {self.directory}: it already holds the newer step "
                f"{existing[-1]}. Restore from it first, or use another --workdir."
            )
        if not self._manager.should_save(step) and not force:
            return False
        # Room for the whole checkpoint first: orbax would fail in its background threads, with
        # pages of tracebacks, after writing part of it. The previous save is finished first (as
        # orbax's save would do anyway), so the free space is final. The MiB is the metadata's.
        self.wait()
        need = disk_space.state_bytes(state) + 2**20
        if not all_processes(disk_space.fits(str(self.directory), need)):
            raise disk_space.no_room_error(str(self.directory), step, need, self.saved_steps())
        meta = {**metadata, _CHECKSUMS_KEY: checksums(state)}
        return self._surface(
            lambda: self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=_DataSave(data_state),
                    meta=ocp.args.JsonSave(_encode(meta)),
                ),
                force=force,
            )
        )

    def saved_steps(self) -> list[int]:
        """The steps whose save completed, from the directory listing alone (orbax's own view may
        count a save that failed)."""
        try:
            names = os.listdir(self.directory) if "://" not in str(self.directory) else []
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _surface(self, call: Any) -> Any:
        """``call()``, with an asynchronous save's "No space left on device" (raised by orbax at
        the next save, wait or close) turned into a :class:`DiskFullError` naming the disk."""
        try:
            return call()
        except Exception as e:
            if not disk_space.is_disk_full(e):
                raise
            raise disk_space.full_error(str(self.directory), e, self.saved_steps()) from None

    def _check_structure(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointMismatchError unless step's saved tree has abstract_state's shapes.

        Reads only orbax's tree metadata, never arrays. Other errors (unreadable metadata)
        propagate, so the caller can treat the step as corrupt.
        """
        item = self._manager.item_metadata(step)["state"]
        if item is None:
            raise FileNotFoundError(f"no tree metadata for 'state' in step {step}")
        saved = getattr(item, "tree", item)
        problems = shape_problems(saved, abstract_state)
        precision = precision_problems(saved, abstract_state, problems)
        if precision:
            more = f" (and {len(precision) - 1} more)" if len(precision) > 1 else ""
            raise StatePrecisionMismatchError(
                f"Checkpoint step {step} in {self.directory} was written with another "
                f"optimizer-state precision: {precision[0]}{more}. Resume it with the optim.* "
                f"precision fields it was written with ({self._saved_precision(step)}; its config "
                f"is in {self.directory / str(step) / 'meta'}), or start this run in another "
                "--workdir. Nothing was changed on disk."
            )
        if problems:
            more = f" (and {len(problems) - 1} more leaves differ)" if len(problems) > 1 else ""
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {self.directory} was written by a different model: "
                f"{problems[0]}{more}. Resume it with the config it was written with (its "
                f"metadata is in "
                f"{self.directory / str(step) / 'meta'}), or start this run in another --workdir. "
                "Nothing was changed on disk."
            )

    def _saved_precision(self, step: int) -> str:
        """``--config.optim.<field>=<value>`` flags of step's saved precision fields, read from
        its metadata; the field names alone when the metadata holds no config."""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            saved = meta["meta"]["config"]["optim"]
            return " ".join(f"--config.optim.{k}={saved[k]}" for k in LAYOUT_FIELDS)
        except (KeyError, TypeError, FileNotFoundError, ValueError):
            return ", ".join(LAYOUT_FIELDS)

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=_DataRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = _decode(restored["meta"])
        saved_sums = meta.pop(_CHECKSUMS_KEY, None)
        if saved_sums is not None:  # Checkpoints written before checksums have none.
            bad = mismatches(saved_sums, restored["state"])
            if bad:
                raise ValueError(
                    f"checksum mismatch in {len(bad)} array(s) of step {step}, e.g. {bad[0]!r}: "
                    "its files were changed after they were written"
                )
        return restored["state"], restored["data"], meta

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any, dict]:
        """(state, data_state, metadata) of ``step``, or of the newest readable step if None.

        ``abstract_state`` is a pytree of jax.ShapeDtypeStruct (or arrays) whose ``.sharding``
        is where each leaf lands, so a checkpoint restores onto any mesh. Saved dtypes are cast
        to the abstract ones. A newest step that cannot be read is skipped with a warning (an
        explicit ``step`` is not), and the next :meth:`save` deletes such skipped steps so the
        run's history stays linear. Raises CheckpointMismatchError before reading any array if
        the saved shapes differ, and FileNotFoundError if no step can be read.
        """
        abstract_state = _abstract(abstract_state)
        # Pending saves first; then re-list the directory (orbax caches it), which must never
        # happen while a save is in flight or orbax loses track of that step.
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"No checkpoint step {step} in {self.directory} {steps}.")
            self._check_structure(step, abstract_state)
            return self._restore_step(step, abstract_state)
        errors = []
        for candidate in reversed(steps):
            try:
                self._check_structure(candidate, abstract_state)
                result = self._restore_step(candidate, abstract_state)
                failure = None
            except CheckpointMismatchError:
                raise
            except Exception as e:  # Any read failure means: try the previous step.
                failure = e
            # Every process must resume from the same step: one failure is everyone's failure.
            if not all_processes(failure is None):
                e = failure or RuntimeError("unreadable on another process")
                log.warning(
                    "Checkpoint step %d in %s is unreadable (%s: %s); falling back to the "
                    "previous one.",
                    candidate,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "",
                )
                errors.append((candidate, e))
                continue
            self._stale = [s for s in steps if s > candidate]
            return result
        if errors:
            raise FileNotFoundError(
                f"No readable checkpoint in {self.directory}: steps "
                f"{[s for s, _ in errors]} all failed (see the warnings above). Move them aside "
                "to start afresh, or point --workdir elsewhere."
            ) from errors[0][1]
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")

    def _move_stale_aside(self) -> None:
        """Moves the steps skipped at restore to ``<directory>.unreadable/`` (never deletes them:
        a transient read error must not cost good checkpoints), so the run's history is linear."""
        stale = [s for s in self._stale if s in self.all_steps()]
        self._stale = []
        if not stale:
            return
        aside = epath.Path(str(self.directory) + ".unreadable")
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in stale:
                target = aside / f"{step}-{int(time.time())}"
                log.warning(
                    "Moving checkpoint step %d, skipped as unreadable at restore, to %s: training "
                    "continued from an older step. Inspect or delete it by hand.",
                    step,
                    target,
                )
                (self.directory / str(step)).rename(target)
        _barrier("fogjax_checkpoint_stale_moved")
        self._manager.reload()

    def wait(self) -> None:
        """Block until the pending asynchronous save is on disk."""
        self._surface(self._manager.wait_until_finished)

    def close(self) -> None:
        """Finish pending saves and release orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        # Leaving on an error: a failed pending save (the same full disk, reported again by
        # orbax) must not replace the error that is already on its way up.
        try:
            self.close()
        except Exception as e:
            log.warning("Closing %s after an error: %s", self.directory, str(e)[:300])
