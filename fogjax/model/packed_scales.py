"""The scanned layers read their delayed-scaling ``scale_inv`` leaves as ONE array per layer.

Every delayed-scaled tensor of a block (three per FP8 Linear, ten in cuDNN FP8 attention) has a
float32 [1] ``<t>_scale_inv`` in the ``fp8`` collection, [L, 1] under nn.scan, and the train step
differentiates the loss with respect to it: its "gradient" is the amax the tensor had
(bulk_scaling.py). The scan's backward writes the cotangent of each scanned input into its own
[L, ...] stack, one dynamic-update-slice kernel per leaf, layer and micro-batch: 19 tiny kernels
per layer under fp8dpa, a third of what FP8 added to the backward's per-layer kernel count.

This module gives the scan a packed view instead (``flax.linen.map_variables``, apply only):
outside the scan the K ``scale_inv`` leaves of a layer stack become one float32 [L, K] leaf,
:data:`PACKED`; inside, each layer's [K] row is split back into the K [1] leaves the ops declare.
The stored collection (checkpoints, the bulk update, monitoring) keeps its per-tensor layout; the
concatenation and its transpose (slices) run once per micro-batch, outside the layer loop. The
values are the same bits, so nothing numerical changes.

Under FSDP (the batch split over D devices, scaling.partial_devices) the view also carries each
layer's amaxes out per device. Reduced inside the layer, every amax is a cross-device max: in the
8B FSDP step two all-reduces with their concatenations and slices per layer forward, three
backward, 26 kernels per layer and micro-batch. Instead the view adds :data:`PARTIALS`, float32
zeros [L, D, K] split over the devices along D, whose per-layer [D, K] slice unpacks into K
``<t>_amax_partials`` [D, 1] leaves (ScalingState.partials); the ops report their amaxes there,
one row per device (scaling.amax_partials), and the [L, D, K] cotangent is max-reduced over D once
per micro-batch, outside the layer loop, into the ``scale_inv`` cotangents the step reads. The
packed scales themselves then take no gradient inside the loop (a stop_gradient). A max moves no
bits: the step sees the same amaxes.

Which leaves are packed, and in what order, both sides derive from the ``<t>_amax_history``
leaves, which pass through the view unchanged: every ``<t>_amax_history`` names its
``<t>_scale_inv``. Transformer Engine's ``state`` variables (te.py) have no such pair and are left
alone.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from fogjax.precision import scaling
from fogjax.precision.bulk_scaling import HISTORY_SUFFIX, SCALE_INV_SUFFIX
from fogjax.precision.recipe import FP8_COLLECTION

# The packed leaf's name in the view: float32 [L, K] outside the scan, [K] inside.
PACKED = "packed_scale_inv"
# The per-device amax stand-ins: float32 [L, D, K] outside the scan, [D, K] inside (D > 1 only).
PARTIALS = "packed_amax_partials"

Path = tuple[str, ...]


def _scale_inv_paths(flat: dict[Path, Any]) -> list[Path]:
    """The ``<t>_scale_inv`` path of every ``<t>_amax_history`` leaf in ``flat``, sorted."""
    return sorted(
        path[:-1] + (path[-1][: -len(HISTORY_SUFFIX)] + SCALE_INV_SUFFIX,)
        for path in flat
        if path[-1].endswith(HISTORY_SUFFIX)
    )


def _flat_fp8(variables: dict[str, Any]) -> dict[Path, Any]:
    return traverse_util.flatten_dict(dict(variables.get(FP8_COLLECTION) or {}))


def _with_fp8(variables: dict[str, Any], flat: dict[Path, Any]) -> dict[str, Any]:
    return {**variables, FP8_COLLECTION: traverse_util.unflatten_dict(flat)}


def pack(variables: dict[str, Any]) -> dict[str, Any]:
    """``map_variables``' view of a layer stack's collections: the ``fp8`` collection's
    ``scale_inv`` leaves ([L, 1] float32 each) replaced by one [L, K] :data:`PACKED` leaf, columns
    in :func:`_scale_inv_paths` order. Unchanged when there are fewer than two, or when some
    history has no ``scale_inv`` beside it (not our delayed-scaling states)."""
    flat = _flat_fp8(variables)
    paths = _scale_inv_paths(flat)
    if len(paths) < 2 or not all(p in flat and flat[p].shape[-1:] == (1,) for p in paths):
        return variables
    scales = jnp.concatenate([flat.pop(p) for p in paths], axis=-1)
    devices = scaling.partial_devices()
    if devices > 1:
        flat[(PARTIALS,)] = _partials(scales, devices)
        scales = lax.stop_gradient(scales)
    flat[(PACKED,)] = scales
    return _with_fp8(variables, flat)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _partials(scales: jax.Array, devices: int) -> jax.Array:
    """float32 zeros [..., D, K] split over the devices along D, for ``scales`` [..., K]; its
    cotangent (amaxes per device) comes back max-reduced over D as the cotangent of ``scales``."""
    zeros = jnp.zeros(scales.shape[:-1] + (devices, scales.shape[-1]), jnp.float32)
    return scaling.constrain_partials(zeros, zeros.ndim - 2)


def _partials_fwd(scales: jax.Array, devices: int) -> tuple[jax.Array, None]:
    return _partials(scales, devices), None


def _partials_bwd(devices: int, _: None, seen: jax.Array) -> tuple[jax.Array]:
    del devices
    return (jnp.max(scaling.constrain_partials(seen, seen.ndim - 2), axis=-2),)


_partials.defvjp(_partials_fwd, _partials_bwd)


def unpack(variables: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`pack` on one layer's slice: the [K] :data:`PACKED` leaf split back
    into the K [1] ``scale_inv`` leaves the ops declare. Unchanged without a packed leaf."""
    flat = _flat_fp8(variables)
    packed = flat.pop((PACKED,), None)
    partials = flat.pop((PARTIALS,), None)
    if packed is None:
        return variables
    paths = _scale_inv_paths(flat)
    if packed.shape[-1] != len(paths):
        raise ValueError(
            f"the packed fp8 scales have {packed.shape[-1]} columns but the layer has "
            f"{len(paths)} amax histories: pack and unpack must see the same collection."
        )
    for i, path in enumerate(paths):
        flat[path] = packed[..., i : i + 1]
        if partials is not None:
            name = path[-1][: -len(SCALE_INV_SUFFIX)] + scaling.PARTIALS_SUFFIX
            flat[path[:-1] + (name,)] = partials[..., i : i + 1]
    return _with_fp8(variables, flat)
