"""QAF: the start step from ``precision.qaf_start``, rho against NumPy, the automatic switch on a
synthetic gradient stream whose RMS decays, the saved phase, and the trainer hooks' step choice."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fogjax import config_lib, optim
from fogjax.model import weight_decay_mask
from fogjax.precision import fp4_qaf
from fogjax.precision.fp4_qaf import RHO_THRESHOLD, QafSwitch
from fogjax.train import run as state_lib
from fogjax.train.qaf import METADATA_KEY, QafHooks


def test_qaf_start_is_a_step_or_a_fraction_of_training():
    assert fp4_qaf.qaf_start_step(-1, 1000) is None
    assert fp4_qaf.qaf_start_step(0.9, 1000) == 900
    assert fp4_qaf.qaf_start_step(250, 1000) == 250
    with pytest.raises(ValueError, match="whole step number"):
        fp4_qaf.qaf_start_step(2.5, 1000)


def test_fixed_switch_starts_at_the_configured_step_and_survives_a_restore():
    switch = QafSwitch(start_step=7)
    assert [switch.in_qaf(s) for s in range(5, 10)] == [False, False, True, True, True]
    resumed = QafSwitch(start_step=7)
    resumed.restore(switch.to_metadata())
    assert resumed.phase == "qaf" and resumed.switch_step == 7 and resumed.in_qaf(8)


def test_rho_matches_numpy_per_layer():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 8, 16))
    fp4 = ref + rng.normal(size=ref.shape) * np.array([0.1, 1.0, 10.0])[:, None, None]
    ours = np.asarray(fp4_qaf.weight_grad_rho(jnp.asarray(fp4), jnp.asarray(ref), True))
    expected = np.sqrt((ref**2).mean((1, 2))) / (fp4 - ref).std((1, 2))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def synthetic_rho(decay: float, noise: float, steps: int) -> list[float]:
    """rho of a gradient whose RMS decays as decay**t, quantised with noise of a fixed std."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(64, 64))
    rhos = []
    for t in range(steps):
        g_ref = signal * decay**t
        g_fp4 = g_ref + rng.normal(size=signal.shape) * noise
        rhos.append(float(fp4_qaf.weight_grad_rho(jnp.asarray(g_fp4), jnp.asarray(g_ref), False)))
    return rhos


def test_auto_switch_fires_once_rho_stays_below_sqrt3():
    rhos = synthetic_rho(decay=0.9, noise=0.1, steps=40)
    # RMS 0.9**t against noise 0.1: rho ~ 10 * 0.9**t crosses sqrt(3) near t = 16.6.
    below = [r < RHO_THRESHOLD for r in rhos]
    expected = next(t for t in range(1, 40) if below[t - 1] and below[t])  # patience 2
    assert 15 <= expected <= 19
    switch = QafSwitch(auto=True, patience=2)
    fired = [t for t, r in enumerate(rhos) if switch.observe(t, r)]
    assert fired == [expected]
    assert switch.switch_step == expected + 1
    assert not switch.in_qaf(expected) and switch.in_qaf(expected + 1)


def test_auto_switch_ignores_a_single_dip():
    switch = QafSwitch(auto=True, patience=2)
    assert not any(switch.observe(t, r) for t, r in enumerate([5.0, 1.0, 5.0, 1.5, 2.0]))
    assert switch.phase == "fp4"


def test_rho_scalars_name_each_layer():
    tags = fp4_qaf.rho_scalars({"layers/attn/wqkv": np.array([2.0, 4.0])})
    assert tags == {
        "fp4/layers_0/attn/wqkv/rho": 2.0,
        "fp4/layers_1/attn/wqkv/rho": 4.0,
        "fp4/rho/avg": 3.0,
    }


def tiny_run(**precision):
    cfg = config_lib.get_config("fog_flash", "tiny")
    cfg.precision.recipe = "nvfp4"
    cfg.model.num_layers, cfg.model.d_model, cfg.model.ffn_dim = 2, 64, 192
    cfg.model.vocab_size, cfg.train.seq_len, cfg.train.steps = 256, 16, 20
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 2, 2
    for k, v in precision.items():
        setattr(cfg.precision, k, v)
    return state_lib.build_run(cfg)


def test_trainer_hooks_run_the_qaf_step_from_the_configured_step():
    assert QafHooks.maybe(tiny_run(), None) is None  # QAF off by default
    run = tiny_run(qaf_start=0.5)
    assert run.recipe.backward == "fp4"
    hooks = QafHooks.maybe(run, None)
    fp4_step = object()
    picks = [hooks.pick_step(s, False, fp4_step) is fp4_step for s in range(8, 12)]
    assert picks == [True, True, False, False]  # QAF from step 10 = 0.5 * 20
    assert hooks.pick_step(12, True, fp4_step) is not fp4_step
    resumed = QafHooks.maybe(run, hooks.metadata())
    assert resumed.switch.phase == "qaf" and resumed.metadata()[METADATA_KEY]["switch_step"] == 10


def optim_config(total=100):
    cfg = config_lib.get_config("fog_flash", "tiny")
    cfg.optim.peak_lr, cfg.optim.min_lr = 1e-3, 1e-5
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 10, 20
    return cfg.optim, optim.make_schedule(cfg.optim, total)


def hand_wsd(t, peak=1e-3, low=1e-5, warmup=10, cooldown=20, total=100):
    if t < warmup:
        return peak * t / warmup
    if t < total - cooldown:
        return peak
    return low + (peak - low) * (1 - math.sqrt((t - (total - cooldown)) / cooldown))


def test_qaf_lr_reset_and_warmup_around_the_switch_match_a_hand_computation():
    o, base = optim_config()
    both = fp4_qaf.QafLr(reset=True, warmup_steps=4)
    warm = fp4_qaf.QafLr(reset=False, warmup_steps=4)
    # One compiled schedule for any switch step (qaf_auto learns it at run time).
    lr = jax.jit(
        lambda t, s, reset: jax.lax.cond(
            reset,
            lambda: fp4_qaf.qaf_schedule(base, s, both, o.peak_lr, o.min_lr, 100)(t),
            lambda: fp4_qaf.qaf_schedule(base, s, warm, o.peak_lr, o.min_lr, 100)(t),
        )
    )
    for s in (60, 84):
        for t in range(s - 2, s + 8):
            ramp = min(1.0, (t - s + 1) / 4) if t >= s else 1.0
            decay = 1e-3 + (1e-5 - 1e-3) * (t - s) / (100 - s)
            want_reset = hand_wsd(t) if t < s else decay * ramp
            want_warm = hand_wsd(t) * ramp
            np.testing.assert_allclose(float(lr(t, s, True)), want_reset, rtol=1e-6)
            np.testing.assert_allclose(float(lr(t, s, False)), want_warm, rtol=1e-6)
    assert float(lr(60, 60, True)) == pytest.approx(1e-3 / 4)  # reset to peak, 1/W of it
    assert not fp4_qaf.QafLr().active and fp4_qaf.QafLr(warmup_steps=1).active
    with pytest.raises(ValueError, match="qaf_warmup_steps=-1"):
        fp4_qaf.QafLr.from_config(type("P", (), {"qaf_warmup_steps": -1})())


def test_optimizer_follows_the_schedule_it_is_given():
    o, _ = optim_config()
    params = {"kernel": jnp.ones((4, 4))}
    grads = {"kernel": jnp.full((4, 4), 0.5)}
    for lr in (0.0, 1e-2):
        tx = optim.make_optimizer(o, 100, weight_decay_mask, schedule=lambda _, lr=lr: lr)
        updates, _ = tx.update(grads, tx.init(params), params)
        # Adam's first step is g / |g| = 1 per entry, plus decay 0.1 * p, times -lr.
        np.testing.assert_allclose(updates["kernel"], -lr * (1.0 + 0.1), rtol=1e-5)
