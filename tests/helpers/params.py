"""Model parameters of the right shapes without an init to compile."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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
