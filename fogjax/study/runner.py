"""Runs every run of a study in ``STUDY_DIR/<run>/``, each an ordinary, resumable training run.

A run whose ``summary.json`` says it completed its steps or diverged is finished and skipped, so
an interrupted study continues where it stopped: the interrupted run resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fogjax.monitoring.reporter import TrainingDiverged
from fogjax.study.spec import Study, StudyRun
from fogjax.train.loop import train_and_evaluate
from fogjax.train.workdir import SUMMARY_FILE


def read_summary(workdir: str) -> dict[str, Any] | None:
    """The run's ``summary.json``, or None if it has none (never started, or killed)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_finished(run: StudyRun, summary: dict[str, Any] | None) -> bool:
    """Diverged, or completed all the steps the study asks for now."""
    if summary is None:
        return False
    if summary.get("status") == "diverged":
        return True
    return summary.get("status") == "completed" and summary["step"] >= run.config.train.steps


def describe(summary: dict[str, Any]) -> str:
    """'diverged (loss_spike) at step 120' or 'completed 300 steps'."""
    if summary.get("diverged"):
        d = summary["divergence"]
        return f"diverged ({d['reason']}) at step {d['step']}"
    return f"{summary['status']} at step {summary['step']}"


def run_study(study: Study, study_dir: str) -> bool:
    """Trains every unfinished run; True if all are finished, False if a signal stopped one."""
    os.makedirs(study_dir, exist_ok=True)
    total = len(study.runs)
    for i, run in enumerate(study.runs, start=1):
        workdir = os.path.join(study_dir, run.name)
        head = f"[study {study.name} {i}/{total}] {run.name} ({run.arch}, {run.recipe})"
        summary = read_summary(workdir)
        if is_finished(run, summary):
            print(f"{head}: finished ({describe(summary)}), skipped.", flush=True)
            continue
        print(f"{head}: training {run.config.train.steps} steps in {workdir}", flush=True)
        try:
            result = train_and_evaluate(run.config, workdir)
        except TrainingDiverged as e:
            print(f"{head}: DIVERGED. {str(e).split('. Rerun')[0]}", flush=True)
            continue
        if "stopped_at" in result:
            print(
                f"{head}: stopped by a signal at step {result['stopped_at']}. Run the same "
                "command again to continue the study from there.",
                flush=True,
            )
            return False
        print(f"{head}: {describe(result)}.", flush=True)
    return True
