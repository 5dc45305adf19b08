"""Downstream scores of a run with lm-evaluation-harness (``python -m fogjax.evaluate --tasks``).

    python -m fogjax.evaluate --workdir=runs/fog-1.5b --tasks=fog_downstream [--step N]
        [--recipe bf16] [--limit 100] [--num_fewshot 0] [--include_path my_tasks/]

Runs ``lm_eval.simple_evaluate`` with the ``fogjax`` model (fogjax/harness.py) on the tasks,
writes the results to ``<workdir>/downstream/results_step<N>.json`` and each numeric score to
TensorBoard (``<workdir>/tb``) as ``downstream/<task>/<metric>`` at the checkpoint's step.
``fog_downstream`` is the task group shipped in fogjax/tasks; ``--include_path`` adds folders of
the user's own task YAMLs (local data files, for offline runs).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax

from fogjax import metrics


def scalar_tags(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{'downstream/<task>/<metric>': value}`` for every finite numeric score.

    lm_eval keys metrics ``'<metric>,<filter>'``; the default filter ``none`` is dropped and any
    other becomes a path component (``exact_match,strict-match`` -> ``exact_match/strict-match``).
    """
    tags = {}
    for task, scores in results.items():
        for key, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            tags[f"downstream/{task}/{name}"] = float(value)
    return tags


def run_downstream(
    workdir: str,
    tasks: Sequence[str],
    step: int | None = None,
    recipe: str | None = None,
    batch_size: int = 8,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: Sequence[str] = (),
    lm: Any = None,
    include_defaults: bool = True,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on lm_eval ``tasks``; returns lm_eval's results dict (with
    ``step``, ``recipe`` and ``results_path`` added) after writing it to the workdir and
    TensorBoard. ``lm``: an already loaded FogjaxLM of this workdir (else one is loaded);
    ``include_defaults=False`` skips indexing lm_eval's ~15k built-in tasks (~10 s) when only
    ``include_path`` tasks are asked for."""
    import lm_eval  # Imported here: fogjax itself never needs lm-eval.
    from lm_eval.tasks import TaskManager

    from fogjax.harness import TASKS_DIR, FogjaxLM

    if lm is None:
        lm = FogjaxLM(workdir=workdir, step=step, recipe=recipe, batch_size=batch_size)
    step = lm.loaded.step
    manager = TaskManager(
        include_path=[TASKS_DIR, *include_path], include_defaults=include_defaults
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    out = {"step": step, "recipe": lm.loaded.recipe.name, **out}
    path = os.path.join(workdir, "downstream", f"results_step{step}.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=2, default=str)
        os.replace(path + ".tmp", path)
    writer = metrics.MetricWriter(os.path.join(workdir, "tb"))
    try:
        writer.write_scalars(step, scalar_tags(out["results"]))
    finally:
        writer.close()
    out["results_path"] = path
    return out
