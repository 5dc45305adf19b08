"""Validation loss and perplexity of a checkpoint.

    python -m fogjax.evaluate --workdir=runs/default [--step 200] [--batches 8]

Prints one JSON object: {"step", "loss", "perplexity", "tokens"}. The config is the one the run
wrote to ``<workdir>/config.json``; the checkpoint is the latest unless --step is given.

    python -m fogjax.evaluate --workdir=runs/default --tasks=fog_downstream [--recipe bf16]

With --tasks, evaluates downstream with lm-evaluation-harness instead (fogjax/downstream.py;
needs requirements-eval.txt) and prints the results table.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging

from fogjax import checkpoint, data, sharding
from fogjax import state as state_lib


def validation_loss(
    eval_fn: Any, state: Any, info: data.DatasetInfo, config: Any, mesh: Any, num_batches: int
) -> dict[str, float]:
    """Mean token loss over ``num_batches`` validation batches of the run's batch size."""
    t = config.train
    index, count = sharding.process_batch_shard(mesh)
    loss_sum, tokens = 0.0, 0.0
    for batch in data.eval_batches(
        info,
        seq_len=t.seq_len,
        batch_size=t.batch_size // t.micro_batches,
        num_batches=num_batches,
        process_index=index,
        process_count=count,
    ):
        out = jax.device_get(eval_fn(state, sharding.global_batch_from_local(batch, mesh)))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": tokens}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by python -m fogjax.train."
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate_checkpoint(workdir: str, step: int | None = None, batches: int | None = None) -> dict:
    """{step, loss, perplexity, tokens} of the checkpoint ``step`` (latest if None) in workdir."""
    config = load_run_config(workdir)
    run = state_lib.build_run(config)
    # Read-only: a live trainer may be saving into this folder right now.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; train first.")
        with sharding.sharding_context(run.mesh):
            state, _, _ = ckpt.restore(run.abstract, step=step)
            info = data.load_dataset_info(config.data.path)
            result = validation_loss(
                run.eval_step, state, info, config, run.mesh, batches or config.train.eval_batches
            )
    finally:
        ckpt.close()
    return {"step": int(state["step"]), **result}


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
    from fogjax.downstream import run_downstream  # Needs lm-eval, only in this mode.
    from fogjax.inference import NoCheckpointError

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
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    from lm_eval.utils import make_table

    print(make_table(out))
    print(f"Results: {out['results_path']}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir:
        raise app.UsageError("Give --workdir=DIR (a directory written by python -m fogjax.train).")
    if f.tasks:
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines.
        _downstream(f)
        return
    try:
        print(json.dumps(evaluate_checkpoint(f.workdir, f.step, f.batches)))
    except (FileNotFoundError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
