"""FP4 block quantisers (docs/spec.md §6): NVFP4 and MXFP4 quantise-dequantise, RtN or stochastic.

Both formats store E2M1 elements (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) in blocks that
share one scale; the blocks run along the last axis of the array handed in here (fp4_dot.py moves
each GEMM operand's contraction axes there first).

NVFP4 (NVIDIA's two-level scheme), per tensor x with amax = max|x|:
    s_enc   = 6 * 448 / amax                       (float32; 1 if amax = 0)
    s_dec_b = E4M3(amax_b / 6 * s_enc)             (one stored E4M3 scale per block of 16)
    q       = sign(x) * R(min(|x| / scale_b, 6)) * scale_b,   scale_b = s_dec_b / s_enc
MXFP4 (OCP Microscaling), per block of 32: scale_b = 2**(floor(log2 amax_b) - 2) (an E8M0 power of
two; 2 = the exponent of E2M1's largest value 6 = 1.5 * 2**2), no tensor scale; block values
above 6 * scale_b saturate, as the OCP spec has it.

R is round-to-nearest-even onto the E2M1 grid or stochastic rounding (floor(y / step + U[0,1)) *
step, step 0.5 below 2, 1 on [2, 4), 2 from 4, saturated at 6). All arithmetic is float32: an SR
offset added in bfloat16 would itself be rounded, which biases the result.

:func:`quantize` returns the dequantised value in two factors, ``values * tensor_scale``, whose
first factor ``sign * R(.) * s_dec_b`` is exact in bfloat16 (2 significant bits times the E4M3
scale's 4, or times a power of two): a GEMM on ``values`` in bfloat16 with float32 accumulation,
times the two tensor scales, is exactly the GEMM a real FP4 tensor core would do.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fogjax.precision.formats import E2M1_MAX, E4M3, E4M3_MAX, saturating_cast

ROUNDINGS = ("rtn", "sr")

# E8M0 represents 2**-127 .. 2**127.
_E8M0_MIN_EXP, _E8M0_MAX_EXP = -127, 127
# floor(log2(6)): the exponent of E2M1's largest value, subtracted from a block's amax exponent.
_E2M1_EMAX = 2


@dataclasses.dataclass(frozen=True)
class Fp4Format:
    """An FP4 block format.

    Attributes:
      name: 'nvfp4' or 'mxfp4'.
      block_size: elements per block along the contraction axis (16 or 32).
      scale_format: 'e4m3' (plus an FP32 per-tensor scale) or 'e8m0' (a power of two, alone).
    """

    name: str
    block_size: int
    scale_format: str


NVFP4 = Fp4Format("nvfp4", 16, "e4m3")
MXFP4 = Fp4Format("mxfp4", 32, "e8m0")
FORMATS = {f.name: f for f in (NVFP4, MXFP4)}


class Quantized(NamedTuple):
    """An FP4-quantised tensor, dequantised as ``values * tensor_scale``.

    values: float32, x's shape; sign * E2M1 value * block scale, exact in bfloat16.
    tensor_scale: float32 scalar; 1 / s_enc (NVFP4) or 1 (MXFP4).
    block_scale: float32 [..., n_blocks] (or [n_row_blocks, n_col_blocks] for 2D), the stored
      block scales s_dec_b (NVFP4) or powers of two (MXFP4), for statistics.
    """

    values: jax.Array
    tensor_scale: jax.Array
    block_scale: jax.Array

    def dequantize(self) -> jax.Array:
        return self.values * self.tensor_scale


def e2m1_step(a: jax.Array) -> jax.Array:
    """The E2M1 grid spacing at magnitude ``a`` >= 0: 0.5 below 2, 1 on [2, 4), 2 from 4."""
    return jnp.where(a < 2, 0.5, jnp.where(a < 4, 1.0, 2.0)).astype(a.dtype)


def e2m1_round(a: jax.Array, rounding: str = "rtn", key: jax.Array | None = None) -> jax.Array:
    """Rounds magnitudes ``a`` >= 0 (float32, any shape) onto the E2M1 grid, saturating at 6.

    'rtn': nearest, ties to even (the grid point whose E2M1 mantissa bit is 0), equal to a cast to
    ``ml_dtypes.float4_e2m1fn``. 'sr': floor(a / step + u) * step with u ~ U[0, 1) from ``key``,
    unbiased on [0, 6] and never above 6.
    """
    a = jnp.minimum(a.astype(jnp.float32), E2M1_MAX)
    step = e2m1_step(a)
    if rounding == "rtn":
        # a / step is exact (step is a power of two); jnp.round rounds half to even, and an even
        # multiple of the step is the grid point with an even mantissa.
        return jnp.round(a / step) * step
    if rounding == "sr":
        if key is None:
            raise ValueError("stochastic rounding needs a PRNG key.")
        u = jax.random.uniform(key, a.shape, jnp.float32)
        # The min: a = 6 with u just below 1 rounds 3 + u up to 4.0 in float32, i.e. to 8.
        return jnp.minimum(jnp.floor(a / step + u) * step, E2M1_MAX)
    raise ValueError(f"Unknown FP4 rounding {rounding!r}; use one of {ROUNDINGS}.")


def _pad_last(x: jax.Array, multiple: int) -> tuple[jax.Array, int]:
    """Zero-pads the last axis to a multiple of ``multiple`` (zeros leave every amax unchanged)."""
    n = x.shape[-1]
    pad = (-n) % multiple
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x, n


def _block_scales(
    block_amax: jax.Array, tensor_amax: jax.Array, fmt: Fp4Format
) -> tuple[jax.Array, jax.Array]:
    """(stored block scale s_dec_b, tensor scale 1 / s_enc) from float32 amaxes."""
    if fmt.scale_format == "e4m3":
        s_enc = jnp.where(tensor_amax > 0, E2M1_MAX * E4M3_MAX / tensor_amax, 1.0)
        s_dec = saturating_cast(block_amax / E2M1_MAX * s_enc, E4M3).astype(jnp.float32)
        return s_dec, 1.0 / s_enc
    if fmt.scale_format == "e8m0":
        # frexp: amax = m * 2**e with m in [0.5, 1), so floor(log2 amax) = e - 1, exactly.
        _, e = jnp.frexp(block_amax)
        exp = jnp.clip(e - 1 - _E2M1_EMAX, _E8M0_MIN_EXP, _E8M0_MAX_EXP)
        scale = jnp.where(block_amax > 0, jnp.ldexp(jnp.float32(1), exp), 0.0)
        return scale.astype(jnp.float32), jnp.float32(1)
    raise ValueError(f"Unknown FP4 scale format {fmt.scale_format!r}; use 'e4m3' or 'e8m0'.")


def _round_blocks(
    blocks: jax.Array, s_dec: jax.Array, tensor_scale: jax.Array, rounding: str, key
) -> jax.Array:
    """sign * R(min(|x| / scale_b, 6)) * s_dec_b for blocks whose scale broadcasts as ``s_dec``."""
    scale = s_dec * tensor_scale  # scale_b = s_dec_b / s_enc
    safe = jnp.where(scale > 0, scale, 1.0)
    grid = e2m1_round(jnp.abs(blocks) / safe, rounding, key)
    return jnp.where(scale > 0, jnp.sign(blocks) * grid * s_dec, 0.0)


def quantize(
    x: jax.Array, fmt: Fp4Format, rounding: str = "rtn", key: jax.Array | None = None
) -> Quantized:
    """FP4-quantises ``x`` (any float dtype, rank >= 1) in blocks along its LAST axis.

    The last axis is zero-padded to a whole number of blocks (the padding is dropped again).
    Returns a :class:`Quantized` of x's shape; all arithmetic is float32.
    """
    x32, n = _pad_last(x.astype(jnp.float32), fmt.block_size)
    blocks = x32.reshape(*x32.shape[:-1], -1, fmt.block_size)
    block_amax = jnp.max(jnp.abs(blocks), axis=-1)
    s_dec, tensor_scale = _block_scales(block_amax, jnp.max(block_amax, initial=0.0), fmt)
    values = _round_blocks(blocks, s_dec[..., None], tensor_scale, rounding, key)
    values = values.reshape(x32.shape)[..., :n]
    return Quantized(values, tensor_scale, s_dec)


def quantize_2d(x: jax.Array, fmt: Fp4Format, rounding: str = "rtn") -> Quantized:
    """FP4-quantises a matrix ``x`` [M, N] in square blocks of block_size x block_size.

    NVIDIA's NVFP4 recipe (arXiv 2509.25149, §4) scales weights this way so that W and W^T
    quantise to the same values: the forward and the data-gradient GEMM see one quantised W.
    Both axes are zero-padded to whole blocks.
    """
    if x.ndim != 2:
        raise ValueError(f"quantize_2d takes a matrix; got shape {x.shape}.")
    b = fmt.block_size
    x32, n = _pad_last(x.astype(jnp.float32), b)
    x32, m = _pad_last(x32.T, b)
    x32 = x32.T  # [M', N'] padded on both axes
    tiles = x32.reshape(x32.shape[0] // b, b, x32.shape[1] // b, b)
    block_amax = jnp.max(jnp.abs(tiles), axis=(1, 3))
    s_dec, tensor_scale = _block_scales(block_amax, jnp.max(block_amax, initial=0.0), fmt)
    values = _round_blocks(tiles, s_dec[:, None, :, None], tensor_scale, rounding, None)
    return Quantized(values.reshape(x32.shape)[:m, :n], tensor_scale, s_dec)


def quantize_dequantize(
    x: jax.Array, fmt: Fp4Format, rounding: str = "rtn", key: jax.Array | None = None
) -> jax.Array:
    """``quantize(x, ...)`` dequantised: float32, x's shape (blocks along the last axis)."""
    return quantize(x, fmt, rounding, key).dequantize()
