"""Model parameters without the scanned model's init to compile: the unrolled twin's init,
stacked (:func:`unrolled_init`), or shapes filled in NumPy (:func:`filled_params`)."""

from __future__ import annotations

import copy
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fogjax.model import build_model


def unrolled_init(config: Any, tokens: jax.Array, seed: int = 0, recipe: Any = None) -> dict:
    """``build_model(config, recipe).init(key(seed), tokens)``'s variables (every collection,
    unboxed) in the scanned layout, from the unrolled twin (``model.scan_layers=False``: the same
    initialisers per block, so the same distributions, not the same numbers) with its blocks
    stacked. Eagerly, the scanned init compiles the whole block body (~8 s per model on 2 cores;
    ~15 s under FP8), the unrolled one small ops that every model of the same widths shares.
    ``config``'s model must be one scanned run of blocks (``layers``)."""
    assert build_model(config, recipe).layer_names == ("layers",)
    unrolled = copy.deepcopy(config)
    with unrolled.unlocked():
        unrolled.model.scan_layers = False
    variables = nn.unbox(build_model(unrolled, recipe).init(jax.random.key(seed), tokens))
    out = {}
    for collection, tree in variables.items():
        blocks = [tree.pop(f"layers_{i}", None) for i in range(config.model.num_layers)]
        if blocks[0] is not None:
            tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        out[collection] = tree
    return out


def filled_params(model: nn.Module, tokens_shape: tuple[int, int], seed: int = 0) -> dict:
    """The params ``model.init`` would give for tokens of ``tokens_shape``, by shape only
    (jax.eval_shape), filled in NumPy: matrices (kernels, embedding, LM head) N(0, 0.02^2), every
    other entry (gains, scalars) 1 + N(0, 0.1^2). For tests whose claim holds for any parameters:
    an eager or jitted init compiles the layer body, ~5-10 s per model on 2 cores."""
    tokens = jax.ShapeDtypeStruct(tokens_shape, jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(seed)

    def fill(path, s):
        matrix = any(k in str(path[-1]) for k in ("kernel", "embedding", "lm_head"))
        values = (
            0.02 * rng.standard_normal(s.shape)
            if matrix
            else 1 + 0.1 * rng.standard_normal(s.shape)
        )
        return jnp.asarray(values.astype(s.dtype))

    return jax.tree_util.tree_map_with_path(fill, shapes)
