"""A BF16 GEMM with float32 output whose backward GEMMs are BF16 too.

``lax.dot_general(bf16, bf16, preferred_element_type=float32)`` is the right forward for the LM
head (float32 logits for the loss), but autodiff then hands the backward a float32 cotangent, and
XLA runs both backward GEMMs as float32 x float32 (TF32 on Hopper, half the BF16 rate: seen in the
H100 program that ``python -m fogjax.bench --target=h100`` compiles). docs/spec.md §3 keeps the LM
head in BF16, forward and backward, as Megatron does: here the cotangent is rounded to the operands'
dtype once, and the data and weight gradients are BF16 GEMMs (float32 accumulation inside the
GEMM, results in the operands' dtype).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` in float32, for same-dtype (BF16) operands.

    Args:
      lhs, rhs: operands of one low-precision dtype (bf16 in training).
      dimension_numbers: as ``lax.dot_general`` (hashable tuples).
    Returns:
      The product, float32. Its VJP returns cotangents in the operands' dtype, computed by
      ``lax.dot_general`` transposes of the cotangent rounded to that dtype.
    """
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _fwd(lhs, rhs, dimension_numbers):
    return bf16_dot_general(lhs, rhs, dimension_numbers), (lhs, rhs)


def _bwd(dimension_numbers, residuals, g):
    lhs, rhs = residuals

    def low(a, b):
        return lax.dot_general(a, b, dimension_numbers, preferred_element_type=lhs.dtype)

    _, vjp = jax.vjp(low, lhs, rhs)
    return vjp(g.astype(lhs.dtype))


bf16_dot_general.defvjp(_fwd, _bwd)


def low_precision_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.dot_general``, except that a float32 product of two BF16 (or F16) operands goes
    through :func:`bf16_dot_general`, so its backward GEMMs stay BF16.

    This is attention's QK^T outside FP8 recipes: float32 logits for the softmax, and the float32
    softmax cotangent rounded to BF16 before the dQ / dK GEMMs, as flash-attention kernels do
    (otherwise XLA runs both as float32 GEMMs, TF32 on Hopper). Anything else is unchanged.
    """
    low = lhs.dtype == rhs.dtype and lhs.dtype in (jnp.bfloat16, jnp.float16)
    if low and precision is None and preferred_element_type == jnp.float32:
        (lc, rc), (lb, rb) = dimension_numbers
        dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
        return bf16_dot_general(lhs, rhs, dims)
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
