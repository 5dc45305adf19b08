"""Current scaling (fp8_current.py): the quantiser and all three GEMMs against an independent
float64 / ml_dtypes re-derivation, edge cases (zeros, an outlier, tiny and non-finite amaxes), the
FP8 GEMMs in the jaxpr, the residuals, and the module's (absent) state and its statistics.

How exact: the quantised operands are compared BIT FOR BIT, except where the float64 scaled value
x * fp8_max / amax lies within 2**-20 (relative) of a rounding midpoint between two FP8 values.
There our float32 arithmetic (x / scale_inv, scale_inv = 1 / (fp8_max / amax) rounded twice) and
the reference's may round to either neighbour, one FP8 step apart; ml_dtypes even rounds a float64
through float32 first (-168.000007 -> -168.0 -> tie -> -160, where -176 is nearer). On random data
such an element turns up about once in 400,000; the GEMM tests assert their data has none.

GEMM tolerance (rtol 1e-5, atol 1e-6 * max|ref|): with the operands equal bit for bit, a product of
two FP8 values is exact in float32 (at most 4 x 4 significant bits), so what remains is float32
accumulation over K <= 32 terms (relative error <= K * 2**-24 of the sum of |terms|, hence the
atol for entries where terms cancel) and the float32 rounding of the scale_inv factors (a few
2**-24), against a float64 GEMM dequantised with float64 scales.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers.steps import fp8_dot_counts

from fogjax.precision import stats
from fogjax.precision.fp8_current import (
    MIN_SCALE_INV,
    Fp8CurrentDotGeneral,
    current_scale_inv,
    fp8_current_dot_general,
    quantize_current,
)
from fogjax.precision.recipe import FP8_COLLECTION, FP8_STATS_COLLECTION

LINEAR_DIMS = (((2,), (0,)), ((), ()))  # x [B, T, D] . w [D, F] -> [B, T, F]
QK_DIMS = (((2,), (2,)), ((0,), (0,)))  # q [B, T, d] . k [B, S, d] -> [B, T, S]
E4, E5 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
FORMATS = {E4: jnp.float8_e4m3fn, E5: jnp.float8_e5m2}


def ref_quantize(x, fmt, margin=0.0):
    """Float64 re-derivation: (q as float64, scale_inv, scaled value before the cast)."""
    x = np.asarray(x, np.float64)
    fp8_max = float(ml_dtypes.finfo(fmt).max)
    amax = np.max(np.abs(x))
    scale = fp8_max / amax / 2.0**margin if amax > 0 and np.isfinite(amax) else 1.0
    scaled = x * scale
    q = np.clip(scaled, -fp8_max, fp8_max).astype(fmt).astype(np.float64)
    return q, 1.0 / scale, scaled


def near_midpoint(scaled, fmt):
    """True where ``scaled`` lies within 2**-20 (relative) of a midpoint between FP8 values."""
    grid = np.arange(256, dtype=np.uint8).view(fmt).astype(np.float64)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = (grid[1:] + grid[:-1]) / 2
    flat = np.ravel(scaled)
    right = np.clip(np.searchsorted(mids, flat), 1, len(mids) - 1)
    gap = np.minimum(np.abs(flat - mids[right - 1]), np.abs(flat - mids[right]))
    return np.reshape(gap <= 2.0**-20 * np.abs(flat), np.shape(scaled))


def assert_quantised_like_reference(q, want, scaled, fmt):
    got = np.asarray(q).astype(np.float64)
    differ = got != want
    if differ.any():  # Only one FP8 step apart, and only next to a rounding midpoint.
        assert np.all(near_midpoint(scaled[differ], fmt)), (got[differ], want[differ])
        step = np.abs(got[differ] - want[differ])
        assert np.all(step <= np.abs(want[differ]) * 2.0**-1), (got[differ], want[differ])
    return int(differ.sum())


@pytest.mark.parametrize("fmt", [E4, E5], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("margin", [0, 1])
def test_quantiser_matches_float64_rederivation(fmt, margin):
    flips, total = 0, 0
    for seed, magnitude in enumerate((1e-3, 1.0, 40.0, 3e4)):
        x = jax.random.normal(jax.random.PRNGKey(seed), (64, 48)) * magnitude
        q, scale_inv = jax.jit(quantize_current, static_argnums=(1, 2))(x, FORMATS[fmt], margin)
        want, want_scale_inv, scaled = ref_quantize(x, fmt, margin)
        assert q.dtype == FORMATS[fmt] and scale_inv.shape == (1,)
        assert float(scale_inv[0]) == pytest.approx(want_scale_inv, rel=2**-22)
        flips += assert_quantised_like_reference(q, want, scaled, fmt)
        total += x.size
        # The largest magnitude lands on fp8_max / 2**margin: the scale follows the tensor.
        fp8_max = float(ml_dtypes.finfo(fmt).max)
        assert np.max(np.abs(np.asarray(q, np.float64))) == fp8_max / 2**margin
    assert flips <= total * 1e-3


def test_bf16_operands_land_within_one_step_and_keep_the_amax_on_fp8_max():
    """In bf16 (training) quantize divides in bf16, as delayed scaling does: the scaled value is
    rounded to bf16 before the FP8 cast, so elements next to an FP8 midpoint may land one FP8
    step from the float64 answer (double rounding); the amax still maps onto 448 exactly."""
    for seed, magnitude in enumerate((1e-2, 1.0, 300.0)):
        x = (jax.random.normal(jax.random.PRNGKey(30 + seed), (64, 48)) * magnitude).astype(
            jnp.bfloat16
        )
        q, _ = quantize_current(x, jnp.float8_e4m3fn)
        got = np.asarray(q).astype(np.float64)
        want, _, _ = ref_quantize(np.asarray(x, np.float32), E4)
        assert np.max(np.abs(got)) == 448.0
        differ = got != want
        # One E4M3 step: 2**-3 of the binade's bottom, or 2**-9 among the subnormals.
        step = np.maximum(np.maximum(np.abs(got), np.abs(want)) * 2.0**-3, 2.0**-9)
        assert np.all(np.abs(got - want) <= step)
        assert differ.mean() < 0.05, differ.mean()


def _inputs(key, shapes, scales, dtype=jnp.float32):
    keys = jax.random.split(key, 3)
    return tuple(
        (jax.random.normal(k, s) * m).astype(dtype)
        for k, s, m in zip(keys, shapes, scales, strict=True)
    )


def _value_and_grads(dims, margin=0, out_dtype=None):
    @jax.jit
    def run(lhs, rhs, ct):
        def loss(lhs, rhs):
            out = fp8_current_dot_general(lhs, rhs, dims, out_dtype, margin)
            return jnp.sum(out.astype(jnp.float32) * ct), out

        (_, out), (dl, dr) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
        return out, dl, dr

    return run


def _reference_gemms(lhs, rhs, ct, dims, margin):
    (ql, sl, a), (qr, sr, b), (qg, sg, c) = (
        ref_quantize(lhs, E4, margin),
        ref_quantize(rhs, E4, margin),
        ref_quantize(ct, E5, margin),
    )
    for scaled, fmt in ((a, E4), (b, E4), (c, E5)):
        assert not near_midpoint(scaled, fmt).any(), "pick other data: a rounding tie"
    if dims == LINEAR_DIMS:
        out = np.einsum("btd,df->btf", ql, qr)
        dl = np.einsum("btf,df->btd", qg, qr)
        dr = np.einsum("btd,btf->df", ql, qg)
    else:
        out = np.einsum("btd,bsd->bts", ql, qr)
        dl = np.einsum("bts,bsd->btd", qg, qr)
        dr = np.einsum("btd,bts->bsd", ql, qg)
    return out * sl * sr, dl * sr * sg, dr * sl * sg


@pytest.mark.parametrize("dims", [LINEAR_DIMS, QK_DIMS], ids=["linear", "qk"])
@pytest.mark.parametrize("margin", [0, 1])
def test_gemms_match_float64_rederivation(dims, margin):
    if dims == LINEAR_DIMS:
        shapes = ((2, 8, 32), (32, 16), (2, 8, 16))
    else:
        shapes = ((2, 8, 32), (2, 6, 32), (2, 8, 6))
    run = _value_and_grads(dims, margin)
    # Magnitudes far apart, as delayed scaling would see them across steps; none saturates here.
    for seed, scales in enumerate([(1.0, 0.05, 1e-3), (40.0, 0.02, 10.0), (0.5, 0.5, 1e4)]):
        lhs, rhs, ct = _inputs(jax.random.PRNGKey(10 + seed), shapes, scales)
        got = run(lhs, rhs, ct)
        want = _reference_gemms(lhs, rhs, ct, dims, margin)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == jnp.float32 and g.shape == w.shape and np.abs(w).max() > 0
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())


def test_all_zero_tensors_get_scale_one_and_no_nan():
    for fmt in (jnp.float8_e4m3fn, jnp.float8_e5m2):
        np.testing.assert_array_equal(current_scale_inv(jnp.zeros((4, 4)), fmt), [1.0])
    run = _value_and_grads(LINEAR_DIMS)
    _, rhs, ct = _inputs(jax.random.PRNGKey(20), ((2, 8, 32), (32, 16), (2, 8, 16)), (1, 1, 1))
    out, dl, dr = run(jnp.zeros((2, 8, 32)), rhs, ct)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(dr, 0.0)  # q4(0)^T . g
    assert np.all(np.isfinite(dl)) and np.abs(dl).max() > 0
    out, dl, dr = run(jnp.ones((2, 8, 32)), rhs, jnp.zeros((2, 8, 16)))  # a zero cotangent
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(dl, 0.0)
    np.testing.assert_array_equal(dr, 0.0)


def test_non_finite_amax_gives_scale_one():
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        x = jnp.array([1.0, bad, 1e4])
        np.testing.assert_array_equal(current_scale_inv(x, jnp.float8_e4m3fn), [1.0])
        q, _ = quantize_current(x, jnp.float8_e4m3fn)
        assert float(q[0].astype(jnp.float32)) == 1.0 and float(q[2].astype(jnp.float32)) == 448


def test_tiny_amax_caps_the_scale_instead_of_overflowing():
    # fp8_max / 1e-37 overflows float32: an uncapped scale_inv would be 0 and the cast NaN.
    x = jnp.array([1e-37, -5e-38, 0.0], jnp.float32)
    q, scale_inv = quantize_current(x, jnp.float8_e4m3fn)
    assert float(scale_inv[0]) == MIN_SCALE_INV
    got = np.asarray(q.astype(jnp.float32))
    np.testing.assert_allclose(got, np.asarray(x) / MIN_SCALE_INV, rtol=2**-3)
    assert np.all(np.isfinite(got))


def test_an_outlier_is_not_saturated_it_sets_the_scale():
    lhs, rhs, ct = _inputs(jax.random.PRNGKey(21), ((2, 8, 32), (32, 16), (2, 8, 16)), (1, 1, 1))
    lhs = lhs.at[0, 3, 5].set(1e6)  # 6 orders above the rest; E4M3's max is 448
    q, scale_inv = quantize_current(lhs, jnp.float8_e4m3fn)
    assert float(q[0, 3, 5].astype(jnp.float32)) == 448.0
    assert float(scale_inv[0]) == pytest.approx(1e6 / 448, rel=2**-22)
    x_stats = jax.tree.map(float, _sown(lhs, rhs)["lhs"])
    assert x_stats["saturation"] == 0.0 and x_stats["amax"] == 1e6
    # The price: the rest of the tensor sits below E4M3's smallest subnormal and flushes to zero.
    assert x_stats["underflow"] > 0.9
    out, _, _ = _value_and_grads(LINEAR_DIMS)(lhs, rhs, ct)
    exact = np.einsum("btd,df->btf", np.asarray(lhs, np.float64), np.asarray(rhs, np.float64))
    assert np.all(np.isfinite(out))
    # The outlier's row is its term, to E4M3's rounding of rhs (relative 2**-4).
    np.testing.assert_allclose(out[0, 3], exact[0, 3], rtol=0.07, atol=0.07 * np.abs(exact).max())


def _sown(lhs, rhs, dims=LINEAR_DIMS):
    _, sown = Fp8CurrentDotGeneral().apply({}, lhs, rhs, dims, mutable=[FP8_STATS_COLLECTION])
    return sown[FP8_STATS_COLLECTION]


def test_jaxpr_has_three_fp8_gemms_and_saves_only_fp8_residuals():
    lhs, rhs, ct = _inputs(
        jax.random.PRNGKey(22), ((2, 8, 32), (32, 16), (2, 8, 16)), (1, 1, 1), jnp.bfloat16
    )

    def loss(lhs, rhs):
        out = fp8_current_dot_general(lhs, rhs, LINEAR_DIMS)
        return jnp.sum(out.astype(jnp.float32) * ct)

    counts = fp8_dot_counts(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(lhs, rhs))
    assert counts == {
        ("float8_e4m3fn", "float8_e4m3fn"): 1,  # forward
        ("float8_e5m2", "float8_e4m3fn"): 2,  # data and weight gradient: q5(g) x q4(operand)
    }, counts
    _, vjp = jax.vjp(lambda a, b: fp8_current_dot_general(a, b, LINEAR_DIMS), lhs, rhs)
    residuals = sorted((str(r.dtype), r.shape) for r in jax.tree.leaves(vjp))
    assert residuals == sorted(
        [("float8_e4m3fn", lhs.shape), ("float8_e4m3fn", rhs.shape)] + [("float32", (1,))] * 2
    )


def test_module_has_no_state_and_sows_operand_statistics():
    module = Fp8CurrentDotGeneral()
    q, k, _ = _inputs(
        jax.random.PRNGKey(23), ((2, 8, 32), (2, 6, 32), (2, 8, 6)), (1, 1, 1), jnp.bfloat16
    )
    # init makes every collection mutable, so the statistics are sown; nothing else exists.
    assert set(module.init(jax.random.PRNGKey(0), q, k, QK_DIMS)) == {FP8_STATS_COLLECTION}
    out = module.apply({}, q, k, QK_DIMS, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (2, 8, 6)
    np.testing.assert_array_equal(out, fp8_current_dot_general(q, k, QK_DIMS, jnp.float32))
    sown = _sown(q, k, QK_DIMS)
    assert set(sown) == {"lhs", "rhs"}
    assert set(sown["lhs"]) == {"saturation", "underflow", "amax"}
    assert float(sown["lhs"]["saturation"]) == 0.0
    assert float(sown["rhs"]["amax"]) == float(jnp.max(jnp.abs(k)))
    metrics = stats.fp8_metrics({}, sown)
    assert set(metrics) == {
        f"fp8/{op}_{m}" for op in ("lhs", "rhs") for m in ("saturation", "underflow", "amax")
    }


class _Body(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        w = self.param("kernel", nn.initializers.normal(0.2), (x.shape[-1], x.shape[-1]))
        return jnp.tanh(Fp8CurrentDotGeneral(name="dot")(x, w.astype(x.dtype), LINEAR_DIMS)), None


def test_under_nn_scan_no_fp8_collection_and_per_layer_statistics():
    scan = nn.scan(
        _Body,
        variable_axes={"params": 0, FP8_COLLECTION: 0, FP8_STATS_COLLECTION: 0},
        split_rngs={"params": True},
        length=3,
    )

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            return scan(name="layers")(x, None)[0]

    x = jax.random.normal(jax.random.PRNGKey(24), (2, 8, 16)).astype(jnp.bfloat16)
    variables = Scanned().init(jax.random.PRNGKey(25), x)
    assert set(variables) == {"params", FP8_STATS_COLLECTION}
    variables = {"params": variables["params"]}
    _, sown = Scanned().apply(variables, x, mutable=[FP8_STATS_COLLECTION])
    assert sown[FP8_STATS_COLLECTION]["layers"]["dot"]["lhs"]["amax"].shape == (3,)
    metrics = stats.fp8_metrics({}, sown[FP8_STATS_COLLECTION])
    assert "fp8/layers_2/dot/rhs_underflow" in metrics


@pytest.mark.gpu
def test_gpu_lowers_all_three_gemms_to_cublaslt_fp8():
    """On an NVIDIA GPU, XLA turns the forward and both backward GEMMs into cuBLASLt FP8 calls."""
    lhs, rhs, ct = _inputs(
        jax.random.PRNGKey(26), ((2, 64, 128), (128, 256), (2, 64, 256)), (1, 1, 1), jnp.bfloat16
    )

    def loss(lhs, rhs):
        out = fp8_current_dot_general(lhs, rhs, LINEAR_DIMS)
        return jnp.sum(out.astype(jnp.float32) * ct)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(lhs, rhs).compile()
    assert compiled.as_text().count("__cublas$lt$matmul$f8") == 3
