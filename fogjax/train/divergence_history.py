"""A run's divergences outlive its resumes.

A divergence is recorded in ``summary.json`` when the run stops on it, and in the checkpoints
saved after it only when training goes on through it (``log.on_divergence=continue``). A run
stopped by a divergence and started again used to resume from its latest checkpoint, saved
after the onset, with a reporter that knew nothing of it: the diverged model trained to
'completed' and ``summary.json`` said ``diverged: false``. Now every start compares the
divergences ``summary.json`` records (:func:`recorded`) with the checkpoint it resumes
(:func:`classify`):

- a checkpoint from after an onset (its step >= onset - 1: the loss at step k comes from the
  parameters after step k - 1) holds the diverged model. Under ``log.on_divergence=stop`` that
  start is refused before anything is written (:func:`refuse_diverged_resume`, exit 3), naming
  the checkpoint to resume from and the command that moves the later ones aside; under
  ``continue`` the divergence stays the run's (``diverged: true``);
- a checkpoint from before it (the later ones moved aside) starts a new trajectory, and the
  divergence is kept in ``summary.json``'s ``earlier_divergences`` (:func:`carry`), which every
  later checkpoint remembers.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from fogjax.monitoring import recovery
from fogjax.monitoring.divergence import Divergence
from fogjax.monitoring.reporter import Reporter, TrainingDiverged
from fogjax.train.workdir import SUMMARY_FILE

log = logging.getLogger(__name__)


def _key(record: dict[str, Any]) -> tuple:
    return record.get("reason"), record.get("step"), record.get("detected_at")


def recorded(workdir: str) -> list[dict[str, Any]]:
    """The divergences ``<workdir>/summary.json`` records, oldest first ([] without one)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): the divergences it recorded are not checked.", path, e)
        return []
    if not isinstance(summary, dict):
        return []
    found = [d for d in summary.get("earlier_divergences") or [] if isinstance(d, dict)]
    if isinstance(summary.get("divergence"), dict):
        found.append(summary["divergence"])
    return found


def classify(
    workdir: str, start: int, monitor_state: dict[str, Any] | None
) -> tuple[list[dict], list[dict]]:
    """(divergences the resumed state comes after, earlier ones) among those ``summary.json``
    records and the checkpoint's reporter state (``monitor_state``) does not already hold."""
    state = monitor_state or {}
    known = {_key(d) for d in state.get("earlier_divergences", [])}
    found = (state.get("divergence") or {}).get("found")
    if found:
        known.add(_key(found))
    after, earlier = [], []
    for record in recorded(workdir):
        if _key(record) in known:
            continue
        # A fresh start (step 0) holds no trained parameters, so nothing diverged.
        (after if start > 0 and start >= record["step"] - 1 else earlier).append(record)
    return after, earlier


def refuse_diverged_resume(
    after: list[dict], start: int, config: Any, directory: str, steps: list[int], workdir: str
) -> None:
    """Raises :class:`TrainingDiverged` if this start would resume a diverged model and the run
    stops on divergences (``log.on_divergence=stop``)."""
    if not after or config.log.on_divergence != "stop":
        return
    first = after[0]
    raise TrainingDiverged(
        f"This run diverged at step {first['step']} ({first['reason']}: {first.get('detail')}; "
        f"recorded in {os.path.join(workdir, SUMMARY_FILE)}), and checkpoint step {start}, which "
        f"this start would resume, holds the model from after it. "
        f"{recovery.advice(directory, steps, first['step'])} Or train the diverged model on with "
        "--config.log.on_divergence=continue. Nothing was changed."
    )


def carry(after: list[dict], earlier: list[dict], reporter: Reporter) -> None:
    """Keeps the recorded divergences in the run's summary: the first one the resumed state
    comes after stays the run's (under ``log.on_divergence=continue``), the others are
    ``earlier_divergences``."""
    if after and reporter.divergence.found is None:
        first, after = after[0], after[1:]
        fields = {k: first[k] for k in ("reason", "step", "detected_at", "detail")}
        reporter.divergence.found = Divergence(**fields)
        reporter.print(
            f"WARNING: this run diverged at step {first['step']} ({first['reason']}) and resumes "
            "from a checkpoint after it: training the diverged model on "
            "(log.on_divergence=continue)."
        )
    reporter.earlier_divergences.extend([*earlier, *after])
