"""Low-precision number formats: FP8 E4M3 / E5M2 ("hybrid"), the FP4 E2M1 grid, saturating casts.

E4M3 (``float8_e4m3fn``, largest finite 448, no inf) carries activations and weights in the forward
pass; E5M2 (``float8_e5m2``, largest finite 57344, has inf) carries gradients (docs/spec.md §3).

A plain ``astype`` to either format overflows: E4M3 (no inf) turns anything above 464 into NaN,
E5M2 turns anything from 61440 up into inf (the rounding midpoints past each maximum). One NaN in a
GEMM operand poisons every output that contracts over it, so every cast here clips to +-fp8_max
first ("saturates").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)

E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448.0
E5M2_MAX = float(jnp.finfo(E5M2).max)  # 57344.0

# The non-negative values of FP4 E2M1 (NVFP4's element format), ascending: 0, 0.5, 1, ..., 4, 6.
# Read off ml_dtypes by decoding the eight sign-less bit patterns 0b0000..0b0111.
E2M1_VALUES = tuple(
    float(v) for v in np.arange(8, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
)
E2M1_MAX = float(ml_dtypes.finfo(ml_dtypes.float4_e2m1fn).max)  # 6.0


def fp8_max(dtype: Any) -> float:
    """The largest finite value of an FP8 ``dtype`` (448 for E4M3, 57344 for E5M2)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(E4M3), jnp.dtype(E5M2)):
        raise ValueError(f"{dtype} is not an FP8 format this code uses; use float8_e4m3fn/e5m2.")
    return float(jnp.finfo(dtype).max)


def saturating_cast(x: jax.Array, dtype: Any, clip_in_float32: bool = False) -> jax.Array:
    """``x`` (any float dtype, any shape) clipped to +-fp8_max(dtype), then cast to ``dtype``.

    Finite inputs never become NaN or inf; +-inf become +-fp8_max; NaN stays NaN. Rounding is the
    conversion's round-to-nearest-even. The clip runs in ``x``'s own dtype, or with
    ``clip_in_float32`` (bf16 ``x`` only) in float32: the same values either way (widening is
    exact, and both maxima, 448 = 1.75 * 2**8 and 57344 = 1.75 * 2**15, are exact in bfloat16,
    float16 and float32).

    Why the choice: XLA:GPU widens a bf16 clip to float32 itself, and the widened bf16 bounds
    became two parameterless kernels in every layer of every micro-batch (``convert`` of a
    constant, made after constant folding). The forward casts clip in float32 for that. A cast of
    a GEMM's output keeps the bf16 clip: that is the pattern XLA's GemmRewriter folds into the
    cuBLAS call (FP8 output and its amax in the GEMM's epilogue), and a float32 clip breaks it.
    """
    if clip_in_float32 and x.dtype == jnp.bfloat16:
        # Widened through a reduce_precision to bf16 (exact: bf16 has float32's exponent range):
        # where XLA allows excess precision (XLA:CPU's default) a bare convert would let it fold
        # the widening into x's producer, then clip and cast values x never held (x / scale_inv
        # unrounded). float16 keeps its own clip (reduce_precision would flush its subnormals).
        x = lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=7)
    bound = jnp.asarray(fp8_max(dtype), x.dtype)
    return jnp.clip(x, -bound, bound).astype(dtype)
