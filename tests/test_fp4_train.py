"""Tiny FOG-flash and Llama3 train under nvfp4 on the embedded corpus: the loss falls, ends near
BF16's, and a run resumed from a mid-run state reproduces the losses bit for bit.

Sized for CI (2 layers, d_model 64, seq 32, batch 8, STEPS = 20 steps rather than the issue's 300:
compiling the FP4 step dominates, and 300 steps of four runs would add about a minute).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fogjax import config_lib, data, optim
from fogjax.model import build_model, weight_decay_mask
from fogjax.step import make_train_step

STEPS = 20
RESUME_AT = 15
# |final loss (mean of the last 5 steps) - BF16's| allowed for nvfp4 at this size. Measured at 20
# steps: FOG-flash 3.204 vs 3.196, Llama3 3.628 vs 3.629; at 40 steps 2.740 vs 2.742 and 3.298 vs
# 3.230 (the gap can grow with training). From 5.8 at init, the loss falls by ~2.2 in 20 steps.
MARGIN = 0.15


def tiny_config(arch: str, recipe: str):
    cfg = config_lib.get_config(arch, "tiny")
    cfg.precision.recipe = recipe
    cfg.model.num_layers, cfg.model.d_model, cfg.model.ffn_dim = 2, 64, 192
    cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.vocab_size = 2, 1, 320
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = STEPS, 8, 32
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 5, 5
    return cfg


@functools.cache
def batches() -> tuple[np.ndarray, ...]:
    it = data.make_train_iterator("embedded:bytes", seq_len=32, global_batch_size=8, seed=0)
    return tuple(next(it) for _ in range(STEPS))


@functools.cache
def trained(arch: str, recipe: str):
    """(losses [STEPS], host state at RESUME_AT, the jitted step) of one tiny run."""
    cfg = tiny_config(arch, recipe)
    model = build_model(cfg)
    tx = optim.make_optimizer(cfg.optim, STEPS, weight_decay_mask)
    schedule = optim.make_schedule(cfg.optim, STEPS)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
    params = nn.unbox(variables["params"])
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "fp8": variables.get("fp8", {}),
        "opt_state": tx.init(params),
    }
    step = jax.jit(make_train_step(model, tx, schedule, rng_seed=cfg.seed))
    losses, saved = [], None
    for i, batch in enumerate(batches()):
        if i == RESUME_AT:
            saved = jax.device_get(state)  # what a checkpoint holds
        state, metrics = step(state, jnp.asarray(batch))
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), saved, step


@pytest.mark.parametrize("arch", ["fog_flash", "llama3"])
def test_nvfp4_trains_and_ends_near_bf16(arch):
    fp4, _, _ = trained(arch, "nvfp4")
    bf16, _, _ = trained(arch, "bf16")
    assert np.all(np.isfinite(fp4))
    assert fp4[-5:].mean() < fp4[0] - 1.0, fp4  # ln(320) = 5.8 at init
    assert abs(fp4[-5:].mean() - bf16[-5:].mean()) < MARGIN, (fp4[-5:], bf16[-5:])
    assert not np.array_equal(fp4, bf16)  # the recipe really changed the numbers


def test_resume_mid_run_under_nvfp4_reproduces_losses_bitwise():
    losses, saved, step = trained("fog_flash", "nvfp4")
    state = jax.device_put(saved)
    resumed = []
    for batch in batches()[RESUME_AT:]:
        state, metrics = step(state, jnp.asarray(batch))
        resumed.append(float(metrics["loss"]))
    np.testing.assert_array_equal(resumed, losses[RESUME_AT:])
