"""An FP8 ``dot_general`` with delayed scaling: all three GEMMs of a product run on FP8 operands.

Forward:         out  = (q4(lhs) . q4(rhs)) * s_lhs * s_rhs
Data gradient:   dlhs = (q5(g) . q4(rhs)^T) * s_g * s_rhs
Weight gradient: drhs = (q4(lhs)^T . q5(g)) * s_g * s_lhs

q4 / q5 are saturating casts to E4M3 / E5M2 after dividing by the tensor's delayed ``scale_inv``
``s`` (see scaling.py). The FP8 arrays go straight into ``lax.dot_general`` and the dequantisation
is one multiply of the result; on GPU, XLA folds that pattern into cuBLASLt's
``__cublas$lt$matmul$f8`` (flax's ``fp8_scaled_dot_general`` relies on the same rewrite). On CPU
XLA emulates the FP8 dot (convert, then an f32 GEMM): the same numbers, no speed-up.

State: the delayed-scaling states of lhs, rhs and the output gradient are inputs of a custom VJP
whose "gradient" for each is the amax that tensor had (scaling.observation: None for the history,
the amax in the ``scale_inv`` slot). The train step differentiates the loss with respect to params
and the ``scale_inv`` leaves of the ``fp8`` collection and updates every state once per optimizer
step from the max-combined amaxes (bulk_scaling.py); nothing is written in the forward pass.

The numerics are those of flax's ``Fp8DirectDotGeneralOp`` (tested bit for bit), with two
differences that do not change any number: the stored scale is one step fresher (scaling.py), and
only the FP8 operands are saved for the backward pass, not their high-precision originals.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import fp8_ops
from jax import lax

from fogjax.precision import cast_transpose, scaling
from fogjax.precision.formats import E4M3, E5M2
from fogjax.precision.recipe import FP8_STATS_COLLECTION, FP8_WEIGHTS_COLLECTION
from fogjax.precision.scaling import ScalingState

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]


class GradMode(NamedTuple):
    """What the backward does with the output gradient (static): report its amax (``observe``),
    and make its E5M2 cast, transposed copy and amax in one pass (``cast_transpose``)."""

    observe: bool
    cast_transpose: bool = False


def canonical_dimension_numbers(dimension_numbers: Any) -> DimensionNumbers:
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`` as hashable tuples of ints."""
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(map(int, lc)), tuple(map(int, rc))), (tuple(map(int, lb)), tuple(map(int, rb))))


def _scaled_dot(q_lhs, q_rhs, dims, scale_inv, out_dtype, precision):
    """``dot_general(q_lhs, q_rhs) * scale_inv``, the dot accumulating straight into out_dtype."""
    out = lax.dot_general(q_lhs, q_rhs, dims, precision=precision, preferred_element_type=out_dtype)
    return scaling.dequantize(out, scale_inv, out_dtype)


def fp8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    lhs_state: ScalingState,
    rhs_state: ScalingState,
    grad_state: ScalingState,
    dimension_numbers: Any,
    out_dtype: Any = None,
    amax_reduction: str = "max",
    margin: float = 0,
    lhs_amax: jax.Array | None = None,
    observe_grad: bool = True,
    lhs_fp8: tuple[jax.Array, jax.Array] | None = None,
    grad_cast_transpose: bool = False,
) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` with E4M3 operands and E5M2 gradients.

    Args:
      lhs, rhs: operands; promoted to a common compute dtype (bf16 in training).
      lhs_state, rhs_state, grad_state: delayed-scaling states (float32 [H] history, [1] scale_inv)
        of lhs, rhs and the output's cotangent.
      dimension_numbers: as ``lax.dot_general``.
      out_dtype: dtype of the result (the dot accumulates into it and dequantises in it); default
        the compute dtype.
      amax_reduction, margin: the scale update rule (scaling.py).
      lhs_amax: ``scaling.amax(lhs)`` measured by the caller (float32 scalar; fused_amax.py), or
        None to measure it here. Only what the lhs state observes depends on it.
      observe_grad: whether the output gradient's amax is reported to ``grad_state`` (False when
        somebody else reports it; mlp.py).
      lhs_fp8: ``(q_lhs, scale_inv)``, an E4M3 copy of lhs and its float32 [1] scale_inv that
        the caller already holds (cuDNN FP8 attention's output; :func:`check_lhs_fp8`), or None.
        Given, the GEMMs read it instead of casting ``lhs`` (which is then only the variable its
        gradient flows to), and ``lhs_state`` observes nothing (amax 0: its scale stays put).
      grad_cast_transpose: for a Linear (x [..., in] . W [in, ...]) that observes its output
        gradient, whose gradient arrives as a tensor of its own (a norm's VJP, the residual
        stream's gradient; not an elementwise producer that XLA would fuse into the cast): the
        gradient's E5M2 cast, its transposed copy and its amax in one pass
        (cast_transpose.py; on GPU a Pallas kernel) and the weight gradient reading the copy.
        The same numbers either way.
    Returns:
      ``lax.dot_general``'s output shape in ``out_dtype``. Under ``jax.grad`` lhs and rhs get their
      FP8 gradients (in the compute dtype) and each of the three states the observation
      ``ScalingState(None, amax [1])`` (apply it with ``scaling.apply_observation`` or
      ``bulk_scaling.apply``).
    """
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    out_dtype = jnp.dtype(out_dtype or compute_dtype)
    return _fp8_dot_general(
        lhs.astype(compute_dtype),
        rhs.astype(compute_dtype),
        lhs_state,
        rhs_state,
        grad_state,
        lhs_amax,
        check_lhs_fp8(lhs_fp8, lhs),
        canonical_dimension_numbers(dimension_numbers),
        (out_dtype, compute_dtype),
        amax_reduction,
        margin,
        GradMode(observe_grad, grad_cast_transpose),
    )


def check_lhs_fp8(
    lhs_fp8: tuple[jax.Array, jax.Array] | None, lhs: jax.Array
) -> tuple[jax.Array, jax.Array] | None:
    """``lhs_fp8`` as the custom VJPs take it (no gradient flows into it), after checking that it
    is an E4M3 array of ``lhs``'s shape with a size-1 scale_inv; raises ValueError otherwise."""
    if lhs_fp8 is None:
        return None
    q_lhs, scale_inv = lhs_fp8
    if q_lhs.shape != lhs.shape or q_lhs.dtype != jnp.dtype(E4M3) or scale_inv.size != 1:
        raise ValueError(
            f"lhs_fp8 must be an E4M3 copy of lhs {lhs.shape} and a size-1 scale_inv; got "
            f"{q_lhs.dtype} {q_lhs.shape} and scale_inv {scale_inv.shape}."
        )
    return lax.stop_gradient(q_lhs), lax.stop_gradient(jnp.reshape(scale_inv, (1,)))


# ``dtypes`` = (out_dtype, compute_dtype); static, like the dimension numbers and the update rule.
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _fp8_dot_general(
    lhs,
    rhs,
    lhs_state,
    rhs_state,
    grad_state,
    lhs_amax,
    lhs_fp8,
    dims,
    dtypes,
    reduction,
    margin,
    grad_mode,
):
    return _forward(lhs, rhs, lhs_state, rhs_state, lhs_fp8, dims, dtypes[0])[0]


def _lhs_operand(lhs, lhs_state, lhs_fp8):
    """``(q_lhs, its scale_inv [1])``: lhs cast with its own state, or the caller's copy."""
    if lhs_fp8 is not None:
        return lhs_fp8
    return scaling.quantize(
        lhs, lhs_state.scale_inv, E4M3, clip_in_float32=True
    ), lhs_state.scale_inv


def _forward(lhs, rhs, lhs_state, rhs_state, lhs_fp8, dims, out_dtype):
    q_lhs, lhs_scale_inv = _lhs_operand(lhs, lhs_state, lhs_fp8)
    q_rhs = scaling.quantize(rhs, rhs_state.scale_inv, E4M3)
    scale_inv = lhs_scale_inv * rhs_state.scale_inv
    out = _scaled_dot(q_lhs, q_rhs, dims, scale_inv, out_dtype, lax.Precision.DEFAULT)
    return out, q_lhs, q_rhs, lhs_scale_inv


def _lhs_amax(
    lhs: jax.Array, lhs_amax: jax.Array | None, lhs_fp8: Any, lhs_state: ScalingState
) -> jax.Array:
    """max|lhs| as a float32 scalar, or as [D, 1] per-device partials when the state has them
    (scaling.measure)."""
    if lhs_fp8 is not None:
        # The GEMMs never read lhs_state: nothing to observe.
        return scaling.conform(jnp.zeros((), jnp.float32), lhs_state.partials)
    if lhs_amax is None:
        return scaling.measure(lhs, lhs_state.partials)
    return scaling.conform(lhs_amax, lhs_state.partials)


def _fwd(
    lhs,
    rhs,
    lhs_state,
    rhs_state,
    grad_state,
    lhs_amax,
    lhs_fp8,
    dims,
    dtypes,
    reduction,
    margin,
    grad_mode,
):
    out, q_lhs, q_rhs, lhs_scale_inv = _forward(
        lhs, rhs, lhs_state, rhs_state, lhs_fp8, dims, dtypes[0]
    )
    # Saved: the FP8 operands and ONE float32 [5] of scales and amaxes. Under the layer scan every
    # residual becomes a stacked [L, ...] output written once per layer and micro-batch, so five
    # scalars packed cost one tiny write instead of five kernels; no [H] history is saved at all
    # (the step updates those once, bulk_scaling.py).
    amaxes = (
        _lhs_amax(lhs, lhs_amax, lhs_fp8, lhs_state),
        scaling.measure(rhs, rhs_state.partials),
    )
    scalars = _pack(lhs_scale_inv, rhs_state, grad_state, *amaxes)
    return out, (q_lhs, q_rhs, scalars)


def _pack(lhs_scale_inv, rhs_state, grad_state, lhs_amax, rhs_amax) -> Any:
    """The float32 [5] residual: the scale_invs the GEMMs used (lhs, rhs, gradient), then the lhs
    and rhs amaxes. With per-device amaxes ([D, 1] each): ([3] scales, [D, 2] amaxes), the amaxes
    kept apart because they are split over the devices and the scales are not."""
    scales = [lhs_scale_inv, rhs_state.scale_inv, grad_state.scale_inv]
    if lhs_amax.ndim == 2:
        return jnp.concatenate(scales), jnp.concatenate([lhs_amax, rhs_amax], axis=1)
    amaxes = jnp.stack([lhs_amax, rhs_amax])
    return jnp.concatenate(scales + [amaxes])


def _unpack(scalars: Any) -> tuple[jax.Array, ...]:
    """:func:`_pack`'s inverse: (lhs, rhs, gradient scale_inv [1] each, lhs amax, rhs amax as
    [1] each or [D, 1] each)."""
    if isinstance(scalars, tuple):
        scales, amaxes = scalars
        return (*(scales[i : i + 1] for i in range(3)), amaxes[:, 0:1], amaxes[:, 1:2])
    return tuple(scalars[i : i + 1] for i in range(5))


def _linear_split(
    dims: DimensionNumbers, lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]
) -> tuple[int, int] | None:
    """(rows, in) of a Linear's product viewed as matrices: no batch axes, the lhs contracting
    its trailing axes and the rhs its leading ones in the same order (x [..., in] . W [in, ...]);
    None for any other product."""
    (lc, rc), (lb, _) = dims
    n = len(lc)
    if lb or lc != tuple(range(len(lhs_shape) - n, len(lhs_shape))) or rc != tuple(range(n)):
        return None
    return math.prod(lhs_shape[: len(lhs_shape) - n]), math.prod(rhs_shape[:n])


def _bwd(dims, dtypes, reduction, margin, grad_mode, residuals, g):
    del reduction, margin  # The step applies the rule (bulk_scaling.py); kept for the signature.
    observe, cast_t = grad_mode
    out_dtype, compute_dtype = dtypes
    q_lhs, q_rhs, scalars = residuals
    lhs_scale_inv, rhs_scale_inv, grad_scale_inv, amax_lhs, amax_rhs = _unpack(scalars)
    # [D, 1] when the states carry per-device amaxes (scaling.ScalingState.partials), else [1].
    form = amax_lhs if amax_lhs.ndim == 2 else None
    transpose = dict(
        dimension_numbers=dims, precision=lax.Precision.HIGHEST, preferred_element_type=out_dtype
    )
    split = _linear_split(dims, q_lhs.shape, q_rhs.shape) if observe and cast_t else None
    if split is not None and not cast_transpose.applies((split[0], g.size // split[0])):
        split = None  # sharded or untiled: XLA's path below, which the partitioner splits
    if split is not None:
        # One pass over g makes q(g), q(g)^T and max|g| (cast_transpose.py: a Pallas kernel on
        # GPU), and the weight gradient reads q(g)^T as is: no transpose kernel of its own.
        rows, cols = split
        q_g, q_g_t, amax_g = cast_transpose.cast_transpose_or_xla(
            g.reshape(rows, -1), grad_scale_inv, E5M2
        )
        q_g = q_g.reshape(g.shape)
        seen_g = scaling.seen_as(scaling.conform(amax_g, form))
        drhs = lax.dot_general(
            q_lhs.reshape(rows, cols),
            q_g_t,
            (((0,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=out_dtype,
        ).reshape(q_rhs.shape)
    else:
        q_g = scaling.quantize(g, grad_scale_inv, E5M2)
        if not dims[1][0]:
            # A Linear's product (no batch axes): its weight gradient needs q_g transposed. Behind
            # the barrier XLA casts and reduces the amax in one pass and transposes the E5M2 copy,
            # instead of writing g in bf16 for a cast-transpose kernel to read back
            # (docs/speed.md). Not for the attention einsums, whose batched operands the
            # partitioner may reshard across it.
            q_g = lax.optimization_barrier(q_g)
        seen_g = ScalingState(None, None)
        if observe:
            seen_g = scaling.seen_as(scaling.measure(g, form))
        # flax's transposes emit dot_general(q_g, operand): E5M2 x E4M3. Their middle argument
        # only lends its rank, so the FP8 copy stands in for the unsaved original.
        drhs = fp8_ops.dot_general_transpose_rhs(q_g, q_lhs, q_rhs, **transpose)
    dlhs = fp8_ops.dot_general_transpose_lhs(q_g, q_lhs, q_rhs, **transpose)
    dlhs = scaling.dequantize(dlhs, rhs_scale_inv * grad_scale_inv, out_dtype)
    drhs = scaling.dequantize(drhs, lhs_scale_inv * grad_scale_inv, out_dtype)
    seen = (scaling.seen_as(amax_lhs), scaling.seen_as(amax_rhs), seen_g)
    return dlhs.astype(compute_dtype), drhs.astype(compute_dtype), *seen, None, None


_fp8_dot_general.defvjp(_fwd, _bwd)


def transposed_rhs_dims(dims: DimensionNumbers, rhs_ndim: int) -> DimensionNumbers:
    """The dimension numbers of the same product with the rhs laid out free axes first, then its
    contracted axes (in ``dims``' order): how a ``q_rhs_t`` made once per step holds it. The
    output is unchanged: the rhs free axes keep their order. Only for products without batch
    axes."""
    (lc, rc), (lb, rb) = dims
    if lb or rb:
        raise ValueError("a pre-transposed FP8 rhs needs a product without batch axes")
    return ((lc, tuple(range(rhs_ndim - len(rc), rhs_ndim))), ((), ()))


def kernel_shape(
    q: jax.Array, rhs_shape: tuple[int, ...], dims: DimensionNumbers, t: bool
) -> tuple[int, ...]:
    """The shape this product reads a once-per-step E4M3 copy ``q`` of its rhs in.

    ``q`` is either that shape (``rhs_shape``, or with ``t`` the free axes then the contracted
    ones) or the same bytes as a matrix: ``[in, out]`` (``in`` = the product of the contracted
    axes, which must lead the rhs), or with ``t`` ``[out, in]`` (weight_quantization.py). Raises
    ValueError, naming the model hook that sets the split, for any other shape.
    """
    rc = dims[0][1]
    free = tuple(a for a in range(len(rhs_shape)) if a not in rc)
    n_in = math.prod(rhs_shape[a] for a in rc)
    n_out = math.prod(rhs_shape[a] for a in free)
    if t:
        full, matrix = tuple(rhs_shape[a] for a in free + rc), (n_out, n_in)
    else:
        full, matrix = tuple(rhs_shape), (n_in, n_out)
        if rc != tuple(range(len(rc))):
            matrix = None  # an [in, out] matrix is the kernel's bytes only when in leads
    if tuple(q.shape) == full or (matrix is not None and tuple(q.shape) == matrix):
        return full
    raise ValueError(
        f"the once-per-step FP8 kernel{' (transposed)' if t else ''} has shape "
        f"{tuple(q.shape)}, but this dot contracts axes {rc} of a kernel {tuple(rhs_shape)} and "
        f"reads {full} or the matrix {matrix}: the model's kernel_contracting_axes disagrees "
        "with the Linear's dimension numbers."
    )


def fp8_dot_general_quantized_rhs(
    lhs: jax.Array,
    rhs: jax.Array,
    q_rhs: jax.Array,
    lhs_state: ScalingState,
    rhs_state: ScalingState,
    grad_state: ScalingState,
    dimension_numbers: Any,
    out_dtype: Any = None,
    lhs_amax: jax.Array | None = None,
    q_rhs_t: jax.Array | None = None,
    observe_grad: bool = True,
    lhs_fp8: tuple[jax.Array, jax.Array] | None = None,
    grad_cast_transpose: bool = False,
) -> jax.Array:
    """:func:`fp8_dot_general` with the rhs already quantised (``q_rhs`` = its E4M3 cast with
    ``rhs_state.scale_inv``, made once per optimizer step; weight_quantization.py).

    The same numbers as :func:`fp8_dot_general` on ``rhs``, bit for bit. ``rhs`` (compute dtype) is
    only the variable its gradient flows to; it is never read. Its state gets no observation here
    (None): whoever quantised it reports its amax. ``q_rhs_t``: optionally the same E4M3 values
    laid out as :func:`transposed_rhs_dims` says (free axes, then contracted), for the forward
    GEMM, which then needs no transpose of ``q_rhs``; the backward reads ``q_rhs``. Either may
    come as a matrix (:func:`kernel_shape`), reshaped inside the VJP so that the backward's
    residual is the very array given (under the layer scan, a slice of the stacked input, not a
    per-layer copy). ``lhs_fp8``, ``grad_cast_transpose``: as :func:`fp8_dot_general`'s.
    """
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    out_dtype = jnp.dtype(out_dtype or compute_dtype)
    dims = canonical_dimension_numbers(dimension_numbers)
    shapes = (kernel_shape(q_rhs, rhs.shape, dims, t=False), None)
    if q_rhs_t is not None:
        shapes = (shapes[0], kernel_shape(q_rhs_t, rhs.shape, dims, t=True))
    return _fp8_dot_general_q(
        lhs.astype(compute_dtype),
        rhs.astype(compute_dtype),
        q_rhs,
        q_rhs_t,
        lhs_state,
        rhs_state,
        grad_state,
        lhs_amax,
        check_lhs_fp8(lhs_fp8, lhs),
        dims,
        (out_dtype, compute_dtype),
        shapes,
        GradMode(observe_grad, grad_cast_transpose),
    )


# ``shapes``: (the shape the products read q_rhs in, that of q_rhs_t or None); static.
@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _fp8_dot_general_q(
    lhs,
    rhs,
    q_rhs,
    q_rhs_t,
    lhs_state,
    rhs_state,
    grad_state,
    lhs_amax,
    lhs_fp8,
    dims,
    dtypes,
    shapes,
    grad_mode,
):
    args = (lhs, rhs, q_rhs, q_rhs_t, lhs_state, rhs_state, grad_state, lhs_amax, lhs_fp8)
    return _fwd_q(*args, dims, dtypes, shapes, grad_mode)[0]


def _fwd_q(
    lhs,
    rhs,
    q_rhs,
    q_rhs_t,
    lhs_state,
    rhs_state,
    grad_state,
    lhs_amax,
    lhs_fp8,
    dims,
    dtypes,
    shapes,
    grad_mode,
):
    del rhs, grad_mode  # Only rhs's cotangent is wanted; grad_mode matters backward.
    q_lhs, lhs_scale_inv = _lhs_operand(lhs, lhs_state, lhs_fp8)
    scale_inv = lhs_scale_inv * rhs_state.scale_inv
    if q_rhs_t is None:
        q_kernel = q_rhs.reshape(shapes[0])
        out = _scaled_dot(q_lhs, q_kernel, dims, scale_inv, dtypes[0], lax.Precision.DEFAULT)
    else:
        dims_t = transposed_rhs_dims(dims, len(shapes[0]))
        q_kernel_t = q_rhs_t.reshape(shapes[1])
        out = _scaled_dot(q_lhs, q_kernel_t, dims_t, scale_inv, dtypes[0], lax.Precision.DEFAULT)
    # The rhs amax slot stays 0: the quantiser reports it (weight_quantization.py).
    lhs_seen = _lhs_amax(lhs, lhs_amax, lhs_fp8, lhs_state)
    zero = scaling.conform(jnp.zeros((), jnp.float32), rhs_state.partials)
    scalars = _pack(lhs_scale_inv, rhs_state, grad_state, lhs_seen, zero)
    return out, (q_lhs, q_rhs, scalars)


def _bwd_q(dims, dtypes, shapes, grad_mode, residuals, g):
    q_lhs, q_rhs, scalars = residuals
    residuals = (q_lhs, q_rhs.reshape(shapes[0]), scalars)
    dlhs, drhs, seen_lhs, _, seen_grad, *_ = _bwd(dims, dtypes, None, None, grad_mode, residuals, g)
    no_observation = ScalingState(None, None)
    return dlhs, drhs, None, None, seen_lhs, no_observation, seen_grad, None, None


_fp8_dot_general_q.defvjp(_fwd_q, _bwd_q)


def operand_stats(x: jax.Array, scale_inv: jax.Array, dtype: Any) -> dict[str, jax.Array]:
    """Fractions (float32 scalars) of ``x``'s elements that the FP8 cast clips or flushes to zero.

    ``saturation``: |x / scale_inv| > fp8_max (the cast clips them); ``underflow``: x != 0 but
    its cast is 0. Both computed in ``x``'s dtype, exactly as ``scaling.quantize`` sees them.
    """
    scaled = x / jnp.reshape(scale_inv, ()).astype(x.dtype)
    q = scaling.quantize(x, scale_inv, dtype)
    bound = jnp.finfo(dtype).max.astype(jnp.float32)
    return {
        "saturation": jnp.mean(jnp.abs(scaled.astype(jnp.float32)) > bound, dtype=jnp.float32),
        "underflow": jnp.mean((x != 0) & (q.astype(jnp.float32) == 0), dtype=jnp.float32),
    }


def sow_operand_stats(
    module: nn.Module, operands: dict[str, tuple[jax.Array, ScalingState]]
) -> None:
    """On statistics steps (``fp8_stats`` mutable, decided at trace time) sows, per named E4M3
    operand ``{name: (x, state)}``, its :func:`operand_stats` into ``fp8_stats``; else nothing."""
    if not module.is_mutable_collection(FP8_STATS_COLLECTION):
        return
    for name, (x, state) in operands.items():
        module.sow(
            FP8_STATS_COLLECTION,
            name,
            operand_stats(x, state.scale_inv, E4M3),
            init_fn=lambda: {},
            reduce_fn=lambda _, new: new,
        )


class Fp8DotGeneral(nn.Module):
    """A drop-in ``dot_general`` whose three GEMMs run in FP8 with delayed per-tensor scaling.

    Variables (collection ``fp8``, all float32): ``{lhs,rhs,grad}_amax_history`` [H] and
    ``{lhs,rhs,grad}_scale_inv`` [1]; stacked [L, ...] under nn.scan.

    When the ``fp8_weights`` collection holds an ``rhs`` for it (the train step's once-per-step
    E4M3 kernel, weight_quantization.py), it uses that instead of casting ``rhs`` again, and the
    forward GEMM reads the transposed copy ``rhs_t`` when there is one.

    When the ``fp8_stats`` collection is mutable (decided at trace time, so ordinary steps compile
    without it), sows ``lhs`` and ``rhs`` dicts ``{'saturation', 'underflow'}`` (operand_stats).

    Attributes:
      amax_history_len: H, the delayed-scaling window (precision.amax_history_len).
      amax_reduction: 'max' | 'most_recent' (precision.amax_reduction).
      margin: scale = fp8_max / amax / 2**margin (precision.margin).
    """

    amax_history_len: int = 1024
    amax_reduction: str = "max"
    margin: float = 0

    @nn.compact
    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Sequence[Any],
        precision: Any = None,
        preferred_element_type: Any = None,
        lhs_amax: jax.Array | None = None,
        observe_grad: bool = True,
        lhs_fp8: tuple[jax.Array, jax.Array] | None = None,
        grad_cast_transpose: bool = False,
    ) -> jax.Array:
        """``lax.dot_general``'s contract. Operands are promoted to a common compute dtype; the
        result has ``preferred_element_type`` if given, else the compute dtype. ``precision`` is
        accepted for signature compatibility and ignored: an FP8 GEMM has no precision choice.
        ``lhs_amax``: max|lhs| as the caller measured it in the pass that makes ``lhs``
        (fused_amax.py; Recipe.takes_lhs_amax), or None to measure it here. ``lhs_fp8``: an E4M3
        copy of lhs and its scale_inv that the caller holds (:func:`fp8_dot_general`), or None.
        ``grad_cast_transpose``: as :func:`fp8_dot_general`'s.
        """
        del precision
        compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
        lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
        h = self.amax_history_len
        lhs_state = scaling.declare_state(self, "lhs", h)
        rhs_state = scaling.declare_state(self, "rhs", h)
        grad_state = scaling.declare_state(self, "grad", h)
        # With lhs_fp8 the lhs state quantises nothing; the producer reports on its own cast.
        operands = {"rhs": (rhs, rhs_state)}
        if lhs_fp8 is None:
            operands = {"lhs": (lhs, lhs_state), **operands}
        sow_operand_stats(self, operands)
        if self.has_variable(FP8_WEIGHTS_COLLECTION, "rhs"):
            q_rhs_t = None
            if self.has_variable(FP8_WEIGHTS_COLLECTION, "rhs_t"):
                q_rhs_t = self.get_variable(FP8_WEIGHTS_COLLECTION, "rhs_t")
            return fp8_dot_general_quantized_rhs(
                lhs,
                rhs,
                self.get_variable(FP8_WEIGHTS_COLLECTION, "rhs"),
                lhs_state,
                rhs_state,
                grad_state,
                dimension_numbers,
                preferred_element_type,
                lhs_amax,
                q_rhs_t,
                observe_grad,
                lhs_fp8,
                grad_cast_transpose,
            )
        return fp8_dot_general(
            lhs,
            rhs,
            lhs_state,
            rhs_state,
            grad_state,
            dimension_numbers,
            preferred_element_type,
            self.amax_reduction,
            self.margin,
            lhs_amax,
            observe_grad,
            lhs_fp8,
            grad_cast_transpose,
        )
