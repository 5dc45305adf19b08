"""Exporting a run: its checkpoint, read through the one read-only loader
(fogjax/inference/load.py), written by :func:`fogjax.export.writer.export_params`."""

from __future__ import annotations

import os
from collections.abc import Callable

from fogjax import data
from fogjax.export.safetensors_io import DEFAULT_MAX_SHARD_BYTES
from fogjax.export.writer import ExportResult, check_output, export_params
from fogjax.inference.load import load_run


def export_run(
    workdir: str,
    output: str,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Writes checkpoint ``step`` (latest if None) of the run in ``workdir`` to ``output``.

    The run's tokenizer comes from its data folder (its metadata); when that folder is gone, the
    export goes on without tokenizer files and says so.

    Raises:
      ValueError: ``output`` exists and is not empty; an unknown dtype (nothing written).
      fogjax.inference.load.NoCheckpointError: no run, no checkpoint, or no checkpoint ``step``.
    """
    check_output(output)  # Before loading anything.
    restored = load_run(workdir, step)
    config = restored.config
    try:
        tokenizer = data.load_dataset_info(config.data.path).load_tokenizer()
    except (OSError, ValueError) as e:
        log(f"Warning: no tokenizer files exported ({e}); copy the run's tokenizer into {output}.")
        tokenizer = None
    m = config.model
    log(
        f"Exporting {workdir} step {restored.step}: {m.arch}, {m.num_layers} layers, "
        f"d_model {m.d_model}, vocab {m.vocab_size}, to {output} ({dtype})"
    )
    # Leaves are fetched to the host one at a time as they are written (mapping.to_hf).
    return export_params(
        restored.state["params"],
        config,
        output,
        restored.run.recipe,
        tokenizer=tokenizer,
        dtype=dtype,
        info={
            "workdir": os.path.abspath(workdir),
            "step": restored.step,
            "recipe": config.precision.recipe,
        },  # fmt: skip
        max_shard_bytes=max_shard_bytes,
        log=log,
    )
