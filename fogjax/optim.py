"""Learning-rate schedules, the AdamW optimizer chain and norm metrics (SPEC.md §2).

The optimizer only ever sees parameters. The FP8 scaling state is not trained: the train step
replaces it with its new value, so it never enters clipping, weight decay or the gradient norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fogjax import optim_formats, optim_lowp, optim_precision


def _wsd(peak_lr: float, min_lr: float, warmup: int, cooldown: int, total: int) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup from 0, constant, then a 1-sqrt cooldown to min_lr.

    lr(t) = min_lr + (peak_lr - min_lr) * (1 - sqrt((t - (T - C)) / C)) over the last C steps;
    C = 0 keeps the peak to the end.
    """
    cooldown_start = total - cooldown

    def schedule(step: jax.Array | int) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        warm = peak_lr * t / max(warmup, 1)
        if cooldown == 0:
            return jnp.where(t < warmup, warm, peak_lr)
        # Clipped to [0, 1] so steps past T stay at min_lr.
        frac = jnp.clip((t - cooldown_start) / cooldown, 0.0, 1.0)
        cool = min_lr + (peak_lr - min_lr) * (1.0 - jnp.sqrt(frac))
        return jnp.where(t < warmup, warm, jnp.where(t < cooldown_start, peak_lr, cool))

    return schedule


def _cosine(
    peak_lr: float, min_lr: float, warmup: int, cooldown: int, total: int
) -> optax.Schedule:
    """Linear warmup from 0, then a half cosine from peak_lr to min_lr at step T.

    ``cooldown`` is unused: the cosine decays over every step after warmup.
    """
    del cooldown
    decay_steps = max(total - warmup, 1)

    def schedule(step: jax.Array | int) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        warm = peak_lr * t / max(warmup, 1)
        frac = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
        cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(t < warmup, warm, cos)

    return schedule


SCHEDULES: dict[str, Callable[[float, float, int, int, int], optax.Schedule]] = {
    "wsd": _wsd,
    "cosine": _cosine,
}


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step (int32 scalar -> float32 scalar).

    ``optim_cfg`` is the config's ``optim`` section (schedule, peak_lr, min_lr, warmup_steps,
    cooldown_steps); ``total_steps`` is ``train.steps``.
    """
    name = optim_cfg.schedule
    if name not in SCHEDULES:
        raise ValueError(
            f"Unknown optim.schedule {name!r}; choose one of {sorted(SCHEDULES)} "
            f"(e.g. --config.optim.schedule=wsd)."
        )
    warmup, cooldown = int(optim_cfg.warmup_steps), int(optim_cfg.cooldown_steps)
    if warmup < 0 or cooldown < 0:
        raise ValueError(
            f"optim.warmup_steps ({warmup}) and optim.cooldown_steps ({cooldown}) must be >= 0."
        )
    if name == "wsd" and warmup + cooldown > total_steps:
        raise ValueError(
            f"optim.warmup_steps ({warmup}) + optim.cooldown_steps ({cooldown}) exceeds "
            f"train.steps ({total_steps}). Lower them or raise train.steps, e.g. "
            f"--config.optim.warmup_steps={total_steps // 10} "
            f"--config.optim.cooldown_steps={total_steps // 5}."
        )
    # The cosine schedule ignores cooldown_steps, so only warmup has to fit.
    if warmup > total_steps:
        raise ValueError(
            f"optim.warmup_steps ({warmup}) exceeds train.steps ({total_steps}). Lower it or "
            f"raise train.steps, e.g. --config.optim.warmup_steps={total_steps // 10}."
        )
    return SCHEDULES[name](
        float(optim_cfg.peak_lr), float(optim_cfg.min_lr), warmup, cooldown, int(total_steps)
    )


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

    The optimizer-state precision (fogjax.optim_precision) picks the pieces: all float32 is
    ``optax.adamw`` itself (today's numerics and checkpoint layout); low-precision moments
    replace ``scale_by_adam`` by :func:`fogjax.optim_lowp.scale_by_adam_lowp`; a 16-bit master
    wraps Adam, decay and learning rate in :func:`fogjax.optim_lowp.master_weights`; bfloat16
    gradients are cast to float32 before clipping, so the clip norm is a float32 sum.

    ``schedule`` replaces :func:`make_schedule`'s (QAF's LR reset, fogjax/precision/fp4_qaf.py);
    the optimizer state does not depend on it.
    """
    precision = optim_precision.resolve(optim_cfg)
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
        adam = optim_lowp.scale_by_adam_lowp(
            optim_cfg.b1,
            optim_cfg.b2,
            optim_cfg.eps,
            optim_formats.moment_format(precision.mu, "optim.mu_dtype"),
            optim_formats.moment_format(precision.nu, "optim.nu_dtype"),
            int(optim_precision.field(optim_cfg, "state_block_size")),
            stochastic=optim_precision.field(optim_cfg, "moment_rounding") == "stochastic",
        )
    # optax.adamw's own chain, with the moments' storage swapped.
    inner = optax.chain(
        adam,
        optax.add_decayed_weights(optim_cfg.weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
    if precision.master != "float32":
        rounding = optim_precision.master_rounding(optim_cfg)
        inner = optim_lowp.master_weights(inner, jnp.dtype(precision.master), rounding)
    to_float32 = optax.identity()
    if precision.grad != "float32":
        to_float32 = optax.stateless(lambda g, _: jax.tree.map(lambda x: x.astype(jnp.float32), g))
    return optax.chain(to_float32, clipping, inner)


def master_cast(optim_cfg: Any) -> Callable[[Any], Any]:
    """float32 params -> params as the train state stores them (the master, in master_dtype).

    The identity for a float32 master; works on boxed (logically partitioned) trees.
    """
    precision = optim_precision.resolve(optim_cfg)
    if precision.master == "float32":
        return lambda params: params
    rounding = optim_precision.master_rounding(optim_cfg)
    return optim_lowp.master_cast(jnp.dtype(precision.master), rounding)


def grad_dtype(optim_cfg: Any) -> Any:
    """The dtype gradients are cast to after each micro-batch's backward and accumulated in."""
    return jnp.dtype(optim_precision.resolve(optim_cfg).grad)


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
