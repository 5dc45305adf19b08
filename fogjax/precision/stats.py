"""FP8 metrics for TensorBoard: flat ``{'fp8/<path>/<metric>': scalar}`` dicts from FP8 state.

Two sources:

- the ``fp8`` collection (delayed-scaling state): per quantised tensor ``<op>`` (lhs, rhs, grad),
  ``<op>_amax`` = the most recent amax (history index 0) and ``<op>_scale`` = 1 / scale_inv, i.e.
  docs/spec.md's scale = fp8_max / amax / 2**margin that the next step will quantise with;
- the ``fp8_stats`` collection (sown by Fp8DotGeneral on statistics steps): per forward operand,
  ``<op>_saturation`` and ``<op>_underflow``, the fractions of elements clipped and flushed to zero.

Under nn.scan every leaf carries leading layer axes; each layer then gets its own tags, the index
appended to the first path component (``layers/attn/wqkv/dot`` -> ``layers_3/attn/wqkv/dot``), which
is the name an unscanned model gives the same module. Pure functions of jax arrays: call them inside
the jitted statistics step or on fetched host values alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PREFIX = "fp8"
_HISTORY = "_amax_history"
_SCALE_INV = "_scale_inv"


def _per_layer(path: tuple[str, ...], value: jax.Array) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Splits ``value``'s (leading, per-layer) axes into one scalar per layer; renames path[0]."""
    if value.ndim == 0:
        yield path, value
        return
    for idx in np.ndindex(*value.shape):
        suffix = "_".join(map(str, idx))
        head = (f"{path[0]}_{suffix}",) if path else (f"layer_{suffix}",)
        yield head + tuple(path[1:]), value[idx]


def _key(path: tuple[str, ...], metric: str, prefix: str) -> str:
    return "/".join((prefix,) + tuple(path) + (metric,))


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def fp8_state_metrics(fp8: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, jax.Array]:
    """``{'fp8/<path>/<op>_amax', 'fp8/<path>/<op>_scale'}`` from the ``fp8`` collection.

    Args:
      fp8: the collection, nested dicts whose leaves ``<op>_amax_history`` are float32 [..., H] and
        ``<op>_scale_inv`` float32 [..., 1] ([L, ...] when stacked by nn.scan). Other leaves (e.g.
        Transformer Engine's own scales, which follow another convention) are skipped.
    Returns:
      float32 scalars, one per tensor per layer.
    """
    metrics = {}
    for path, leaf in _flat(fp8).items():
        name, where = path[-1], path[:-1]
        if name.endswith(_HISTORY):
            metric, value = name[: -len(_HISTORY)] + "_amax", leaf[..., 0]
        elif name.endswith(_SCALE_INV):
            metric, value = name[: -len(_SCALE_INV)] + "_scale", 1.0 / leaf[..., 0]
        else:
            continue
        for layer_path, v in _per_layer(where, jnp.asarray(value, jnp.float32)):
            metrics[_key(layer_path, metric, prefix)] = v
    return metrics


def fp8_operand_metrics(fp8_stats: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, jax.Array]:
    """``{'fp8/<path>/<op>_saturation', 'fp8/<path>/<op>_underflow'}`` from ``fp8_stats``.

    Args:
      fp8_stats: the sown collection: ``<path>/<op>/{saturation, underflow}`` float32 scalars, or
        [L] when stacked by nn.scan.
    """
    metrics = {}
    for path, leaf in _flat(fp8_stats).items():
        where, metric = path[:-2], f"{path[-2]}_{path[-1]}"
        for layer_path, v in _per_layer(where, jnp.asarray(leaf, jnp.float32)):
            metrics[_key(layer_path, metric, prefix)] = v
    return metrics


def fp8_metrics(
    fp8: Mapping[str, Any], fp8_stats: Mapping[str, Any] | None = None, prefix: str = PREFIX
) -> dict[str, jax.Array]:
    """Both of the above in one flat dict (``fp8_stats`` may be absent on ordinary steps)."""
    return {**fp8_state_metrics(fp8, prefix), **fp8_operand_metrics(fp8_stats or {}, prefix)}
