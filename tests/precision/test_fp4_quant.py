"""FP4 quantisers against independent references: E2M1 rounding against ml_dtypes, NVFP4 / MXFP4
quantise-dequantise against float64 NumPy re-derivations, stochastic rounding's bias and bound, the
2D weight tiles and the Hadamard transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fogjax.precision import fp4_hadamard, fp4_quant
from fogjax.precision.fp4_quant import MXFP4, NVFP4

GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
# Jitted once per (format, rounding) and shape: eager op-by-op dispatch would dominate the runtime.
qdq = jax.jit(fp4_quant.quantize_dequantize, static_argnums=(1, 2))


def ml_dtypes_e2m1(y: np.ndarray) -> np.ndarray:
    """The RNE E2M1 value of y (clipped to +-6 first: SPEC's saturation), via ml_dtypes."""
    return np.clip(y, -6, 6).astype(np.float32).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)


def ours_rtn(y: np.ndarray) -> np.ndarray:
    a = jnp.abs(jnp.asarray(y, jnp.float32))
    return np.sign(y) * np.asarray(jax.jit(fp4_quant.e2m1_round)(a), np.float64)


def test_e2m1_rtn_equals_ml_dtypes_on_grid_midpoints_and_a_dense_sweep():
    mids = (GRID[1:] + GRID[:-1]) / 2  # ties: 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
    sweep = np.linspace(-8, 8, 200_001)
    y = np.concatenate([GRID, -GRID, mids, -mids, sweep])
    np.testing.assert_array_equal(ours_rtn(y), ml_dtypes_e2m1(y))
    # Ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 5 -> 4.
    np.testing.assert_array_equal(ours_rtn(mids), [0, 1, 1, 2, 2, 4, 4])


def np_e2m1_rne(a: np.ndarray) -> np.ndarray:
    """float64 RNE of magnitudes onto the grid, derived from the grid table alone (no steps)."""
    a = np.minimum(a, 6.0)
    dist = np.abs(a[..., None] - GRID)
    best = dist.min(axis=-1, keepdims=True)
    ties = np.isclose(dist, best, rtol=0, atol=0)
    # Among equidistant neighbours take the even code (grid index even = mantissa bit 0).
    even = ties & (np.arange(8) % 2 == 0)
    idx = np.where(even.any(-1), even.argmax(-1), ties.argmax(-1))
    return GRID[idx]


def nvfp4_reference(blocks: np.ndarray) -> np.ndarray:
    """float64 NVFP4 QDQ of ``blocks`` [n_blocks, block] (one tensor), docs/spec.md §6 line by
    line."""
    x = blocks.astype(np.float64)
    amax = np.abs(x).max()
    s_enc = 6 * 448 / amax if amax > 0 else 1.0
    block_amax = np.abs(x).max(axis=1, keepdims=True)
    s_dec = np.clip(block_amax / 6 * s_enc, 0, 448).astype(ml_dtypes.float8_e4m3fn)
    scale = s_dec.astype(np.float64) / s_enc
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.sign(x) * np_e2m1_rne(np.where(scale > 0, np.abs(x) / scale, 0)) * scale
    return np.where(scale > 0, q, 0.0)


def mxfp4_reference(blocks: np.ndarray) -> np.ndarray:
    """float64 MXFP4 QDQ: scale 2**(floor(log2 amax_b) - 2) (E8M0), no tensor scale."""
    x = blocks.astype(np.float64)
    block_amax = np.abs(x).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        exp = np.clip(np.floor(np.log2(block_amax)) - 2, -127, 127)
    scale = np.where(block_amax > 0, 2.0**exp, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.sign(x) * np_e2m1_rne(np.where(scale > 0, np.abs(x) / scale, 0)) * scale
    return np.where(scale > 0, q, 0.0)


def quant_cases(block: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    heavy = rng.standard_t(1.5, (64, block)) * 10.0 ** rng.integers(-3, 3, (64, 1))
    some_zero = rng.normal(size=(64, block))
    some_zero[::3] = 0.0
    return {  # one shape: one compilation per format
        "normal": rng.normal(size=(64, block)),
        "heavy_tailed": heavy,
        "some_zero_blocks": some_zero,
        "all_zero": np.zeros((64, block)),
        "tiny": rng.normal(size=(64, block)) * 1e-30,
    }


@pytest.mark.parametrize("fmt, reference", [(NVFP4, nvfp4_reference), (MXFP4, mxfp4_reference)])
def test_quantize_dequantize_equals_float64_rederivation(fmt, reference):
    for name, blocks in quant_cases(fmt.block_size).items():
        x = blocks.astype(np.float32)
        ref = reference(x)
        ours = np.asarray(qdq(jnp.asarray(x), fmt, "rtn"), np.float64)
        # Only the last float32 rounding of the dequantised product may differ.
        np.testing.assert_allclose(ours, ref, rtol=2**-22, atol=0, err_msg=name)
        assert np.array_equal(ours == 0, ref == 0), name


def test_quantize_pads_a_partial_last_block():
    x = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)  # 40 = 2.5 blocks
    padded = np.concatenate([x, np.zeros((3, 8), np.float32)], axis=1)
    ours = np.asarray(qdq(jnp.asarray(x), NVFP4, "rtn"))
    full = np.asarray(qdq(jnp.asarray(padded), NVFP4, "rtn"))
    np.testing.assert_array_equal(ours, full[:, :40])


def test_quantized_values_are_exact_in_bfloat16():
    x = jnp.asarray(quant_cases(16)["heavy_tailed"], jnp.float32)
    for fmt in (NVFP4, MXFP4):
        values = fp4_quant.quantize(x, fmt).values
        np.testing.assert_array_equal(values.astype(jnp.bfloat16).astype(jnp.float32), values)


def test_stochastic_rounding_is_unbiased_bounded_and_reproducible():
    # Magnitudes across every grid interval, the saturation point and just below it.
    a = jnp.asarray([0.1, 0.3, 0.74, 1.2, 1.9, 2.2, 3.7, 4.5, 5.0, 5.99, 5.9999995, 6.0, 7.5])
    n = 8000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: fp4_quant.e2m1_round(a, "sr", k)))(keys))
    assert draws.max() <= 6.0
    assert set(np.unique(draws)) <= set(GRID)
    # Each draw is one of the two neighbours lo, lo + step: variance <= step^2 / 4, so the mean
    # of n draws has std <= step / (2 sqrt n); allow 5 of those (a false alarm odds ~ 1e-6).
    target = np.minimum(np.asarray(a, np.float64), 6.0)
    step = np.asarray(fp4_quant.e2m1_step(jnp.minimum(a, 6.0)), np.float64)
    bound = 5 * step / (2 * np.sqrt(n))
    assert np.all(np.abs(draws.mean(0) - target) <= bound), (draws.mean(0), target, bound)
    again = jax.jit(lambda k: fp4_quant.e2m1_round(a, "sr", k))(keys[7])
    np.testing.assert_array_equal(np.asarray(again), draws[7])
    assert not np.array_equal(draws[7], draws[8])


@pytest.mark.slow
def test_sr_quantize_dequantize_is_unbiased_on_nvfp4_blocks():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32)), jnp.float32)
    n = 4000
    keys = jax.random.split(jax.random.key(1), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: qdq(x, NVFP4, "sr", k)))(keys))
    q = fp4_quant.quantize(x, NVFP4)
    scale = np.repeat(np.asarray(q.block_scale * q.tensor_scale), 16, axis=-1)
    x = np.asarray(x)
    # The E4M3 block scale may round below amax_b / 6: a block's largest entries then saturate
    # at +-6 scale_b in every draw (NVFP4's clipping, not SR bias).
    saturated = np.abs(x) / scale > 6
    clipped = np.sign(x[saturated]) * 6 * scale[saturated]
    assert saturated.any()  # this data has such blocks
    np.testing.assert_allclose(draws[:, saturated], np.broadcast_to(clipped, (n, clipped.size)))
    # Elsewhere step <= 2 scale_b; the mean of n two-point draws has std <= scale_b / sqrt(n).
    err = np.abs(draws.mean(0) - x)[~saturated]
    assert np.all(err <= 5 * scale[~saturated] / np.sqrt(n))


def test_2d_weight_tiles_are_transpose_invariant_and_match_the_reference():
    w = np.random.default_rng(3).standard_t(3, (48, 40)).astype(np.float32)
    q2d = jax.jit(lambda m: fp4_quant.quantize_2d(m, NVFP4).dequantize())
    q, q_t = np.asarray(q2d(jnp.asarray(w))), np.asarray(q2d(jnp.asarray(w.T)))
    np.testing.assert_array_equal(q, q_t.T)  # forward and data gradient see the same W
    padded = np.zeros((48, 48), np.float32)
    padded[:, :40] = w
    tiles = padded.reshape(3, 16, 3, 16).transpose(0, 2, 1, 3).reshape(9, 256)
    ref = nvfp4_reference(tiles).reshape(3, 3, 16, 16).transpose(0, 2, 1, 3).reshape(48, 48)
    np.testing.assert_allclose(q, ref[:, :40], rtol=2**-22, atol=0)


def test_random_hadamard_is_orthogonal_and_preserves_the_weight_gradient():
    m = np.asarray(fp4_hadamard.random_hadamard(jax.random.key(4)), np.float64)
    np.testing.assert_allclose(m @ m.T, np.eye(16), atol=1e-6)
    rng = np.random.default_rng(5)
    x_t, g_t = rng.normal(size=(8, 64)), rng.normal(size=(6, 64))  # [K, M], [N, M]
    tx = np.asarray(fp4_hadamard.transform_last_axis(jnp.asarray(x_t), jnp.asarray(m)))
    tg = np.asarray(fp4_hadamard.transform_last_axis(jnp.asarray(g_t), jnp.asarray(m)))
    np.testing.assert_allclose(tx @ tg.T, x_t @ g_t.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 16"):
        fp4_hadamard.transform_last_axis(jnp.zeros((2, 40)), jnp.asarray(m))
