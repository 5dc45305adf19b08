"""Tiny FOG-flash and Llama3 train 300 steps under nvfp4 on the embedded corpus: the loss falls and
ends within a stated margin of BF16; QAF from a configured step moves the loss toward BF16; a run
resumed mid-run, and one resumed before the QAF switch, reproduce the losses bit for bit.

Sized for CI: 2 layers, d_model 64, seq 32, batch 8 (tens of ms a step on a CPU core). Each
run is trained once per module (functools.cache) and asserted by several tests. The runs use the
trainer's own objects (train.run.build_run's jitted, donating steps; train.qaf.QafHooks).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fogjax import config_lib, data, sharding
from fogjax.train import run as state_lib
from fogjax.train.qaf import QafHooks

pytestmark = pytest.mark.slow  # 300-step trainings, cached across the module's tests

STEPS = 300
RESUME_AT = 280  # mid-run resume of the plain nvfp4 run
QAF_AT = 240  # precision.qaf_start
CKPT_BEFORE_QAF = 230  # checkpoint of the QAF run taken before its switch
QAF_WARMUP = 8  # precision.qaf_warmup_steps of the QAF run (LR reset off: see the QAF test)
WARMUP, COOLDOWN, PEAK_LR, MIN_LR = 30, 60, 3e-3, 1e-8
TAIL = 20  # final loss = mean of the last TAIL steps (same batches in every run)
# |final nvfp4 loss - BF16's| allowed. Measured at 300 steps (CPU): FOG-flash nvfp4 2.238 vs bf16
# 2.236 (gap 0.003), Llama3 2.376 vs 2.324 (gap 0.052); from 5.8 at init.
MARGIN = 0.1


def tiny_config(arch: str, recipe: str, **precision):
    cfg = config_lib.get_config(arch, "tiny")
    cfg.precision.recipe = recipe
    for k, v in precision.items():
        setattr(cfg.precision, k, v)
    cfg.model.num_layers, cfg.model.d_model, cfg.model.ffn_dim = 2, 64, 192
    cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.vocab_size = 2, 1, 320
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = STEPS, 8, 32
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = WARMUP, COOLDOWN
    cfg.optim.peak_lr, cfg.optim.min_lr = PEAK_LR, MIN_LR
    return cfg


@functools.cache
def batches() -> tuple[np.ndarray, ...]:
    it = data.make_train_iterator("embedded:bytes", seq_len=32, global_batch_size=8, seed=0)
    return tuple(next(it) for _ in range(STEPS))


@functools.cache
def build(arch: str, recipe: str, **precision) -> state_lib.Run:
    cfg = tiny_config(arch, recipe, **precision)
    return state_lib.build_run(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def train(run, state, start, step_for, save_at=()):
    """Runs steps start..STEPS-1 with ``step_for(step)``; (losses, lrs, {step: host state})."""
    losses, lrs, saved = [], [], {}
    with sharding.sharding_context(run.mesh):
        for i in range(start, STEPS):
            if i in save_at:
                saved[i] = jax.device_get(state)  # what a checkpoint holds
            state, metrics = step_for(i)(state, jnp.asarray(batches()[i]))
            losses.append(float(metrics["loss"]))
            lrs.append(float(metrics["lr"]))
    return np.asarray(losses), np.asarray(lrs), saved


def fresh_state(run):
    with sharding.sharding_context(run.mesh):
        return state_lib.create_state(run.init, run.shardings, run.config.seed)


@functools.cache
def plain(arch: str, recipe: str):
    """(losses [STEPS], host state at RESUME_AT and at QAF_AT) of a run without QAF."""
    run = build(arch, recipe)
    step = run.train_steps[False]
    losses, _, saved = train(run, fresh_state(run), 0, lambda _: step, (RESUME_AT, QAF_AT))
    return losses, saved


@functools.cache
def qaf_run():
    """FOG-flash nvfp4 with QAF from QAF_AT: (losses [STEPS], lrs, hooks, host state and QAF
    metadata at CKPT_BEFORE_QAF)."""
    run = build("fog_flash", "nvfp4", qaf_start=float(QAF_AT), qaf_warmup_steps=QAF_WARMUP)
    hooks = QafHooks.maybe(run, None)
    fp4_step = build("fog_flash", "nvfp4").train_steps[False]  # the same program, compiled once
    meta = {}

    def step_for(i):
        if i == CKPT_BEFORE_QAF:
            meta.update(hooks.metadata())
        return hooks.pick_step(i, False, fp4_step)

    losses, lrs, saved = train(run, fresh_state(run), 0, step_for, (CKPT_BEFORE_QAF,))
    return losses, lrs, run, hooks, saved[CKPT_BEFORE_QAF], meta


def final(losses):
    return float(np.mean(losses[-TAIL:]))


@pytest.mark.parametrize("arch", ["fog_flash", "llama3"])
def test_nvfp4_trains_300_steps_and_ends_near_bf16(arch):
    fp4, _ = plain(arch, "nvfp4")
    bf16, _ = plain(arch, "bf16")
    assert np.all(np.isfinite(fp4))
    assert final(fp4) < fp4[0] - 3.0, fp4[::50]  # ln(320) = 5.8 at init
    assert final(fp4) < np.mean(fp4[100:120])  # still falling after the first third
    assert abs(final(fp4) - final(bf16)) < MARGIN, (final(fp4), final(bf16))
    assert not np.array_equal(fp4, bf16)  # the recipe really changed the numbers


def test_resume_mid_run_under_nvfp4_reproduces_losses_bitwise():
    losses, saved = plain("fog_flash", "nvfp4")
    run = build("fog_flash", "nvfp4")
    step = run.train_steps[False]
    resumed, _, _ = train(
        run, jax.device_put(saved[RESUME_AT], run.shardings), RESUME_AT, lambda _: step
    )
    np.testing.assert_array_equal(resumed, losses[RESUME_AT:])


def test_qaf_starts_at_the_configured_step_with_its_warmup_and_moves_the_loss_toward_bf16():
    qaf, lrs, *_ = qaf_run()
    fp4, _ = plain("fog_flash", "nvfp4")
    bf16, _ = plain("fog_flash", "bf16")
    np.testing.assert_array_equal(qaf[:QAF_AT], fp4[:QAF_AT])  # the same program until the switch
    assert qaf[QAF_AT] != fp4[QAF_AT] or qaf[QAF_AT + 1] != fp4[QAF_AT + 1]
    # The reported LR: the run's WSD schedule, times (t - s + 1) / W over the QAF warm-up.
    for t in range(QAF_AT - 2, QAF_AT + QAF_WARMUP + 2):
        frac = min(max((t - (STEPS - COOLDOWN)) / COOLDOWN, 0.0), 1.0)
        wsd = PEAK_LR if t < STEPS - COOLDOWN else MIN_LR + (PEAK_LR - MIN_LR) * (1 - frac**0.5)
        ramp = min(1.0, (t - QAF_AT + 1) / QAF_WARMUP) if t >= QAF_AT else 1.0
        np.testing.assert_allclose(lrs[t], wsd * ramp, rtol=1e-6)
    # Over the QAF phase the gap to BF16 (same seed, same batches) is smaller than if the run had
    # continued in nvfp4. Measured (CPU): 0.0017 vs 0.0026 over the last TAIL steps (0.0002 vs
    # 0.0008 over the last 40). Small at this size, but the runs are deterministic.
    gap_qaf = final(qaf) - final(bf16)
    gap_fp4 = final(fp4) - final(bf16)
    assert gap_qaf < gap_fp4, (gap_qaf, gap_fp4)


def test_resume_before_the_qaf_switch_reproduces_the_uninterrupted_losses_bitwise():
    losses, lrs, run, hooks, saved, meta = qaf_run()
    assert meta["fp4_qaf"]["phase"] == "fp4"  # the checkpoint predates the switch
    resumed_hooks = copy.copy(hooks)  # the compiled steps; the phase comes from the checkpoint
    resumed_hooks.switch = QafHooks.maybe(run, meta).switch
    assert resumed_hooks.switch.phase == "fp4"
    fp4_step = build("fog_flash", "nvfp4").train_steps[False]
    resumed, resumed_lrs, _ = train(
        run,
        jax.device_put(saved, run.shardings),
        CKPT_BEFORE_QAF,
        lambda i: resumed_hooks.pick_step(i, False, fp4_step),
    )
    assert resumed_hooks.switch.phase == "qaf" and resumed_hooks.switch.switch_step == QAF_AT
    np.testing.assert_array_equal(resumed, losses[CKPT_BEFORE_QAF:])
    np.testing.assert_array_equal(resumed_lrs, lrs[CKPT_BEFORE_QAF:])
