"""Running units on N worker processes (or in this process), with progress and clean stops.

Workers are started with ``spawn`` (never ``fork``: the parent may hold tokenizer threads) and
take units from a queue in order, so a slow unit never holds up the others. Each reports its
progress a few times a second; the parent shows it (:mod:`fogjax.data.prepare.progress`).

Stopping: Ctrl-C (SIGINT) reaches only the parent (workers ignore it) and SIGTERM the parent's
handler (fogjax.data.prepare's command line); either way the parent terminates the workers and
re-raises. A worker whose parent died (SIGKILL) notices within one batch and exits, so an orphan
never goes on writing. Nothing finished is lost: a unit is done once its record is written.

Each worker's tokenizer runs on one core (TOKENIZERS_PARALLELISM=false): N workers use N cores,
and tokens/s per worker compares with HF ``encode_batch`` on one core.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
import traceback
from collections.abc import Sequence
from typing import Any

from fogjax.data.prepare.plan import Unit
from fogjax.data.prepare.progress import Progress
from fogjax.data.prepare.worker import Job, UnitWorker

_REPORT_EVERY = 0.5  # Seconds between a worker's progress messages.


class WorkerFailed(RuntimeError):
    """A worker died without a report (killed, out of memory) or hit a bug (its traceback)."""


def _one_core() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")


def _worker_main(job: Job, tasks: Any, results: Any, parent_pid: int, wid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The parent handles Ctrl-C and stops us.
    _one_core()
    pending = [0, 0, 0]
    last = time.monotonic()

    def report(nbytes: int, documents: int, tokens: int) -> None:
        nonlocal last
        if os.getppid() != parent_pid:
            raise SystemExit(1)  # Orphaned (the parent was killed): stop writing.
        pending[0] += nbytes
        pending[1] += documents
        pending[2] += tokens
        if time.monotonic() - last >= _REPORT_EVERY:
            flush()

    def flush() -> None:
        nonlocal last
        if any(pending):
            results.put(("progress", wid, *pending))
            pending[:] = [0, 0, 0]
        last = time.monotonic()

    unit_index = None
    try:
        worker = UnitWorker(job)
        while (item := tasks.get()) is not None:
            unit = Unit.from_json(item)
            unit_index = unit.index
            results.put(("start", wid, unit.index))
            record = worker.run(unit, report)
            flush()
            results.put(("done", wid, unit.index, record))
    except ValueError as e:  # InputError, OutputError, a changed tokenizer: the user's to fix.
        results.put(("error", wid, unit_index, str(e)))
    except Exception:
        results.put(("bug", wid, unit_index, traceback.format_exc()))
    results.put(("exit", wid))


def run_units(
    job: Job, units: Sequence[Unit], workers: int, progress: Progress
) -> list[dict[str, Any]]:
    """Prepares ``units`` with ``workers`` processes (0: in this process). Returns the records
    of the units prepared here (a unit claimed by another live process is skipped).

    Raises:
      ValueError: an input cannot be read or the output cannot be written (the message names
        the file and the fix); the finished units are kept.
      WorkerFailed: a worker died or hit a bug.
      KeyboardInterrupt: Ctrl-C (workers are stopped first).
    """
    if workers <= 0:
        return _run_here(job, units, progress)
    return _run_pool(job, units, workers, progress)


def _run_here(job: Job, units: Sequence[Unit], progress: Progress) -> list[dict[str, Any]]:
    worker = UnitWorker(job)
    records = []
    for unit in units:
        record = worker.run(unit, progress.add)
        if record is not None:
            records.append(record)
            progress.unit_done(unit.index)
    return records


def _run_pool(
    job: Job, units: Sequence[Unit], workers: int, progress: Progress
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    workers = min(workers, len(units)) or 1
    for unit in units:
        tasks.put(unit.to_json())
    for _ in range(workers):
        tasks.put(None)
    procs = [
        ctx.Process(target=_worker_main, args=(job, tasks, results, os.getpid(), w), daemon=True)
        for w in range(workers)
    ]
    by_index = {u.index: u for u in units}
    current: dict[int, int | None] = {}
    exited: set[int] = set()
    records: list[dict[str, Any]] = []
    try:
        for p in procs:
            p.start()
        while len(exited) < workers:
            try:
                message = results.get(timeout=0.2)
            except queue.Empty:
                _check_alive(procs, exited, current, by_index, results)
                progress.tick()
                continue
            kind, wid, *rest = message
            if kind == "progress":
                progress.add(*rest)
            elif kind == "start":
                current[wid] = rest[0]
            elif kind == "done":
                current[wid] = None
                if rest[1] is not None:
                    records.append(rest[1])
                    progress.unit_done(rest[0])
            elif kind == "exit":
                exited.add(wid)
            elif kind == "error":
                raise ValueError(rest[1])
            elif kind == "bug":
                unit = by_index.get(rest[0])
                where = f" on unit {unit.index} ({unit.describe()})" if unit else ""
                raise WorkerFailed(f"A worker failed{where}:\n{rest[1]}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        tasks.cancel_join_thread()
        results.cancel_join_thread()
    return records


def _check_alive(
    procs: Sequence[Any],
    exited: set[int],
    current: dict[int, int | None],
    by_index: dict[int, Unit],
    results: Any,
) -> None:
    """Raises WorkerFailed for a worker that died without saying so (SIGKILL, out of memory)."""
    for wid, p in enumerate(procs):
        if wid in exited or p.is_alive() or p.exitcode is None:
            continue
        time.sleep(0.2)  # Its last messages may still be in the pipe: let the caller read them.
        if not results.empty():
            return
        if wid not in current:
            raise WorkerFailed(
                f"Worker {wid} died as it started (exit code {p.exitcode}). Worker processes are "
                "spawned: a script that calls fogjax.data.prepare.prepare(workers > 0) must do so "
                "under `if __name__ == '__main__':` (each worker imports the script again); its "
                "error is printed above."
            )
        index = current[wid]
        unit = by_index.get(index) if index is not None else None
        where = f" while preparing unit {unit.index} ({unit.describe()})" if unit else ""
        raise WorkerFailed(
            f"Worker {wid} died (exit code {p.exitcode}){where}: killed, or out of memory. Run "
            "the same command again (finished units are kept), with fewer --workers if memory "
            "is short."
        )
