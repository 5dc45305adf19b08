"""Held-out loss and perplexity: during training (the trainer's eval) and of a saved checkpoint.

The validation windows are the dataset's ``val`` split, read in the run's micro-batch size and
split over processes like the training batches; the loss is the mean token cross-entropy.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from fogjax import data, sharding
from fogjax.inference.load import load_run


def validation_loss(
    eval_fn: Any, state: Any, info: data.DatasetInfo, config: Any, mesh: Any, num_batches: int
) -> dict[str, float]:
    """{loss, perplexity, tokens}: the mean token loss over ``num_batches`` validation batches of
    ``train.batch_size // train.micro_batches`` windows. ``eval_fn(state, batch [B, T+1]) ->
    {'loss_sum', 'tokens'}`` is the run's jitted eval step. Raises ValueError if
    ``num_batches`` < 1 (no batch would read as a loss of 0.0 and a perplexity of 1.0)."""
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches}: evaluate at least one validation batch.")
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


def evaluate_checkpoint(workdir: str, step: int | None = None, batches: int | None = None) -> dict:
    """{step, loss, perplexity, tokens} of checkpoint ``step`` (the latest if None) of the run in
    ``workdir``, over ``batches`` validation batches (default: the run's train.eval_batches).
    Reads only (:func:`fogjax.inference.load.load_run`): a live trainer may be saving there.
    Raises ValueError for ``batches`` < 1 before anything is loaded."""
    if batches is not None and batches < 1:
        raise ValueError(
            f"--batches={batches} must be >= 1 (the validation batches averaged; leave it out "
            "for the run's train.eval_batches)."
        )
    restored = load_run(workdir, step)
    config, run = restored.config, restored.run
    if batches is None:
        batches = config.train.eval_batches
        if batches < 1:  # A run trained without eval (eval_every=0) may not set it.
            raise ValueError(
                f"The run's train.eval_batches is {batches} ({workdir}/config.json): pass "
                "--batches=N (N >= 1)."
            )
    with sharding.sharding_context(run.mesh):
        info = data.eval_dataset_info(config.data)
        result = validation_loss(
            run.eval_step,
            restored.state,
            info,
            config,
            run.mesh,
            batches,
        )
    return {"step": restored.step, **result}
