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

Which leaves are packed, and in what order, both sides derive from the ``<t>_amax_history``
leaves, which pass through the view unchanged: every ``<t>_amax_history`` names its
``<t>_scale_inv``. Transformer Engine's ``state`` variables (te.py) have no such pair and are left
alone.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from fogjax.precision.bulk_scaling import HISTORY_SUFFIX, SCALE_INV_SUFFIX
from fogjax.precision.recipe import FP8_COLLECTION

# The packed leaf's name in the view: float32 [L, K] outside the scan, [K] inside.
PACKED = "packed_scale_inv"

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
    flat[(PACKED,)] = jnp.concatenate([flat.pop(p) for p in paths], axis=-1)
    return _with_fp8(variables, flat)


def unpack(variables: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`pack` on one layer's slice: the [K] :data:`PACKED` leaf split back
    into the K [1] ``scale_inv`` leaves the ops declare. Unchanged without a packed leaf."""
    flat = _flat_fp8(variables)
    packed = flat.pop((PACKED,), None)
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
    return _with_fp8(variables, flat)
