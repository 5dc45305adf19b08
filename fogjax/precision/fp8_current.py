"""An FP8 ``dot_general`` with current (just-in-time) per-tensor scaling: no history, no state.

Every tensor is scaled by its OWN amax at the moment it is quantised, as Transformer Engine's
``Float8CurrentScaling`` and torchao's dynamic scaling do:

    scale_inv(x) = amax(x) * 2**margin / fp8_max      (1 when amax(x) is 0 or not finite)

The GEMMs are those of fp8_dot.py, with that scale in place of the delayed one:

Forward:         out  = (q4(lhs) . q4(rhs)) * s_lhs * s_rhs
Data gradient:   dlhs = (q5(g) . q4(rhs)^T) * s_g * s_rhs
Weight gradient: drhs = (q4(lhs)^T . q5(g)) * s_g * s_lhs

q4 / q5 are scaling.quantize (saturating casts to E4M3 / E5M2, the division in the tensor's own
dtype), so the two recipe families differ only in where the scale comes from. A tensor's largest
element lands on fp8_max (over 2**margin): nothing saturates, whatever the tensor did last step
(in bf16, the rounding of the scale may lift the largest elements a hair past fp8_max, where the
clip puts them on fp8_max as rounding would: :func:`sow_current_stats`).

The price is one extra pass over each tensor: its amax is a full reduction that must finish
before the cast can start, where delayed scaling casts with a stored scale and records the amax in
the same pass. Under sharding the amax is a global max (XLA inserts the all-reduce).

The scale is capped at 2**126 (scale_inv >= the smallest normal float32): below an amax of
fp8_max * 2**-126 (about 5e-36 for E4M3) the formula's scale overflows float32, and a zero
scale_inv would turn the cast into inf/NaN. Transformer Engine caps it the same way (at FLT_MAX).

Only the FP8 operands and their scale_inv are saved for the backward pass. Nothing is stored in
the ``fp8`` collection; on statistics steps the operands' saturation and underflow fractions and
their amax are sown into ``fp8_stats`` (see :func:`sow_current_stats`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import fp8_ops
from jax import lax

from fogjax.precision import scaling
from fogjax.precision.formats import E4M3, E5M2, fp8_max
from fogjax.precision.fp8_dot import _scaled_dot, canonical_dimension_numbers, operand_stats
from fogjax.precision.recipe import FP8_STATS_COLLECTION

# The smallest scale_inv kept (the largest scale, 2**126): the smallest normal float32, which is
# also a normal bfloat16, so quantize's division by it (in the tensor's dtype) stays finite.
MIN_SCALE_INV = float(jnp.finfo(jnp.float32).tiny)


def current_scale_inv(x: jax.Array, dtype: Any, margin: float = 0) -> jax.Array:
    """``amax(x) * 2**margin / fp8_max(dtype)`` as float32 [1]: the DEquantisation multiplier
    that maps ``x``'s largest magnitude onto the format's maximum (over 2**margin).

    1 when amax is 0 (an all-zero tensor) or not finite (inf/NaN in ``x``: the saturating cast
    then clips inf, NaN stays NaN); at least :data:`MIN_SCALE_INV`. The arithmetic is delayed
    scaling's (scaling.next_scale_inv) applied to this tensor's amax, with 1 as the fallback.
    """
    fresh = scaling.next_scale_inv(
        scaling.amax(x), jnp.ones((1,), jnp.float32), fp8_max(dtype), margin
    )
    return jnp.maximum(fresh, jnp.float32(MIN_SCALE_INV))


def quantize_current(x: jax.Array, dtype: Any, margin: float = 0) -> tuple[jax.Array, jax.Array]:
    """``(q, scale_inv)``: ``x`` cast to ``dtype`` (E4M3 / E5M2) with its own current scale.

    Args:
      x: any shape, float (bf16 in training).
      dtype: ``float8_e4m3fn`` or ``float8_e5m2``.
      margin: scale = fp8_max / amax / 2**margin.
    Returns:
      ``q`` of ``x.shape`` in ``dtype`` and ``scale_inv`` float32 [1], with ``q * scale_inv ~ x``.
    """
    scale_inv = current_scale_inv(x, dtype, margin)
    return scaling.quantize(x, scale_inv, dtype), scale_inv


def fp8_current_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    out_dtype: Any = None,
    margin: float = 0,
) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` with E4M3 operands and E5M2 gradients,
    every one of them scaled by its own current amax.

    Args:
      lhs, rhs: operands; promoted to a common compute dtype (bf16 in training).
      dimension_numbers: as ``lax.dot_general``.
      out_dtype: dtype of the result (the dot accumulates into it and dequantises in it); default
        the compute dtype.
      margin: scale = fp8_max / amax / 2**margin.
    Returns:
      ``lax.dot_general``'s output shape in ``out_dtype``. Under ``jax.grad`` lhs and rhs get their
      FP8 gradients in the compute dtype.
    """
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    out_dtype = jnp.dtype(out_dtype or compute_dtype)
    return _current_dot(
        lhs.astype(compute_dtype),
        rhs.astype(compute_dtype),
        canonical_dimension_numbers(dimension_numbers),
        (out_dtype, compute_dtype),
        float(margin),
    )


# ``dtypes`` = (out_dtype, compute_dtype); static, like the dimension numbers and the margin.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _current_dot(lhs, rhs, dims, dtypes, margin):
    return _fwd(lhs, rhs, dims, dtypes, margin)[0]


def _fwd(lhs, rhs, dims, dtypes, margin):
    q_lhs, lhs_scale_inv = quantize_current(lhs, E4M3, margin)
    q_rhs, rhs_scale_inv = quantize_current(rhs, E4M3, margin)
    scale_inv = lhs_scale_inv * rhs_scale_inv
    out = _scaled_dot(q_lhs, q_rhs, dims, scale_inv, dtypes[0], lax.Precision.DEFAULT)
    # Only the FP8 operands and their scale_inv are saved (the high-precision copies are not).
    return out, (q_lhs, q_rhs, lhs_scale_inv, rhs_scale_inv)


def _bwd(dims, dtypes, margin, residuals, g):
    out_dtype, compute_dtype = dtypes
    q_lhs, q_rhs, lhs_scale_inv, rhs_scale_inv = residuals
    q_g, g_scale_inv = quantize_current(g, E5M2, margin)
    # As fp8_dot.py: flax's transposes emit dot_general(q_g, operand), E5M2 x E4M3 in both GEMMs;
    # their middle argument only lends its rank, so the FP8 copy stands in for the original.
    transpose = dict(
        dimension_numbers=dims, precision=lax.Precision.HIGHEST, preferred_element_type=out_dtype
    )
    dlhs = fp8_ops.dot_general_transpose_lhs(q_g, q_lhs, q_rhs, **transpose)
    dlhs = scaling.dequantize(dlhs, rhs_scale_inv * g_scale_inv, out_dtype)
    drhs = fp8_ops.dot_general_transpose_rhs(q_g, q_lhs, q_rhs, **transpose)
    drhs = scaling.dequantize(drhs, lhs_scale_inv * g_scale_inv, out_dtype)
    return dlhs.astype(compute_dtype), drhs.astype(compute_dtype)


_current_dot.defvjp(_fwd, _bwd)


def sow_current_stats(module: nn.Module, operands: Mapping[str, jax.Array], margin: float) -> None:
    """On statistics steps (``fp8_stats`` mutable, decided at trace time) sows, per named E4M3
    operand, ``{'saturation', 'underflow', 'amax'}`` (float32 scalars) into ``fp8_stats``; else
    nothing. The fractions are fp8_dot.operand_stats under the operand's current scale; they
    become the tags ``fp8/<path>/<op>_saturation`` etc., and ``<op>_amax`` is the tag delayed
    scaling reports from its history (max-combined over micro-batches by the train step).

    Saturation is not quite 0 in bf16: quantize divides by scale_inv rounded to bf16 (2**-9
    relative), which can lift the amax element, and its neighbours, to at most 448 * (1 + 2**-7),
    below 464, the midpoint past E4M3's maximum: the clip puts them on 448 as rounding would.
    """
    if not module.is_mutable_collection(FP8_STATS_COLLECTION):
        return
    for name, x in operands.items():
        values = {
            **operand_stats(x, current_scale_inv(x, E4M3, margin), E4M3),
            "amax": scaling.amax(x),
        }
        module.sow(
            FP8_STATS_COLLECTION, name, values, init_fn=lambda: {}, reduce_fn=lambda _, new: new
        )


class Fp8CurrentDotGeneral(nn.Module):
    """A drop-in ``dot_general`` whose three GEMMs run in FP8 with current per-tensor scaling.

    No variables. When ``fp8_stats`` is mutable, sows ``lhs`` and ``rhs`` dicts
    ``{'saturation', 'underflow', 'amax'}`` (:func:`sow_current_stats`).

    Attributes:
      margin: scale = fp8_max / amax / 2**margin (precision.margin).
    """

    margin: float = 0

    @nn.compact
    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Sequence[Any],
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
        """``lax.dot_general``'s contract, as fp8_dot.Fp8DotGeneral (``precision`` is ignored)."""
        del precision
        compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
        lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
        sow_current_stats(self, {"lhs": lhs, "rhs": rhs}, self.margin)
        return fp8_current_dot_general(
            lhs, rhs, dimension_numbers, preferred_element_type, self.margin
        )
