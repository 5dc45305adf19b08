"""Validation loss and perplexity of a checkpoint.

    python -m fogjax.evaluate --workdir=runs/default [--step 200] [--batches 8]

Prints one JSON object: {"step", "loss", "perplexity", "tokens"}. The config is the one the run
wrote to ``<workdir>/config.json``; the checkpoint is the latest unless --step is given.

    python -m fogjax.evaluate --workdir=runs/default --tasks=fog_downstream [--recipe bf16]

With --tasks, evaluates downstream with lm-evaluation-harness instead (fogjax/evaluate/harness.py;
needs requirements-eval.txt) and prints the results table.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from fogjax import command_line
from fogjax.evaluate.loss import evaluate_checkpoint
from fogjax.inference.load import NoCheckpointError


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    flags.DEFINE_string("workdir", None, "A run directory written by fogjax.train.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("batches", None, "Validation batches (default: train.eval_batches).")
    flags.DEFINE_list("tasks", None, "lm-evaluation-harness tasks/groups, e.g. fog_downstream.")
    flags.DEFINE_string("recipe", None, "With --tasks: None = the run's recipe, or 'bf16'.")
    flags.DEFINE_integer("batch_size", 8, "With --tasks: rows per forward pass.")
    flags.DEFINE_float("limit", None, "With --tasks: examples per task (< 1: a fraction).")
    flags.DEFINE_integer("num_fewshot", None, "With --tasks: few-shot examples (default 0).")
    flags.DEFINE_list("include_path", [], "With --tasks: folders of extra task YAMLs.")


def _downstream(f: Any) -> None:
    try:
        from fogjax.evaluate.harness import run_downstream  # Needs lm-eval, only in this mode.
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        print(
            "ERROR: --tasks needs lm-evaluation-harness, which is not installed: "
            "pip install -r requirements-eval.txt",
            file=sys.stderr,
        )
        sys.exit(2)

    try:
        out = run_downstream(
            f.workdir,
            f.tasks,
            step=f.step,
            recipe=f.recipe,
            batch_size=f.batch_size,
            limit=f.limit,
            num_fewshot=f.num_fewshot,
            include_path=f.include_path,
        )
    except (NoCheckpointError, ValueError) as e:
        command_line.fail(str(e))
    from lm_eval.utils import make_table

    print(make_table(out))
    print(f"Results: {out['results_path']}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir:
        raise app.UsageError("Give --workdir=DIR (a directory written by python -m fogjax.train).")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines; --verbosity=0.
    if f.tasks:
        _downstream(f)
        return
    try:
        print(json.dumps(evaluate_checkpoint(f.workdir, f.step, f.batches)))
    except (FileNotFoundError, ValueError) as e:
        command_line.fail(str(e))


if __name__ == "__main__":
    _define_flags()
    command_line.run(main)
