"""The FP4 dot_general: each GEMM's rounding modes and block orientation, bounds against the
full-precision products, the QAF backward, the NVIDIA options, statistics and refusals."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fogjax.precision import fp4_hadamard, fp4_quant
from fogjax.precision.fp4_dot import (
    FP4_RNG,
    FP4_STATS_COLLECTION,
    Fp4DotGeneral,
    Fp4GemmConfig,
    fp4_matmul,
)
from fogjax.precision.fp4_quant import NVFP4

M, K, N = 32, 48, 40  # tokens, input features, output features
LINEAR_DIMS = (((1,), (0,)), ((), ()))
KEY = jax.random.key_data(jax.random.key(42))
# Jitted: eager op-by-op dispatch of the quantiser would dominate the test's runtime.
qdq = jax.jit(fp4_quant.quantize_dequantize, static_argnums=(1, 2))


@functools.cache
def operands():
    rng = np.random.default_rng(0)
    x = rng.standard_t(4, (M, K)).astype(np.float32)
    w = (rng.normal(size=(K, N)) * 0.05).astype(np.float32)
    g = rng.standard_t(4, (M, N)).astype(np.float32) * 1e-3
    return x, w, g


def run(cfg: Fp4GemmConfig, key=KEY):
    """(out, dx, dw) of fp4_matmul for the fixed operands, jitted."""
    x, w, g = operands()

    def f(x, w, key):
        out, vjp = jax.vjp(lambda a, b: fp4_matmul(a, b, key, cfg), x, w)
        return (out, *vjp(jnp.asarray(g)))

    return [np.asarray(a, np.float64) for a in jax.jit(f)(x, w, key)]


def q(a, rounding, index=None):
    """float64 QDQ with blocks along a's last axis; SR keys as fp4_dot folds them."""
    key = None
    if rounding == "sr":
        key = jax.random.fold_in(jax.random.wrap_key_data(KEY), index)
    return np.asarray(qdq(jnp.asarray(a), NVFP4, rounding, key), np.float64)


def references(sr_g_dgrad="sr", sr_x="sr", sr_g_wgrad="sr", w_q=None):
    """(forward, dgrad, wgrad) from docs/spec.md §6 with the named rounding of each SR operand."""
    x, w, g = operands()
    w_t = q(w.T, "rtn") if w_q is None else w_q.T  # W^T [N, K], blocks along K
    w_n = q(w, "rtn") if w_q is None else w_q  # W [K, N], blocks along N
    forward = q(x, "rtn") @ w_t.T
    dgrad = q(g, sr_g_dgrad, 0) @ w_n.T
    wgrad = q(x.T, sr_x, 2) @ q(g.T, sr_g_wgrad, 1).T
    return forward, dgrad, wgrad


def close(a, b):
    # Exact FP4 operands; only float32 accumulation differs from the float64 product.
    return np.allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


@pytest.mark.slow
def test_each_gemm_uses_the_stated_rounding_and_orientation():
    out, dx, dw = run(Fp4GemmConfig(NVFP4))
    fwd, dgrad, wgrad = references()
    assert close(out, fwd) and close(dx, dgrad) and close(dw, wgrad)
    # Swapping RtN in for one SR operand changes exactly the GEMM that uses it.
    assert not close(dx, references(sr_g_dgrad="rtn")[1])
    assert close(dw, references(sr_g_dgrad="rtn")[2])
    assert not close(dw, references(sr_x="rtn")[2])
    assert not close(dw, references(sr_g_wgrad="rtn")[2])
    assert close(dx, references(sr_x="rtn", sr_g_wgrad="rtn")[1])
    # The forward is RtN only: another key leaves it bit-identical and moves both gradients.
    out2, dx2, dw2 = run(Fp4GemmConfig(NVFP4), jax.random.key_data(jax.random.key(7)))
    np.testing.assert_array_equal(out, out2)
    assert not np.array_equal(dx, dx2) and not np.array_equal(dw, dw2)


def test_sr_on_gradients_only_rounds_the_activation_to_nearest():
    _, dx, dw = run(Fp4GemmConfig(NVFP4, sr_activations=False))
    _, dgrad, wgrad = references(sr_x="rtn")
    assert close(dx, dgrad) and close(dw, wgrad)


def test_2d_weight_blocks_give_forward_and_data_gradient_one_quantised_weight():
    _, w, _ = operands()
    w_q = jax.jit(lambda m: fp4_quant.quantize_2d(m, NVFP4).dequantize())(jnp.asarray(w))
    w_q = np.asarray(w_q, np.float64)
    out, dx, dw = run(Fp4GemmConfig(NVFP4, weight_2d=True))
    fwd, dgrad, wgrad = references(w_q=w_q)
    assert close(out, fwd) and close(dx, dgrad) and close(dw, wgrad)


def test_hadamard_transforms_both_weight_gradient_inputs_with_one_matrix():
    x, _, g = operands()
    _, dx, dw = run(Fp4GemmConfig(NVFP4, hadamard_wgrad=True))
    m = fp4_hadamard.random_hadamard(jax.random.fold_in(jax.random.wrap_key_data(KEY), 3))
    transform = jax.jit(fp4_hadamard.transform_last_axis)
    x_t, g_t = np.asarray(transform(x.T, m)), np.asarray(transform(g.T, m))
    assert close(dw, q(x_t, "sr", 2) @ q(g_t, "sr", 1).T)
    assert close(dx, references()[1])  # the data gradient is untouched


def error_bound(a: np.ndarray, rounding: str) -> np.ndarray:
    """Elementwise |QDQ(a) - a| bound for NVFP4 blocks along a's last axis.

    |a| / scale_b <= 6 (1 + 2^-4) (E4M3 rounds amax_b / 6 * s_enc by a relative 2^-4 at most, or
    by 2^-10 absolute among its subnormals), so the error is at most half a grid step (<= 1
    scale_b) for RtN and one step (<= 2 scale_b) for SR, clipping included (<= 0.375 scale_b);
    scale_b <= amax_b (1 + 2^-4) / 6 + 2^-10 / s_enc.
    """
    amax = np.abs(a).max()
    s_enc = 6 * 448 / amax
    padded = np.pad(np.abs(a), [(0, 0), (0, -a.shape[-1] % 16)])  # as the quantiser pads
    blocks = padded.reshape(a.shape[0], -1, 16).max(-1)
    scale = np.repeat(blocks * (1 + 2**-4) / 6 + 2**-10 / s_enc, 16, axis=-1)[:, : a.shape[-1]]
    return scale * (1.0 if rounding == "rtn" else 2.0)


def gemm_bound(a, ea, b_t, eb_t):
    """|A^ B^ - A B| <= Ea |B| + |A| Eb + Ea Eb, plus float32 accumulation of the FP4 GEMM."""
    k = a.shape[1]
    quant = ea @ np.abs(b_t).T + np.abs(a) @ eb_t.T + ea @ eb_t.T
    accumulation = 2 * k * 2**-24 * (np.abs(a) + ea) @ (np.abs(b_t) + eb_t).T
    return quant + accumulation


def test_all_three_gemms_stay_within_the_derived_bound_of_the_exact_products():
    x, w, g = (a.astype(np.float64) for a in operands())
    out, dx, dw = run(Fp4GemmConfig(NVFP4))
    cases = [
        (out, x, error_bound(x, "rtn"), w.T, error_bound(w.T, "rtn")),
        (dx, g, error_bound(g, "sr"), w, error_bound(w, "rtn")),
        (dw, x.T, error_bound(x.T, "sr"), g.T, error_bound(g.T, "sr")),
    ]
    for ours, a, ea, b_t, eb_t in cases:
        exact = a @ b_t.T
        bound = gemm_bound(a, ea, b_t, eb_t)
        assert np.all(np.abs(ours - exact) <= bound)
        # And the bound is not vacuous: the FP4 error is a real fraction of it.
        assert np.abs(ours - exact).max() > 0.01 * bound.max()


def test_qaf_backward_is_the_plain_gradient_of_the_fp4_forward():
    x, w, g = (a.astype(np.float64) for a in operands())
    out, dx, dw = run(Fp4GemmConfig(NVFP4, backward="bf16"))
    assert close(out, references()[0])
    np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dw, x.T @ g, rtol=1e-5, atol=1e-7)


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, w):
        return Fp4DotGeneral(name="dot")(x, w, LINEAR_DIMS)


@pytest.mark.slow
def test_module_sows_zero_fraction_and_block_scale_range():
    x, w, _ = operands()
    x = x.copy()
    x[0, :16] = 1e-6  # one block far below the tensor's amax: E4M3 block scale 0, all flushed
    _, variables = _Linear().apply({}, x, w, mutable=[FP4_STATS_COLLECTION])
    stats = variables[FP4_STATS_COLLECTION]["dot"]
    qx = fp4_quant.quantize(jnp.asarray(x), NVFP4)
    values, scales = np.asarray(qx.values), np.asarray(qx.block_scale)
    expected_zero = np.mean((x != 0) & (values == 0))
    assert expected_zero >= 16 / x.size
    np.testing.assert_allclose(stats["lhs"]["zero_fraction"], expected_zero, rtol=1e-6)
    np.testing.assert_allclose(stats["lhs"]["scale_min"], scales[scales > 0].min())
    np.testing.assert_allclose(stats["lhs"]["scale_max"], 448.0)  # the amax block
    assert 0 < float(stats["rhs"]["scale_min"]) <= float(stats["rhs"]["scale_max"]) <= 448


def test_module_draws_keys_from_the_fp4_stream_and_refuses_a_backward_without_it():
    x, w, _ = operands()
    model = _Linear()

    def loss(w, rngs):
        return jnp.sum(model.apply({}, x, w, rngs=rngs) ** 2)

    grad = jax.jit(jax.grad(loss))
    g1 = grad(w, {FP4_RNG: jax.random.key(1)})
    g2 = grad(w, {FP4_RNG: jax.random.key(2)})
    assert not np.array_equal(g1, g2)
    np.testing.assert_array_equal(g1, grad(w, {FP4_RNG: jax.random.key(1)}))
    forward = jax.jit(model.apply)
    np.testing.assert_array_equal(
        forward({}, x, w), forward({}, x, w, rngs={FP4_RNG: jax.random.key(3)})
    )
    with pytest.raises(ValueError, match="'fp4' rng"):
        grad(w, {})


def test_non_linear_dimension_numbers_are_refused():
    with pytest.raises(ValueError, match="block linears only"):
        Fp4DotGeneral().apply(
            {}, jnp.ones((2, 4, 8)), jnp.ones((2, 8, 3)), (((2,), (1,)), ((0,), (0,)))
        )
