"""FP8 formats and saturating casts against ml_dtypes (an independent reference implementation)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fogjax.precision import formats
from fogjax.precision.formats import E4M3, E5M2, saturating_cast

E4M3_TINY = 2.0**-9  # smallest E4M3 subnormal
E5M2_TINY = 2.0**-16  # smallest E5M2 subnormal

# Values around every boundary of both formats: the maxima and the first values past them (464 is
# E4M3's rounding midpoint to the non-existent 480, 61440 E5M2's midpoint to inf), the smallest
# subnormals, half of them (ties to even -> 0), just over half (-> the subnormal), NaN, +-inf, -0.
BOUNDARY = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    447.0,
    448.0,
    449.0,
    463.0,
    464.0,
    465.0,
    480.0,
    500.0,
    1e4,
    57344.0,
    57345.0,
    61439.0,
    61440.0,
    61441.0,
    65536.0,
    1e6,
    3e38,
    E4M3_TINY,
    E4M3_TINY / 2,
    E4M3_TINY * 0.51,
    E4M3_TINY * 1.5,
    E5M2_TINY,
    E5M2_TINY / 2,
    E5M2_TINY * 0.51,
    E5M2_TINY * 1.5,
    1e-30,
    np.inf,
    -np.inf,
    np.nan,
]
BOUNDARY = BOUNDARY + [-v for v in BOUNDARY if v == v and v != 0.0]

REF_DTYPES = {jnp.dtype(E4M3): ml_dtypes.float8_e4m3fn, jnp.dtype(E5M2): ml_dtypes.float8_e5m2}
IN_DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def _reference(x: np.ndarray, dtype) -> np.ndarray:
    """Clip in float32 (exact for every input dtype here), then ml_dtypes' own conversion."""
    bound = float(ml_dtypes.finfo(REF_DTYPES[jnp.dtype(dtype)]).max)
    return np.clip(x.astype(np.float32), -bound, bound).astype(REF_DTYPES[jnp.dtype(dtype)])


def test_constants_match_the_formats():
    assert formats.E4M3_MAX == 448.0
    assert formats.E5M2_MAX == 57344.0
    assert formats.fp8_max(E4M3) == 448.0 and formats.fp8_max(E5M2) == 57344.0
    assert formats.E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert formats.E2M1_MAX == 6.0
    with pytest.raises(ValueError, match="FP8"):
        formats.fp8_max(jnp.bfloat16)


@pytest.mark.parametrize("clip_in_float32", [False, True], ids=["own-dtype-clip", "f32-clip"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=["f32", "bf16", "f16"])
def test_boundary_table_matches_ml_dtypes_bit_for_bit(dtype, in_dtype, clip_in_float32):
    """Either clip (the input's dtype, or float32 for the forward casts) gives ml_dtypes' bits."""
    with np.errstate(over="ignore"):  # 3e38 overflows float16/bfloat16 to inf on purpose
        x = np.array(BOUNDARY, np.float32).astype(in_dtype)
    cast = jax.jit(saturating_cast, static_argnums=(1, 2))
    ours = np.asarray(cast(jnp.asarray(x), dtype, clip_in_float32))
    ref = _reference(x, dtype)
    nan = np.isnan(ref.astype(np.float32))
    assert np.array_equal(np.isnan(ours.astype(np.float32)), nan)
    # Bit patterns (uint8 views) must agree on every non-NaN entry, -0.0 included.
    np.testing.assert_array_equal(ours.view(np.uint8)[~nan], ref.view(np.uint8)[~nan])
    # The table really does probe the edges: +-max and +-0 both occur among the outputs.
    values = ours.astype(np.float32)[~nan]
    assert {formats.fp8_max(dtype), -formats.fp8_max(dtype), 0.0} <= set(values.tolist())


def test_known_values():
    x = jnp.array([464.0, 480.0, 1e9, -np.inf, E4M3_TINY / 2, E4M3_TINY * 0.51], jnp.float32)
    got = saturating_cast(x, E4M3).astype(jnp.float32)
    np.testing.assert_array_equal(got, [448.0, 448.0, 448.0, -448.0, 0.0, E4M3_TINY])
    x = jnp.array([61440.0, 65536.0, np.inf, E5M2_TINY / 2, E5M2_TINY * 0.51], jnp.float32)
    got = saturating_cast(x, E5M2).astype(jnp.float32)
    np.testing.assert_array_equal(got, [57344.0, 57344.0, 57344.0, 0.0, E5M2_TINY])


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("in_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_finite_inputs_never_become_nan_or_inf(dtype, in_dtype):
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-45, 38.5, size=20_000)
    x = (np.where(rng.random(20_000) < 0.5, -1, 1) * magnitudes).astype(np.float32)
    info = np.finfo(np.float32)
    extremes = np.array([info.max, -info.max, info.tiny, -info.tiny, 1e-45, -1e-45], np.float32)
    with np.errstate(over="ignore"):
        x = jnp.asarray(np.concatenate([x, extremes])).astype(in_dtype)
    x = x[jnp.isfinite(x)]  # inputs that overflowed the input dtype itself are not finite inputs
    y = saturating_cast(x, dtype).astype(jnp.float32)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.max(jnp.abs(y))) == formats.fp8_max(dtype)


def test_plain_cast_overflows_which_is_why_we_clip():
    x = jnp.array([480.0, 1e5], jnp.float32)
    assert bool(jnp.all(jnp.isnan(x.astype(E4M3).astype(jnp.float32))))
    assert bool(jnp.all(jnp.isnan(np.asarray(x).astype(ml_dtypes.float8_e4m3fn).astype(float))))
    g = jnp.array([61440.0, 1e6], jnp.float32)
    assert bool(jnp.all(jnp.isinf(g.astype(E5M2).astype(jnp.float32))))
    np.testing.assert_array_equal(saturating_cast(x, E4M3).astype(jnp.float32), [448.0, 448.0])
    np.testing.assert_array_equal(saturating_cast(g, E5M2).astype(jnp.float32), [57344.0] * 2)


def test_nan_stays_nan():
    y = saturating_cast(jnp.array([np.nan, 1.0], jnp.float32), E4M3).astype(jnp.float32)
    assert bool(jnp.isnan(y[0])) and float(y[1]) == 1.0
