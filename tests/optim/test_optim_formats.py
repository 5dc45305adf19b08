"""Moment storage formats against NumPy + ml_dtypes re-derivations: scales, rounding, zero guard."""

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
