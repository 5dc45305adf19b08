"""fogjax's parameter tree, one block at a time: the stacked (``nn.scan``) or unrolled tree of a
Transformer <-> one dict per block in layer order, plus the top-level entries.

Scanned, a run of blocks is one module whose leaves carry a leading layer axis ([L, ...]); under
an FP4 recipe with ``precision.high_precision_layers`` there are up to three such runs
(fogjax/model/transformer.py ``layer_segments``). Unrolled, block i is ``layers_<i>``. Export and
import see neither: they get block i's own leaves (e.g. ``{'attn': {'wqkv': {'kernel': [D, G,
R + 2, d_h]}}, ...}``) and the top-level ``embedding``, ``lm_head``, ``final_norm``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fogjax.model.transformer import layer_segments
from fogjax.precision.recipe import Recipe


def split_layers(params: dict, model_cfg: Any, recipe: Recipe) -> tuple[dict, list[dict]]:
    """(top-level entries, one params dict per block in layer order) of a Transformer's params.

    Leaves keep their type (NumPy or jax arrays); a scanned run's leaves are indexed, so a
    block's leaves have no layer axis.
    """
    segments = layer_segments(model_cfg, recipe)
    names = {s.name for s in segments}
    top = {k: v for k, v in params.items() if k not in names}
    layers: list[dict] = []
    for segment in segments:
        tree = params[segment.name]
        if model_cfg.scan_layers:
            layers += [_map(tree, lambda a, j=j: a[j]) for j in range(segment.length)]
        else:
            layers.append(tree)
    return top, layers


def join_layers(top: dict, layers: list[dict], model_cfg: Any, recipe: Recipe) -> dict:
    """The inverse of :func:`split_layers`: NumPy params in the Transformer's own layout."""
    params = dict(top)
    for segment in layer_segments(model_cfg, recipe):
        run = layers[segment.start : segment.start + segment.length]
        if model_cfg.scan_layers:
            params[segment.name] = _map_many(run, lambda *xs: np.stack(xs))
        else:
            (params[segment.name],) = run
    return params


def _map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def _map_many(trees: list[Any], fn: Any) -> Any:
    if isinstance(trees[0], dict):
        return {k: _map_many([t[k] for t in trees], fn) for k in trees[0]}
    return fn(*trees)


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{('attn', 'wqkv', 'kernel'): leaf, ...}``: the leaves of a nested dict by path."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(leaves: dict[tuple[str, ...], Any]) -> dict:
    """The inverse of :func:`flatten`."""
    tree: dict = {}
    for path, value in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
