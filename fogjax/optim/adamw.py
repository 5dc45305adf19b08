"""The AdamW optimizer chain, the stored master weights, gradient dtype and norm metrics.

The optimizer only ever sees parameters. The FP8 scaling state is not trained: the train step
replaces it with its new value, so it never enters clipping, weight decay or the gradient norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fogjax.optim import adam_lowp, moment_formats, state_precision
from fogjax.optim.schedules import make_schedule


def make_optimizer(
    optim_cfg: Any,
    total_steps: int,
    weight_decay_mask: Any,
    schedule: optax.Schedule | None = None,
) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) followed by AdamW on the schedule of :func:`make_schedule`.

    ``weight_decay_mask`` is a pytree of bools matching the parameters (or a callable returning
    one): True leaves are decayed. The model decides which leaves are matrices — ndim cannot,
    since nn.scan stacks 1-D gains into [L, D] arrays. Decay is decoupled and scaled by the
    learning rate: p <- p - lr * (adam_update + weight_decay * p).

    The optimizer-state precision (fogjax.optim.state_precision) picks the pieces: all float32 is
    ``optax.adamw`` itself (today's numerics and checkpoint layout); low-precision moments
    replace ``scale_by_adam`` by :func:`fogjax.optim.adam_lowp.scale_by_adam_lowp`; a 16-bit master
    wraps Adam, decay and learning rate in :func:`fogjax.optim.adam_lowp.master_weights`; bfloat16
    gradients are cast to float32 before clipping, so the clip norm is a float32 sum.

    ``schedule`` replaces :func:`make_schedule`'s (QAF's LR reset, fogjax/precision/fp4_qaf.py);
    the optimizer state does not depend on it.
    """
    precision = state_precision.resolve(optim_cfg)
    clip = optim_cfg.grad_clip
    schedule = schedule or make_schedule(optim_cfg, total_steps)
    # grad_clip <= 0 turns clipping off (useful to study spikes unclipped).
    clipping = optax.clip_by_global_norm(clip) if clip and clip > 0 else optax.identity()
    if precision.is_float32:
        return optax.chain(
            clipping,
            optax.adamw(
                schedule,
                b1=optim_cfg.b1,
                b2=optim_cfg.b2,
                eps=optim_cfg.eps,
                weight_decay=optim_cfg.weight_decay,
                mask=weight_decay_mask,
            ),
        )
    if precision.mu == precision.nu == "float32":
        adam = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
    else:
        adam = adam_lowp.scale_by_adam_lowp(
            optim_cfg.b1,
            optim_cfg.b2,
            optim_cfg.eps,
            moment_formats.moment_format(precision.mu, "optim.mu_dtype"),
            moment_formats.moment_format(precision.nu, "optim.nu_dtype"),
            int(state_precision.field(optim_cfg, "state_block_size")),
            stochastic=state_precision.moment_rounding(optim_cfg) == "stochastic",
        )
    # optax.adamw's own chain, with the moments' storage swapped.
    inner = optax.chain(
        adam,
        optax.add_decayed_weights(optim_cfg.weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
    if precision.master != "float32":
        rounding = state_precision.master_rounding(optim_cfg)
        inner = adam_lowp.master_weights(inner, jnp.dtype(precision.master), rounding)
    to_float32 = optax.identity()
    if precision.grad != "float32":
        to_float32 = optax.stateless(lambda g, _: jax.tree.map(lambda x: x.astype(jnp.float32), g))
    return optax.chain(to_float32, clipping, inner)


def master_cast(optim_cfg: Any) -> Callable[[Any], Any]:
    """float32 params -> params as the train state stores them (the master, in master_dtype).

    The identity for a float32 master; works on boxed (logically partitioned) trees.
    """
    precision = state_precision.resolve(optim_cfg)
    if precision.master == "float32":
        return lambda params: params
    rounding = state_precision.master_rounding(optim_cfg)
    return adam_lowp.master_cast(jnp.dtype(precision.master), rounding)


def grad_dtype(optim_cfg: Any) -> Any:
    """The dtype gradients are cast to after each micro-batch's backward and accumulated in."""
    return jnp.dtype(state_precision.resolve(optim_cfg).grad)


def global_norm(tree: Any) -> jax.Array:
    """sqrt(sum of squares) over every leaf, accumulated in float32 (a scalar float32).

    Casting first keeps BF16 gradients from losing the small terms of the sum.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def norm_metrics(grads: Any, params: Any, updates: Any) -> dict[str, jax.Array]:
    """Global norms for logging: the raw (pre-clip) gradients, the parameters, the updates."""
    return {
        "grad_norm": global_norm(grads),
        "param_norm": global_norm(params),
        "update_norm": global_norm(updates),
    }
