"""Moment storage formats against NumPy + ml_dtypes re-derivations: scales, rounding, zero guard."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fogjax.optim import moment_formats as fmts

RNG = np.random.default_rng(0)
# Heavy-tailed rows of 256 with a few tiny coordinates, as moments are.
X = (RNG.standard_t(2, (3, 256)) * 10.0 ** RNG.uniform(-4, 0, (3, 256))).astype(np.float32)
X[:, :4] = 1e-9


def _reference(x: np.ndarray, name: str, block: int, second: bool) -> np.ndarray:
    """float64 re-derivation of encode + decode: per block, a power-of-two scale putting the
    amax in (max/2, max], one ml_dtypes cast (int8: scale 127/amax, rounding to integers)."""
    fmt = fmts.MOMENT_FORMATS[name]
    x = np.sqrt(x.astype(np.float64)) if second else x.astype(np.float64)
    rows = x.reshape(-1, block) if block else x.reshape(1, -1)
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        amax = np.abs(r).max()
        if fmt.integer:
            top = 255.0 if second else 127.0
            s = np.float32(top / amax)
            y = np.round(np.clip(r.astype(np.float32) * s, -top, top))
            if second:
                y = np.where((r > 0) & (y == 0), 1.0, y)
            out[i] = y.astype(np.float64) / s
        else:
            s = 2.0 ** np.floor(np.log2(fmt.max_value / amax))
            y = (r * s).astype(np.float32).astype(fmt.storage).astype(np.float64)
            if second:
                y = np.where((r > 0) & (y == 0), fmt.min_positive, y)
            out[i] = y / s
    out = out.reshape(x.shape)
    return out**2 if second else out


# int8 is blockwise only (per tensor is refused: test_int8_needs_blocks).
@pytest.mark.parametrize(
    "name, block",
    [("float16", 0), ("float16", 128), ("float8_e4m3fn", 0), ("float8_e4m3fn", 128), ("int8", 128)],
)
@pytest.mark.parametrize("second", [False, True])
def test_encode_decode_matches_reference(name, block, second):
    x = np.abs(X) if second else X
    fmt = fmts.MOMENT_FORMATS[name]
    stored = fmts.encode(jnp.asarray(x), fmt, block, second)
    got = np.asarray(fmts.decode(stored, block, second), np.float64)
    np.testing.assert_allclose(got, _reference(x, name, block, second), rtol=2e-6, atol=0)
    assert stored.scale.shape == fmts.scale_shape(x.shape, block)
    if not fmt.integer:  # Power-of-two scales: each block amax in (max/2, max], then rounded.
        values = np.abs(np.asarray(stored.values.astype(jnp.float32)))
        top = values.reshape(-1, block).max(-1) if block else values.max()
        assert np.all(top <= fmt.max_value) and np.all(top >= fmt.max_value / 2)


def test_bfloat16_is_one_round_to_nearest_cast():
    stored = fmts.encode(jnp.asarray(X), fmts.MOMENT_FORMATS["bfloat16"], 128, False)
    np.testing.assert_array_equal(np.asarray(stored), X.astype(ml_dtypes.bfloat16))
    assert fmts.decode(stored, 128, False).dtype == jnp.float32


def test_float32_stores_the_array_itself():
    stored = fmts.encode(jnp.asarray(X), fmts.MOMENT_FORMATS["float32"], 128, True)
    np.testing.assert_array_equal(np.asarray(stored), X)


@pytest.mark.parametrize("name", ["float16", "float8_e4m3fn", "int8"])
def test_second_moment_never_flushes_to_zero(name):
    # A block whose amax is 1e12 times its smallest entry: nu of the tiny entries underflows any
    # 8- or 16-bit format at that scale, and must be stored as the smallest positive code.
    nu = np.full((1, 128), 1e-20, np.float32)
    nu[0, 0] = 1e4
    stored = fmts.encode(jnp.asarray(nu), fmts.MOMENT_FORMATS[name], 128, True)
    back = np.asarray(fmts.decode(stored, 128, True))
    assert np.all(back > 0)
    assert np.all(back[0, 1:] >= nu[0, 1:])  # Rounded up: a shorter step, never mu / eps.


def test_blocks_follow_the_last_axis():
    assert fmts.scale_shape((4, 256), 128) == (4, 2)
    assert fmts.scale_shape((2, 1, 2, 32, 64), 128) == (2, 1, 2, 32, 1)  # 64: one block
    assert fmts.scale_shape((7,), 0) == ()
    assert fmts.scale_shape((), 128) == ()


def test_int8_needs_blocks():
    with pytest.raises(ValueError, match="state_block_size > 0"):
        fmts.encode(jnp.ones((4,)), fmts.MOMENT_FORMATS["int8"], 0, False)


def test_unknown_format_names_the_field():
    with pytest.raises(ValueError, match=r"optim\.mu_dtype='fp8'.*float8_e4m3fn"):
        fmts.moment_format("fp8", "optim.mu_dtype")


# --- decay under round to nearest vs stochastic rounding ----------------------------------------


def _normal_grid(dtype) -> np.ndarray:
    """Every positive normal value of ``dtype`` above its smallest normal, as float64."""
    info = ml_dtypes.finfo(dtype)
    k = np.arange(2**info.nmant)
    e = np.arange(info.minexp, info.maxexp)
    x = np.ldexp(1.0 + k[None, :] / 2**info.nmant, e[:, None]).reshape(-1)
    return x[(x > float(info.smallest_normal)) & (x <= float(info.max))]


@pytest.mark.parametrize("name", ["float8_e4m3fn", "bfloat16", "float16"])
def test_nearest_min_shrink_is_the_exact_stall_threshold(name):
    """Over every normal grid point (ml_dtypes' round to nearest even): a relative shrink just
    under nearest_min_shrink leaves some grid points fixed, just over it moves every one; at
    2^-(p+2) every one is fixed."""
    fmt = fmts.MOMENT_FORMATS[name]
    x = _normal_grid(fmt.storage)
    d = fmts.nearest_min_shrink(fmt)
    back = lambda shrink: (x * (1 - shrink)).astype(fmt.storage).astype(np.float64)  # noqa: E731
    assert np.any(back(d * (1 - 1e-3)) == x)
    assert not np.any(back(d * (1 + 1e-3)) == x)
    nmant = ml_dtypes.finfo(fmt.storage).nmant
    assert np.all(back(2.0 ** -(nmant + 2)) == x)
    assert fmts.nearest_min_shrink(fmts.MOMENT_FORMATS["float32"]) == 0.0
    assert fmts.nearest_min_shrink(fmts.MOMENT_FORMATS["int8"]) == 0.0


def _decay(nu0: np.ndarray, steps: int, key) -> tuple[np.ndarray, np.ndarray]:
    """(nu after the first requantisation, nu after ``steps`` more zero-gradient steps of
    b2 = 0.95), each step nu <- decode(encode(0.95 nu)) in E4M3 blocks of 128; ``key`` None =
    round to nearest, else stochastic with bits folded from the step."""
    fmt = fmts.MOMENT_FORMATS["float8_e4m3fn"]

    @jax.jit
    def go(nu):
        def body(nu, t):
            k = None if key is None else jax.random.fold_in(key, t)
            return fmts.decode(fmts.encode(0.95 * nu, fmt, 128, True, k), 128, True), None

        return jax.lax.scan(body, nu, jnp.arange(steps))[0]

    first = fmts.decode(fmts.encode(jnp.asarray(nu0), fmt, 128, True), 128, True)
    return np.asarray(first, np.float64), np.asarray(go(first), np.float64)


# nu over two decades of RMS gradient, so every sqrt(nu) is a normal E4M3 value of its block.
NU0 = (10.0 ** RNG.uniform(-4, 0, (16, 256))).astype(np.float32)


def test_nearest_rounding_never_decays_an_fp8_nu():
    """Why optim.moment_rounding=nearest is refused for an FP8 nu: b2 = 0.95 shrinks the stored
    sqrt(nu) by 2.53% a step, less than half of any E4M3 step below it (3.1% to 5.6%), so 100
    zero-gradient steps leave every coordinate where it was, where float32's has shrunk by
    0.95^100 = 0.006."""
    start, end = _decay(NU0, 100, None)
    assert 1 - math.sqrt(0.95) < 2.0**-5  # Under half the smallest relative E4M3 step.
    np.testing.assert_array_equal(end, start)


def test_stochastic_rounding_decays_an_fp8_nu_without_bias():
    """The same 100 steps rounded stochastically (bits from the step): every coordinate moved
    down; nu / (0.95^100 nu_0) has mean 1 and is roughly log-normal (100 random roundings, each
    unbiased for nu), median ~0.7. Bounds: the median in [0.5, 2]; the mean of 4096 ratios (sd
    ~1, standard error ~0.016) within 8%."""
    start, end = _decay(NU0, 100, jax.random.key(0))
    ratio = end / (0.95**100 * start)
    assert np.all(end < start)
    assert 0.5 < np.median(ratio) < 2.0
    assert abs(ratio.mean() - 1) < 0.08, ratio.mean()


@pytest.mark.parametrize("name", ["float8_e4m3fn", "int8"])
def test_stochastic_rounding_of_sqrt_nu_is_unbiased_for_nu(name):
    """N = 2^14 stochastic encodings of one block of nu (sqrt(nu) from 1/4 to 1/32 of the amax):
    per coordinate the mean decoded nu is nu within 6 standard errors (and on average within
    0.5: 127 z-scores), while the mean decoded sqrt(nu) sits below sqrt(nu) (Jensen): it is nu,
    not sqrt(nu), that the rounding keeps unbiased (else nu's EMA would inflate)."""
    fmt = fmts.MOMENT_FORMATS[name]
    nu = np.geomspace(0.06, 0.001, 128).astype(np.float32)[None, :]
    nu[0, 0] = 1.0  # The amax.
    n = 2**14

    def one(key):
        return fmts.decode(fmts.encode(jnp.asarray(nu), fmt, 128, True, key), 128, True)

    draws = jax.jit(jax.vmap(one))

    got = np.asarray(draws(jax.random.split(jax.random.key(2), n)), np.float64)[:, 0, 1:]
    exact = nu[0, 1:].astype(np.float64)

    def z(samples, target):
        return (samples.mean(0) - target) / (samples.std(0) / math.sqrt(n))

    z_nu, z_sqrt = z(got, exact), z(np.sqrt(got), np.sqrt(exact))
    assert np.all(np.abs(z_nu) < 6) and abs(z_nu.mean()) < 0.5, (z_nu.max(), z_nu.mean())
    assert z_sqrt.mean() < -1.0, z_sqrt.mean()
