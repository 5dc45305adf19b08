"""``train.init_from``: a fresh run's state with its params from a Hugging Face checkpoint.

The weights are read and checked before the workdir is touched (:func:`read_init_params`, called
by the trainer before it writes anything); the state is then the fresh state of the run with
those params: the master params cast as the optimizer keeps them, optimizer moments initialised
from the imported float32 values, FP8 scaling state fresh, step 0. Training then goes on, and
saves and resumes, like any other run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from fogjax import checkpoint, optim
from fogjax.train.run import Run, State


def workdir_has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint to resume from (read only)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory) or not os.listdir(directory):
        return False
    ckpt = checkpoint.Checkpointer(directory, keep=1, read_only=True)
    try:
        return ckpt.latest_step() is not None
    finally:
        ckpt.close()


def read_init_params(run: Run, workdir: str) -> dict | None:
    """The imported float32 NumPy params when the run starts fresh from ``train.init_from``,
    else None (no init_from, or a workdir that resumes). ValueError names any mismatch."""
    directory = run.config.train.init_from
    if not directory or workdir_has_checkpoint(workdir):
        return None
    try:
        from fogjax.export.hf_import import read_params  # Needs transformers.
    except ModuleNotFoundError as e:
        raise ValueError(
            f"train.init_from needs transformers ({e}): pip install -r requirements-export.txt"
        ) from None
    return read_params(directory, run.config, run.abstract["params"])


def state_with_params(run: Run, fresh: State, params: dict) -> State:
    """``fresh`` (a new state of ``run``) with ``params`` (float32 NumPy, the model's layout)
    as its master params, and optimizer moments initialised from them; sharded as the run's."""
    shardings = run.shardings["params"]

    def put(array: np.ndarray, sharding: Any) -> jax.Array:
        # Each process holds the whole array and gives each device its own slice.
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    device_params = jax.tree.map(put, params, shardings)
    master_cast = optim.master_cast(run.config.optim)

    def replace(state: State, p: Any) -> State:
        return {**state, "params": master_cast(p), "opt_state": run.tx.init(p)}

    return jax.jit(replace, out_shardings=run.shardings, donate_argnums=0)(fresh, device_params)
