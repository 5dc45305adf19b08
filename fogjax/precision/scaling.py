"""Delayed per-tensor scaling: the amax history, ``scale_inv`` and their update rule
(docs/spec.md §3).

Every FP8-quantised tensor keeps two float32 arrays:

- ``amax_history`` [H]: max|x| of the last H steps, index 0 the most recent (flax's ring layout:
  each step rolls the window left by one and overwrites index 0);
- ``scale_inv`` [1]: the DEquantisation multiplier, ``amax * 2**margin / fp8_max``.

``scale_inv`` is the reciprocal of docs/spec.md's ``scale = fp8_max / amax / 2**margin`` (it is
what flax and Transformer Engine call the scale of their FP8 metas).

Step t quantises with the stored ``scale_inv`` (computed from steps < t) and records its own amax:

    q_t          = saturating_cast(x_t / scale_inv_{t-1})
    history_t    = roll(history_{t-1}) with history_t[0] = max|x_t|
    reduced_t    = max(history_t)   ('max')   or   history_t[0]   ('most_recent')
    scale_inv_t  = 1 / ((fp8_max / reduced_t) / 2**margin)   if 0 < reduced_t < inf
                 = scale_inv_{t-1}                            otherwise

Who does what: an FP8 op quantises with the stored ``scale_inv`` and reports the amax it saw as
the "gradient" of the state (:func:`observation`); the train step takes the max over micro-batches
and then updates every state of the model at once (:func:`apply_observation`, vectorised over the
stacked [L, ...] states; bulk_scaling.py). The ops never roll a history themselves: once per
optimizer step, not once per layer and micro-batch (Transformer Engine's bulk amax update).

flax's ``Fp8DirectDotGeneralOp`` quantises step t with the same number but stores it one step later
(it derives the scale from the old history at the start of each step), so its stored scale after
step t+1 equals ours after step t; quantised values, outputs and gradients are bit-identical.
The arithmetic is flax's own (``compute_scale``, ``quantize``; ``compute_amax_history``'s roll and
set, vectorised) so that this holds to the last bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import fp8_ops
from jax.sharding import PartitionSpec

from fogjax import sharding
from fogjax.precision.formats import saturating_cast
from fogjax.precision.recipe import FP8_COLLECTION

AMAX_REDUCTIONS = ("max", "most_recent")

# The view-only leaf beside each ``<t>_scale_inv`` that stands in for ScalingState.partials.
PARTIALS_SUFFIX = "_amax_partials"


class ScalingState(NamedTuple):
    """Delayed-scaling state of one tensor (a pytree; stacked [L, ...] under nn.scan)."""

    amax_history: jax.Array  # float32[H], index 0 = most recent step.
    scale_inv: jax.Array  # float32[1], dequantisation multiplier = amax * 2**margin / fp8_max.
    # float32 [D, 1] zeros, only inside the scanned layers of a step whose batch is split over D
    # devices (packed_scales.py): the op reports its amax per device as this leaf's "gradient"
    # (:func:`amax_partials`), and the scan's caller max-reduces over D once per micro-batch.
    partials: jax.Array | None = None


def init_state(history_len: int) -> ScalingState:
    """Zeros history, ``scale_inv = 1``: the first step quantises with scale 1 (a plain clip)."""
    return ScalingState(jnp.zeros((history_len,), jnp.float32), jnp.ones((1,), jnp.float32))


def quantize(
    x: jax.Array, scale_inv: jax.Array, dtype: Any, clip_in_float32: bool = False
) -> jax.Array:
    """``saturating_cast(x / scale_inv, dtype)``; the division runs in ``x``'s dtype, as in flax.

    Args:
      x: any shape, float (bf16 in training).
      scale_inv: float32 [1] (or any size-1 array).
      dtype: ``float8_e4m3fn`` or ``float8_e5m2``.
      clip_in_float32: the same values, clipped in float32 (formats.saturating_cast: fewer
        kernels for a forward cast; keep False for a cast of a GEMM's output).
    Returns:
      ``x.shape`` in ``dtype``.
    """
    scaled = x / jnp.reshape(scale_inv, ()).astype(x.dtype)
    return saturating_cast(scaled, dtype, clip_in_float32)


def quantize_per_row(x: jax.Array, scale_inv: jax.Array, dtype: Any) -> jax.Array:
    """:func:`quantize` with ``scale_inv`` broadcast against ``x`` (e.g. [L, 1, 1] for a stacked
    [L, D, F] kernel): each row gets exactly what :func:`quantize` of that row would give."""
    return saturating_cast(x / scale_inv.astype(x.dtype), dtype)


def dequantize(y: jax.Array, scale_inv: jax.Array, dtype: Any) -> jax.Array:
    """``y.astype(dtype) * scale_inv`` with ``scale_inv`` (size 1) rounded to ``dtype`` first."""
    return y.astype(dtype) * jnp.reshape(scale_inv, ()).astype(dtype)


def amax(x: jax.Array) -> jax.Array:
    """max|x| over every element as a float32 scalar (a global max under sharding)."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def partial_devices() -> int:
    """D: how many devices the tracing context splits a batch over (the non-Manual batch mesh
    axes, sharding.partitioned_batch_axes); 1 without a mesh. Inside the train step's per-replica
    ``shard_map`` over 'data', 'data' is Manual and does not count: its amaxes are reduced once
    per step anyway (train/step.py)."""
    return sharding.batch_devices(jax.sharding.get_abstract_mesh())


def constrain_partials(x: jax.Array, axis: int) -> jax.Array:
    """``x`` with its ``axis`` (of size D) split over the batch mesh axes, one entry per device,
    when D is :func:`partial_devices`; unchanged otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = sharding.partitioned_batch_axes(mesh)
    if not axes or x.shape[axis] != sharding.batch_devices(mesh):
        return x
    spec = [None] * x.ndim
    spec[axis] = axes
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def amax_partials(x: jax.Array, devices: int) -> jax.Array:
    """float32 [D, 1]: row d is max|x| over the d-th of D equal blocks of ``x``'s leading axis, so
    the max over D is :func:`amax` (the same bits: the maxima are taken in ``x``'s dtype).

    Why: an activation's leading axis is the batch, split over the D devices of the batch mesh
    axes; block d is then device d's own rows, and the partitioner computes each row without
    communication, where :func:`amax` all-reduces inside every layer of every micro-batch (two
    combined all-reduces plus their concatenations and slices per layer, forward and backward, in
    the 8B FSDP step). The [D, 1] result stays split over the devices until the scan's caller
    reduces all layers at once (packed_scales.py). Any tensor is correct here, only the cost
    differs: a leading axis that D does not divide gives every row the global amax.
    """
    if devices == 1 or x.ndim == 0 or x.shape[0] % devices:
        return jnp.broadcast_to(jnp.reshape(amax(x), (1, 1)), (devices, 1))
    blocks = jnp.abs(x.reshape((devices, x.shape[0] // devices) + x.shape[1:]))
    rows = jnp.max(blocks, axis=tuple(range(1, blocks.ndim))).astype(jnp.float32)
    return constrain_partials(rows[:, None], 0)


def measure(x: jax.Array, like: jax.Array | None) -> jax.Array:
    """max|x| in the form an op reports it: :func:`amax_partials` [D, 1] when ``like`` is a
    [D, 1] array (a ``partials`` leaf or an amax in that form), else :func:`amax` (scalar)."""
    if like is not None and like.ndim == 2:
        return amax_partials(x, like.shape[0])
    return amax(x)


def conform(measured: jax.Array, like: jax.Array | None) -> jax.Array:
    """An amax someone else measured (a scalar or [1], or [D, 1] partials) in ``like``'s form (see
    :func:`measure`): partials are max-reduced to a scalar, a scalar broadcast to [D, 1] rows."""
    if like is not None and like.ndim == 2:
        if measured.shape == like.shape:
            return measured
        return jnp.broadcast_to(jnp.reshape(jnp.max(measured), (1, 1)), like.shape)
    return jnp.max(measured) if measured.ndim == 2 else jnp.reshape(measured, ())


def seen_as(measured: jax.Array) -> ScalingState:
    """The "gradient" of a state whose tensor had amax ``measured``: in the ``scale_inv`` slot as
    float32 [1] (:func:`observation`), or, for [D, 1] partials, in the ``partials`` slot."""
    if measured.ndim == 2:
        return ScalingState(None, None, measured)
    return ScalingState(None, jnp.reshape(measured, (1,)))


def reduce_history(amax_history: jax.Array, reduction: str) -> jax.Array:
    """The amax that sets the next scale: max over the window, or the most recent entry."""
    if reduction == "max":
        return jnp.max(amax_history, axis=-1)
    if reduction == "most_recent":
        return amax_history[..., 0]
    raise ValueError(
        f"precision.amax_reduction={reduction!r} is not supported; use one of {AMAX_REDUCTIONS}."
    )


def next_scale_inv(
    reduced_amax: jax.Array, scale_inv: jax.Array, fp8_max: float | jax.Array, margin: float = 0
) -> jax.Array:
    """``1 / ((fp8_max / reduced_amax) / 2**margin)``, or the old ``scale_inv`` when the reduced
    amax is 0 (nothing seen yet) or not finite (an inf/NaN step must not destroy the scale).

    Shapes: ``reduced_amax`` and ``scale_inv`` broadcastable (scalar and [1]; or [..., 1] both).
    """
    fresh = fp8_ops.compute_scale(reduced_amax, scale_inv, fp8_max, margin)
    # compute_scale's own fallback returns 1/(1/old), which can differ from old in the last bit.
    valid = (reduced_amax > 0.0) & jnp.isfinite(reduced_amax)
    return jnp.where(valid, fresh, scale_inv).astype(jnp.float32)


def observation(seen: jax.Array) -> ScalingState:
    """What an FP8 op returns as the "gradient" of a tensor's state: the amax it saw.

    ``ScalingState(None, amax)``: no history cotangent (None is a symbolic zero; the history is
    not differentiated) and max|seen| as float32 [1] in the ``scale_inv`` slot. The train step
    max-combines these over micro-batches and applies :func:`apply_observation` once per step
    (bulk_scaling.py), so no op writes an [H] history of its own.

    Args:
      seen: the tensor itself (any shape), or an amax that somebody else measured (cuDNN).
    """
    return ScalingState(None, jnp.reshape(amax(seen), (1,)))


def apply_observation(
    state: ScalingState,
    observed: jax.Array,
    fp8_max: float | jax.Array,
    reduction: str = "max",
    margin: float = 0,
) -> ScalingState:
    """The state after a step whose tensor had amax ``observed``; vectorised over leading axes.

    Per row, exactly flax's ``compute_amax_history`` (roll the window left, write index 0) and
    ``compute_scale``, so a stacked [L, H] state updated in one call equals L separate updates.

    Shapes: ``amax_history`` float32 [..., H], ``scale_inv`` and ``observed`` float32 [..., 1];
    ``fp8_max`` a float, or float32 [..., 1] (one format per row; bulk_scaling.apply).
    """
    history = jnp.roll(state.amax_history, -1, axis=-1)
    history = history.at[..., 0].set(observed[..., 0].astype(history.dtype))
    reduced = reduce_history(history, reduction)[..., None]
    return ScalingState(history, next_scale_inv(reduced, state.scale_inv, fp8_max, margin))


def update(
    state: ScalingState, x: jax.Array, fp8_max: float, reduction: str = "max", margin: float = 0
) -> ScalingState:
    """The state after a step whose tensor was ``x`` (records max|x|, then recomputes the scale)."""
    return apply_observation(state, observation(x).scale_inv, fp8_max, reduction, margin)


def declare_state(module: nn.Module, prefix: str, history_len: int) -> ScalingState:
    """Declares ``{prefix}_amax_history`` and ``{prefix}_scale_inv`` in the ``fp8`` collection of
    ``module`` (call from a compact method) and returns their current values.

    The variables are never written in the forward pass: the train step differentiates with respect
    to the ``fp8`` collection and replaces it with its "gradient", which the FP8 GEMMs define as the
    new state.
    """
    history = module.variable(
        FP8_COLLECTION, f"{prefix}_amax_history", jnp.zeros, (history_len,), jnp.float32
    )
    scale_inv = module.variable(FP8_COLLECTION, f"{prefix}_scale_inv", jnp.ones, (1,), jnp.float32)
    partials = None
    if module.has_variable(FP8_COLLECTION, prefix + PARTIALS_SUFFIX):
        partials = module.get_variable(FP8_COLLECTION, prefix + PARTIALS_SUFFIX)
    return ScalingState(history.value, scale_inv.value, partials)
