"""FP8 cast, transposed FP8 copy and amax of a matrix in one pass: a Pallas (Triton) kernel.

The weight gradient of an FP8 Linear, ``dW = x^T . g``, contracts over tokens, and cuBLAS's FP8
GEMMs read both operands with the contracted axis contiguous: the E5M2 output gradient is needed
twice, ``q(g)`` [tokens, out] for the data gradient and ``q(g)^T`` [out, tokens] for the weight
gradient. XLA fuses the cast with the amax reduction (a reduction kernel) but cannot put a
transpose in the same fusion, so it wrote ``q(g)``, then read it back for a transpose kernel: two
kernels and an extra read and write of the FP8 copy per Linear, layer and micro-batch. Transformer
Engine's cast-transpose reads ``g`` once; :func:`cast_transpose` does the same as one Pallas
kernel (Triton on GPU): each [64, 64] tile is scaled, clipped and cast, written both ways, and its
max|g| written to a per-tile partial that XLA reduces (a few KB).

The numbers are those of ``scaling.quantize`` and ``scaling.amax`` (the division in bf16 as XLA
computes it: in float32, then rounded; the clip in the input's dtype; round-to-nearest-even
conversion): tests/precision/test_cast_transpose.py runs the kernel in Pallas's interpret mode on
CPU against the XLA path, bit for bit. :func:`cast_transpose_or_xla` picks the kernel only where
the program is lowered for CUDA (``lax.platform_dependent``) and :func:`applies`: the tensor is
whole on the device (no mesh axis splits the computation; under FSDP or tensor parallelism the
caller keeps XLA's path, which the partitioner can split: a ``shard_map`` around the kernel is
future work) and tiles; everywhere else it is XLA's path with the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from fogjax.precision import scaling
from fogjax.precision.formats import fp8_max

# The tile: a power of two (Triton), 64 x 64 bf16 = 8 KB; the per-tile partials of a [16384, 2048]
# gradient are 8192 floats.
TILE = 64


def xla_cast_transpose(
    x: jax.Array, scale_inv: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """XLA's path: ``(quantize(x) [M, K], its transpose [K, M], amax(x) float32 [1])``."""
    q = scaling.quantize(x, scale_inv, dtype)
    return q, q.T, jnp.reshape(scaling.amax(x), (1,))


def _ieee_divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 ``a / b`` correctly rounded (PTX ``div.rn.f32``): Triton's own float32 division
    may be the approximate ``div.full.f32``, and XLA divides with IEEE rounding."""
    (out,) = pallas_triton.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return out


def _kernel(x_ref, scale_inv_ref, q_ref, q_t_ref, amax_ref, *, dtype: Any, interpret: bool):
    x = x_ref[...]
    # scaling.quantize: x / scale_inv in x's dtype, which XLA computes as an IEEE float32
    # division rounded to x's dtype.
    s = jnp.broadcast_to(scale_inv_ref[...].astype(x.dtype).astype(jnp.float32), x.shape)
    divide = jnp.divide if interpret else _ieee_divide
    scaled = divide(x.astype(jnp.float32), s).astype(x.dtype)
    # Both bounds as constants (Triton's lowering cannot negate a constant).
    low, high = (jnp.asarray(b * fp8_max(dtype), x.dtype) for b in (-1, 1))
    q = jnp.minimum(jnp.maximum(scaled, low), high).astype(dtype)
    q_ref[...] = q
    q_t_ref[...] = q.T
    amax_ref[...] = jnp.full((1, 1), jnp.max(jnp.abs(x)).astype(jnp.float32), jnp.float32)


def tiles(shape: tuple[int, ...]) -> bool:
    """Whether a matrix of ``shape`` splits into whole [TILE, TILE] tiles."""
    return len(shape) == 2 and all(n % TILE == 0 and n > 0 for n in shape)


def pallas_cast_transpose(
    x: jax.Array, scale_inv: jax.Array, dtype: Any, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`xla_cast_transpose` as one Pallas kernel.

    Args:
      x: [M, K] (bf16 in training), M and K multiples of :data:`TILE`.
      scale_inv: float32 [1], the tensor's delayed ``scale_inv``.
      dtype: ``float8_e4m3fn`` or ``float8_e5m2``.
      interpret: run Pallas's interpreter (CPU tests) instead of compiling with Triton.
    Returns:
      ``(q [M, K], q^T [K, M], amax float32 [1])``.
    """
    if not tiles(x.shape):
        raise ValueError(f"pallas_cast_transpose needs [M, K] multiples of {TILE}, got {x.shape}")
    m, k = x.shape
    grid = (m // TILE, k // TILE)
    q, q_t, partial = pl.pallas_call(
        lambda *refs: _kernel(*refs, dtype=dtype, interpret=interpret),
        out_shape=(
            jax.ShapeDtypeStruct((m, k), dtype),
            jax.ShapeDtypeStruct((k, m), dtype),
            jax.ShapeDtypeStruct(grid, jnp.float32),
        ),
        grid=grid,
        in_specs=[
            pl.BlockSpec((TILE, TILE), lambda i, j: (i, j)),
            pl.BlockSpec((1,), lambda i, j: (0,)),
        ],
        out_specs=(
            pl.BlockSpec((TILE, TILE), lambda i, j: (i, j)),
            pl.BlockSpec((TILE, TILE), lambda i, j: (j, i)),
            pl.BlockSpec((1, 1), lambda i, j: (i, j)),
        ),
        interpret=interpret,
        # Triton, not Mosaic GPU (Pallas's other GPU backend, which wants warpgroup-sized copies
        # and would refuse the 4-byte partial).
        compiler_params=None if interpret else pallas_triton.CompilerParams(num_warps=4),
        name="fp8_cast_transpose",
    )(x, jnp.reshape(scale_inv, (1,)).astype(jnp.float32))
    return q, q_t, jnp.reshape(jnp.max(partial), (1,))


def _whole_on_device() -> bool:
    """No mesh axis of the tracing context splits the computation (Manual axes, e.g. 'data'
    inside the per-replica accumulation, already have: each device holds its own rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return math.prod(n for a, n in sizes.items() if a not in mesh.manual_axes) == 1


def applies(shape: tuple[int, ...]) -> bool:
    """Whether :func:`cast_transpose_or_xla` may run the kernel on a matrix of ``shape`` in the
    current tracing context (it tiles, and the tensor is whole on the device). Where not, callers
    keep their own XLA path: there XLA's partitioner splits the cast and the transpose, and the
    kernel's explicit transpose would only cost."""
    return tiles(shape) and _whole_on_device()


def cast_transpose_or_xla(
    x: jax.Array, scale_inv: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`pallas_cast_transpose` where the program is lowered for CUDA and :func:`applies`;
    :func:`xla_cast_transpose` otherwise (the same values)."""
    if not applies(x.shape):
        return xla_cast_transpose(x, scale_inv, dtype)
    return lax.platform_dependent(
        x,
        scale_inv,
        cuda=lambda x, s: pallas_cast_transpose(x, s, dtype),
        default=lambda x, s: xla_cast_transpose(x, s, dtype),
    )
