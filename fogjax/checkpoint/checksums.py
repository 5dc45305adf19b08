"""Per-array checksums of a train state, computed on device, so a corrupt checkpoint is detected.

Orbax verifies a checkpoint's structure, not its bytes: an array file overwritten in place (bad
disk, a stray ``dd``) loads and trains into NaN. :func:`checksums` gives one 32-bit number per
leaf, recorded at save and compared at restore.

The checksum of an array is ``sum_i u_i * (2 i + 1) mod 2**32`` over its elements in row-major
order, where ``u_i`` is element i's bit pattern as an unsigned integer: a weighted sum catches
changed bytes and moved elements. Integer arithmetic wraps exactly, so the result does not depend
on the reduction order, the mesh, or the device: a checkpoint restored onto another mesh gives
the same numbers. One jitted pass over the state, sharded like it, with no host copy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def array_checksum(x: jax.Array) -> jax.Array:
    """uint32 [] checksum of ``x`` (any shape; 1, 2 or 4-byte dtypes, bool, PRNG keys)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize in _UINT_OF_SIZE:
        bits = jax.lax.bitcast_convert_type(x, _UINT_OF_SIZE[x.dtype.itemsize]).astype(jnp.uint32)
    else:
        raise ValueError(f"No checksum for dtype {x.dtype} ({x.dtype.itemsize}-byte elements).")
    # The row-major element index, built per axis: no reshape, so no resharding of the input.
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride)
        stride = (stride * x.shape[axis]) % 2**32
    return jnp.sum(bits * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


_checksum_tree = jax.jit(lambda tree: jax.tree.map(array_checksum, tree))


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def checksums(tree: Any) -> dict[str, list]:
    """{'params/w': [dtype name, checksum]} for every array leaf of ``tree`` (one device sync)."""
    sums = jax.device_get(_checksum_tree(tree))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat_sums = jax.tree.leaves(sums)
    return {_path_str(p): [str(x.dtype), int(s)] for (p, x), s in zip(flat, flat_sums, strict=True)}


def mismatches(saved: dict[str, list], tree: Any) -> list[str]:
    """Leaves of ``tree`` whose checksum differs from ``saved``'s (leaves restored to another
    dtype, or missing from ``saved``, cannot be compared and are skipped)."""
    now = checksums(tree)
    return [
        path
        for path, (dtype, value) in now.items()
        if path in saved and saved[path][0] == dtype and saved[path][1] != value
    ]
