"""Delayed scaling: the update rule by hand, its edge cases, bit-identity with flax's fp8_ops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import fp8_ops

from fogjax.precision import scaling
from fogjax.precision.formats import E4M3, E4M3_MAX, E5M2, E5M2_MAX

# Five steps with H = 3; the 8 leaves the window at step 5. Powers of two keep every scale
# exact in float32, so expectations can be compared with ==.
AMAXES = [2.0, 8.0, 1.0, 0.5, 0.25]
# flax's ring: roll left by one, then overwrite index 0.
HISTORIES = [
    [2.0, 0.0, 0.0],
    [8.0, 0.0, 2.0],
    [1.0, 2.0, 8.0],
    [0.5, 8.0, 1.0],
    [0.25, 1.0, 0.5],
]
REDUCED = {"max": [2.0, 8.0, 8.0, 8.0, 1.0], "most_recent": AMAXES}


def _tensor(amax: float) -> jax.Array:
    # The max magnitude sits on a negative entry: amax must use |x|.
    return jnp.array([[0.25 * amax, -amax], [0.0, 0.5 * amax]], jnp.bfloat16)


@pytest.mark.parametrize("reduction", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 2])
def test_hand_computed_sequence(reduction, margin):
    state = scaling.init_state(3)
    np.testing.assert_array_equal(state.amax_history, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(state.scale_inv, [1.0])
    for t, amax in enumerate(AMAXES):
        state = scaling.update(state, _tensor(amax), E4M3_MAX, reduction, margin)
        np.testing.assert_array_equal(state.amax_history, HISTORIES[t])
        assert float(scaling.reduce_history(state.amax_history, reduction)) == REDUCED[reduction][t]
        expected = np.float32(REDUCED[reduction][t] * 2.0**margin / 448.0)
        np.testing.assert_array_equal(state.scale_inv, [expected])
        assert state.amax_history.dtype == jnp.float32 and state.scale_inv.dtype == jnp.float32


def test_e5m2_scale_uses_its_own_max():
    state = scaling.update(scaling.init_state(4), _tensor(1024.0), E5M2_MAX)
    np.testing.assert_array_equal(state.scale_inv, [np.float32(1024.0 / 57344.0)])


@pytest.mark.parametrize("bad", [0.0, np.inf, np.nan])
def test_zero_or_nonfinite_amax_keeps_the_old_scale_exactly(bad):
    # A float32 whose reciprocal of its reciprocal is a different float32: kept bit for bit anyway.
    old = jnp.array([0.7294965386390686], jnp.float32)
    assert float(1.0 / (1.0 / old[0])) != float(old[0])
    state = scaling.ScalingState(jnp.zeros((4,), jnp.float32), old)
    new = scaling.update(state, jnp.full((3,), bad, jnp.float32), E4M3_MAX)
    np.testing.assert_array_equal(new.scale_inv, old)
    # The first step of a fresh state sees an empty window: scale_inv stays 1.
    fresh = scaling.update(scaling.init_state(4), jnp.zeros((3,)), E4M3_MAX)
    np.testing.assert_array_equal(fresh.scale_inv, [1.0])
    # A later good step recovers, once the bad value has left a 'most_recent' window.
    good = scaling.update(new, _tensor(4.0), E4M3_MAX, "most_recent")
    np.testing.assert_array_equal(good.scale_inv, [np.float32(4.0 / 448.0)])


def test_unknown_reduction_is_an_error():
    with pytest.raises(ValueError, match="amax_reduction"):
        scaling.reduce_history(jnp.zeros((3,)), "mean")


def test_quantize_divides_by_scale_inv_and_saturates():
    x = jnp.array([1.0, 10.0, -1000.0], jnp.float32)
    q = scaling.quantize(x, jnp.array([0.5], jnp.float32), E4M3).astype(jnp.float32)
    np.testing.assert_array_equal(q, [2.0, 20.0, -448.0])
    y = scaling.dequantize(q.astype(E4M3), jnp.array([0.5], jnp.float32), jnp.float32)
    np.testing.assert_array_equal(y, [1.0, 10.0, -224.0])


@pytest.mark.parametrize("q_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bit_identical_to_flax_fp8_ops_over_steps(dtype, q_dtype):
    """Ours and flax's quantise every step identically; flax stores the scale one step later."""
    fp8_max = float(jnp.finfo(q_dtype).max)
    h, steps = 4, 8
    keys = jax.random.split(jax.random.PRNGKey(0), steps)
    # Magnitudes jump up and down so scales change, saturate and recover; the window wraps.
    magnitudes = [1.0, 30.0, 0.01, 500.0, 2.0, 0.5, 4000.0, 1.0]
    ours = scaling.init_state(h)
    flax_scale, flax_history = jnp.ones((1,), jnp.float32), jnp.zeros((h,), jnp.float32)
    ours_after = []
    for t in range(steps):
        x = (jax.random.normal(keys[t], (64, 32)) * magnitudes[t]).astype(dtype)
        # flax (in_q): derive this step's scale from the old window, store it, quantise with it.
        flax_scale, flax_history = fp8_ops.update_fp8_meta(x, q_dtype, flax_scale, flax_history)
        q_flax = fp8_ops.quantize(x, q_dtype, flax_scale, dtype)
        # Ours: quantise with the stored scale, then record this step and refresh the scale.
        q_ours = scaling.quantize(x, ours.scale_inv, q_dtype)
        np.testing.assert_array_equal(
            np.asarray(q_ours).view(np.uint8), np.asarray(q_flax).view(np.uint8)
        )
        if t > 0:
            # flax's scale stored after step t equals ours stored after step t - 1.
            np.testing.assert_array_equal(flax_scale, ours_after[t - 1])
        ours = scaling.update(ours, x, fp8_max)
        np.testing.assert_array_equal(ours.amax_history, flax_history)
        ours_after.append(ours.scale_inv)
    assert len({float(s[0]) for s in ours_after}) >= 4  # the scales really moved


def test_declare_state_creates_fp8_variables():
    class Holder(nn.Module):
        @nn.compact
        def __call__(self):
            return scaling.declare_state(self, "lhs", 5)

    variables = Holder().init(jax.random.PRNGKey(0))
    assert set(variables) == {"fp8"}
    np.testing.assert_array_equal(variables["fp8"]["lhs_amax_history"], np.zeros(5))
    np.testing.assert_array_equal(variables["fp8"]["lhs_scale_inv"], [1.0])
    state = Holder().apply(variables)
    assert state.amax_history.shape == (5,) and state.scale_inv.shape == (1,)


def test_declare_state_reads_the_per_device_stand_in_where_the_view_gives_one():
    """Inside the scanned layers under FSDP the packed-scales view adds ``<t>_amax_partials``
    (model/packed_scales.py); the state carries it, and elsewhere its slot is None."""

    class Holder(nn.Module):
        @nn.compact
        def __call__(self):
            return scaling.declare_state(self, "lhs", 5)

    variables = Holder().init(jax.random.PRNGKey(0))
    assert Holder().apply(variables).partials is None
    partials = jnp.zeros((4, 1), jnp.float32)
    view = {"fp8": {**variables["fp8"], "lhs" + scaling.PARTIALS_SUFFIX: partials}}
    assert Holder().apply(view).partials.shape == (4, 1)


def _block_maxima(x: np.ndarray, devices: int) -> np.ndarray:
    """The float64 re-derivation: max|x| over each of ``devices`` blocks of the leading axis."""
    blocks = np.abs(np.asarray(x, np.float64)).reshape(devices, -1)
    return blocks.max(axis=1)[:, None]


def test_amax_partials_are_the_block_maxima_and_their_max_is_the_amax():
    x = jax.random.normal(jax.random.key(0), (8, 3, 5), jnp.bfloat16) * 3
    x = x.at[5, 1, 2].set(-40.0)  # the largest magnitude negative, in block 2 of 4
    partials = scaling.amax_partials(x, 4)
    assert partials.shape == (4, 1) and partials.dtype == jnp.float32
    np.testing.assert_array_equal(partials, _block_maxima(x, 4))
    assert float(partials[2, 0]) == 40.0
    np.testing.assert_array_equal(jnp.max(partials), scaling.amax(x))
    # A leading axis that 4 does not divide: every row the global amax (still correct).
    ragged = scaling.amax_partials(x[:6], 4)
    np.testing.assert_array_equal(ragged, np.full((4, 1), float(scaling.amax(x[:6]))))


def test_measure_conform_and_seen_as_keep_the_form_they_are_asked_for():
    x = jnp.array([[1.0, -6.0], [3.0, 2.0]], jnp.float32)
    like = jnp.zeros((2, 1), jnp.float32)
    assert scaling.measure(x, None).shape == ()
    np.testing.assert_array_equal(scaling.measure(x, like), [[6.0], [3.0]])
    # Scalars broadcast to every device's row; partials reduce to their max.
    np.testing.assert_array_equal(scaling.conform(jnp.float32(5.0), like), [[5.0], [5.0]])
    assert float(scaling.conform(jnp.array([[6.0], [3.0]]), None)) == 6.0
    seen = scaling.seen_as(jnp.array([[6.0], [3.0]]))
    assert seen.scale_inv is None and seen.partials.shape == (2, 1)
    seen = scaling.seen_as(jnp.float32(6.0))
    assert seen.partials is None
    np.testing.assert_array_equal(seen.scale_inv, [6.0])


def test_amax_partials_of_a_batch_split_over_fsdp_need_no_collective():
    """The point of the per-device form: on a batch split over 4 devices each row is computed
    where its block lives, so the compiled program has no all-reduce; scaling.amax has one."""
    from fogjax import sharding

    devices = jax.devices()[:4]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices)
    x = jax.random.normal(jax.random.key(1), (8, 16, 32), jnp.bfloat16)
    with sharding.sharding_context(mesh):
        assert scaling.partial_devices() == 4
        x = jax.device_put(x, sharding.batch_sharding(mesh))
        per_device = jax.jit(lambda x: scaling.amax_partials(x, 4)).lower(x).compile()
        whole = jax.jit(scaling.amax).lower(x).compile()
        partials = per_device(x)
    assert "all-reduce" not in per_device.as_text() and "all-gather" not in per_device.as_text()
    assert "all-reduce" in whole.as_text()
    assert partials.sharding.spec[0] in ("fsdp", ("fsdp",))
    np.testing.assert_array_equal(partials, _block_maxima(x, 4))
    assert scaling.partial_devices() == 1  # outside the mesh
