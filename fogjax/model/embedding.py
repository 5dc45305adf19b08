"""Vocab-parallel token embedding lookup (Megatron style), explicit in ``shard_map``.

Left to XLA, ``jnp.take(table, tokens)`` with the table split over ('tensor', 'fsdp') and the ids
over ('data', 'fsdp') is a gather whose operand and index shardings disagree; the SPMD partitioner
cannot reconcile them and falls back to an "Involuntary full rematerialization" of the output (and
of its cotangent in the backward pass). Here every device does the Megatron lookup instead:
all-gather its table slice's embed dim over 'fsdp', look its own rows up in its vocab slice (ids
outside the slice give zero rows), and sum the partial rows over 'tensor'. Autodiff of shard_map
turns the all-gather into a reduce-scatter and the psum into a broadcast, so the table gradient
arrives in the table's own sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fogjax.sharding import is_partitioned, mesh_axis_of, split_axis, split_batch_axes

# The mesh axes fogjax.sharding.LOGICAL_AXIS_RULES maps the table's 'vocab' and 'embed' onto.
VOCAB_AXIS = mesh_axis_of("vocab")
EMBED_AXIS = mesh_axis_of("embed")


def _specs(
    mesh: jax.sharding.AbstractMesh, table_shape: tuple[int, ...], tokens_shape: tuple[int, ...]
) -> tuple[P, P, tuple[str, ...]]:
    """(table spec, tokens spec, replica axes) for :func:`embed_lookup` under ``mesh``.

    The table [V, D] splits V over 'tensor' and D over 'fsdp' when they divide; the ids [B, ...]
    split B over the ('data', 'fsdp') axes with more than one device when their product divides B.
    Both match the shardings fogjax.sharding gives the parameter and the batch, so shard_map
    reshards nothing on entry, except that D stays whole when B is not split over 'fsdp'. The
    replica axes are the batch axes the table is whole on ('data'): its gradient sums over them.
    """
    vocab, d_model = table_shape
    batch_axes = split_batch_axes(mesh, tokens_shape[0])
    embed_axis = split_axis(mesh, EMBED_AXIS, d_model)
    if embed_axis not in batch_axes:
        # The in-body all-gather's result counts as varying over 'fsdp' (it transposes to a
        # reduce-scatter), which only an fsdp-split output may be. With the batch whole on 'fsdp'
        # (model.init's one-row batch, an odd eval batch) shard_map gathers D on entry instead.
        embed_axis = None
    table_spec = P(split_axis(mesh, VOCAB_AXIS, vocab), embed_axis)
    tokens_spec = P(batch_axes or None, *(None,) * (len(tokens_shape) - 1))
    replica_axes = tuple(a for a in batch_axes if a not in table_spec)
    return table_spec, tokens_spec, replica_axes


def embed_lookup(table: jax.Array, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The rows ``table[tokens]``, computed in ``dtype``.

    Args:
      table: the embedding [V, D] (float32 parameter); cast to ``dtype`` before the lookup.
      tokens: int32 ids [B, T] in [0, V) (an id outside gives a zero row when V is split over
        'tensor', where jnp.take's default gives NaN).
      dtype: the compute dtype of the result.

    Returns:
      [B, T, D] in ``dtype``, batch-sharded like ``tokens`` (P(batch axes, None, None)) under a
      multi-device mesh. Equal to ``jnp.take(table.astype(dtype), tokens, axis=0)``, gradients
      included (each row is one device's row plus exact zeros from the others).
    """
    table = table.astype(dtype)
    mesh = jax.sharding.get_abstract_mesh()
    if not is_partitioned(mesh):
        # One device, or inside a shard_map that holds every multi-device axis (the train step's
        # data-parallel accumulation): nothing left to partition.
        return jnp.take(table, tokens, axis=0)
    table_spec, tokens_spec, replica_axes = _specs(mesh, table.shape, tokens.shape)
    vocab_axis, embed_axis = table_spec

    def local(table: jax.Array, tokens: jax.Array) -> jax.Array:
        # Mark the table varying over the replica axes now, before the gather, rather than at the
        # lookup: the transpose then reduce-scatters over 'fsdp' first and all-reduces the
        # [V / tensor, D / fsdp] slice over 'data', not the whole gathered [V / tensor, D].
        table = lax.pcast(table, replica_axes, to="varying")
        if embed_axis is not None:  # Each device needs whole rows: [V / tensor, D].
            table = lax.all_gather(table, embed_axis, axis=1, tiled=True)
        if vocab_axis is None:
            return jnp.take(table, tokens, axis=0)
        rows = table.shape[0]
        local_ids = tokens - lax.axis_index(vocab_axis) * rows
        mine = (local_ids >= 0) & (local_ids < rows)
        # Clamp the other shards' ids to row 0, then zero their rows; the psum adds each token's
        # single nonzero row to zeros, so the sum is exact in any dtype.
        x = jnp.take(table, jnp.where(mine, local_ids, 0), axis=0)
        x = jnp.where(mine[..., None], x, jnp.zeros((), x.dtype))
        return lax.psum(x, vocab_axis)

    # check_vma=True: JAX checks that the output really is the same on every 'tensor' shard (the
    # out_specs claim it), and the pcast above only takes effect with the check on.
    out_spec = P(*tokens_spec, None)
    return jax.shard_map(
        local, in_specs=(table_spec, tokens_spec), out_specs=out_spec, check_vma=True
    )(table, tokens)
