"""Schedules against their formulas, the weight-decay mask, global-norm clipping."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fogjax import optim

PEAK, MIN, W, C, T = 1e-3, 1e-8, 100, 200, 1000


def _cfg(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        dict(
            schedule="wsd",
            peak_lr=PEAK,
            min_lr=MIN,
            warmup_steps=W,
            cooldown_steps=C,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip=1.0,
        )
    )
    c.update(overrides)
    return c


def _wsd_reference(t: int, warmup: int = W, cooldown: int = C) -> float:
    if t < warmup:
        return PEAK * t / warmup
    if t < T - cooldown:
        return PEAK
    return MIN + (PEAK - MIN) * (1 - math.sqrt((t - (T - cooldown)) / cooldown))


@pytest.mark.parametrize("t", [0, 50, 99, 100, 500, 799, 800, 900, 950, 1000])
def test_wsd_matches_formula(t):
    lr = optim.make_schedule(_cfg(), T)(t)
    np.testing.assert_allclose(float(lr), _wsd_reference(t), rtol=1e-6, atol=1e-12)


def test_wsd_end_points():
    s = optim.make_schedule(_cfg(), T)
    assert float(s(0)) == 0.0
    assert float(s(W)) == pytest.approx(PEAK)
    assert float(s(T)) == pytest.approx(MIN, rel=1e-5)
    assert float(s(T + 10)) == pytest.approx(MIN, rel=1e-5)  # Stays at the floor past T.


def test_wsd_without_cooldown_stays_at_peak():
    s = optim.make_schedule(_cfg(cooldown_steps=0), T)
    assert [float(s(t)) for t in (W, T - 1, T)] == pytest.approx([PEAK] * 3)


def test_wsd_is_jittable_on_int32_steps():
    s = jax.jit(optim.make_schedule(_cfg(), T))
    lr = s(jnp.asarray(900, jnp.int32))
    np.testing.assert_allclose(float(lr), _wsd_reference(900), rtol=1e-6)


@pytest.mark.parametrize("t", [0, 50, 100, 325, 550, 1000])
def test_cosine_matches_formula(t):
    lr = optim.make_schedule(_cfg(schedule="cosine"), T)(t)
    if t < W:
        ref = PEAK * t / W
    else:
        ref = MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))
    np.testing.assert_allclose(float(lr), ref, rtol=1e-5, atol=1e-12)


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match=r"optim\.schedule.*'linear'.*cosine.*wsd"):
        optim.make_schedule(_cfg(schedule="linear"), T)


def test_phases_longer_than_the_run_are_refused():
    with pytest.raises(
        ValueError, match=r"warmup_steps \(100\).*cooldown_steps \(200\).*train\.steps \(250\)"
    ):
        optim.make_schedule(_cfg(), 250)


def test_cosine_only_needs_the_warmup_to_fit():
    optim.make_schedule(_cfg(schedule="cosine", warmup_steps=100, cooldown_steps=500), 250)
    with pytest.raises(ValueError, match=r"warmup_steps \(300\) exceeds train\.steps \(250\)"):
        optim.make_schedule(_cfg(schedule="cosine", warmup_steps=300), 250)


def _step(tx, params, grads):
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates)


def test_weight_decay_mask_is_honoured():
    # Zero gradients: Adam's update is 0, so only decay moves a leaf, by -lr * wd * p.
    # warmup 0 gives lr = peak at the first step.
    cfg = _cfg(warmup_steps=0, weight_decay=0.1)
    params = {"kernel": jnp.full((3, 4), 2.0), "gain": jnp.full((2, 4), 2.0)}  # gain: scanned 1-D.
    mask = {"kernel": True, "gain": False}
    new = _step(optim.make_optimizer(cfg, T, mask), params, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_allclose(new["kernel"], 2.0 - PEAK * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(new["gain"], params["gain"])


def test_weight_decay_mask_may_be_a_callable():
    cfg = _cfg(warmup_steps=0)
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    tx = optim.make_optimizer(cfg, T, lambda p: {"kernel": True, "scale": False})
    new = _step(tx, params, jax.tree.map(jnp.zeros_like, params))
    assert float(new["kernel"][0, 0]) < 1.0
    assert float(new["scale"][0]) == 1.0


def test_clipping_rescales_to_the_global_norm():
    # Adam's first step is scale-invariant, so read the clipped gradient from its first moment:
    # mu = (1 - b1) * clipped_grads after one update.
    cfg = _cfg(grad_clip=1.0)
    params = {"a": jnp.zeros((2,)), "b": jnp.zeros((1, 1))}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # Global norm 5.
    tx = optim.make_optimizer(cfg, T, {"a": True, "b": True})
    _, state = tx.update(grads, tx.init(params), params)
    clipped = jax.tree.map(lambda m: m / (1 - cfg.b1), optax.tree_utils.tree_get(state, "mu"))
    assert float(optim.global_norm(clipped)) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-6)


def test_small_gradients_are_not_clipped():
    cfg = _cfg(grad_clip=1.0)
    params = {"a": jnp.zeros((2,))}
    grads = {"a": jnp.array([0.3, 0.4])}  # Norm 0.5 < 1.
    tx = optim.make_optimizer(cfg, T, {"a": True})
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(mu["a"] / (1 - cfg.b1), [0.3, 0.4], rtol=1e-6)


def test_norm_metrics_accumulate_in_float32():
    grads = {"a": jnp.full((4,), 3.0, jnp.bfloat16), "b": jnp.full((4,), 4.0, jnp.bfloat16)}
    m = optim.norm_metrics(grads, {"p": jnp.ones((9,))}, {})
    assert m["grad_norm"].dtype == jnp.float32
    assert float(m["grad_norm"]) == pytest.approx(10.0)
    assert float(m["param_norm"]) == pytest.approx(3.0)
    assert float(m["update_norm"]) == 0.0
