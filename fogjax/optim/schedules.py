"""Learning-rate schedules (docs/spec.md §2): warmup-stable-decay with a 1-sqrt cooldown, and
cosine."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


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
