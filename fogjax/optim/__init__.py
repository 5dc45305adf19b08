"""The optimizer: AdamW as an optax chain, its learning-rate schedules, and the precision of its
state.

- :mod:`.schedules`: warmup-stable-decay and cosine (docs/spec.md §2).
- :mod:`.adamw`: the chain (clipping, AdamW, decoupled decay), the master-weight cast, gradient
  dtype and the norm metrics.
- :mod:`.state_precision`: the per-state dtypes (master, moments, gradients), presets, checks.
- :mod:`.adam_lowp`: Adam with low-precision moments and a 16-bit master, as optax transforms.
- :mod:`.moment_formats`: how a moment is stored (float32 ... FP8, int8 blocks) and rounded.

The optimizer only ever sees parameters. The FP8 scaling state is not trained: the train step
replaces it with its new value, so it never enters clipping, weight decay or the gradient norm.
"""

from fogjax.optim.adamw import (
    global_norm,
    grad_dtype,
    make_optimizer,
    master_cast,
    norm_metrics,
)
from fogjax.optim.schedules import SCHEDULES, make_schedule

__all__ = [
    "SCHEDULES",
    "global_norm",
    "grad_dtype",
    "make_optimizer",
    "make_schedule",
    "master_cast",
    "norm_metrics",
]
