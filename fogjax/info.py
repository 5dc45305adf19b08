"""Parameter counts and FLOPs per token of a config, as one JSON object.

    python -m fogjax.info --config=configs/fog_flash.py:1.5b

Shapes come from ``jax.eval_shape``: nothing is allocated, so the 8B config answers in seconds.
"""

from __future__ import annotations

import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from fogjax.model import build_model
from fogjax.precision.recipe import Recipe


def abstract_params(config: Any) -> Any:
    """The float32 parameter tree of ``config`` as ShapeDtypeStructs (no memory allocated)."""
    # Parameters do not depend on the precision recipe, so the plain one keeps this light.
    model = build_model(config, Recipe())
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return nn.unbox(variables["params"])


def model_info(config: Any, params: Any = None) -> dict[str, Any]:
    """Counts of ``config``'s model. flops_per_token = 6 N + 12 L D T (N: matmul weights + head).

    ``params``: the (abstract) parameter tree when the caller already has it; else traced here.
    """
    m = config.model
    if params is None:
        params = abstract_params(config)
    leaves = jax.tree_util.tree_leaves_with_path(params)

    def size(name: str) -> int:
        return sum(math.prod(x.shape) for p, x in leaves if getattr(p[-1], "key", "") == name)

    total = sum(math.prod(x.shape) for _, x in leaves)
    embedding = size("embedding")
    lm_head = size("lm_head")
    head = embedding if m.tie_embeddings else lm_head
    matmul = size("kernel") + head
    seq_len = config.train.seq_len
    return {
        "arch": m.arch,
        "params_total": total,
        "params_embedding": embedding + lm_head,
        "params_non_embedding": total - embedding - lm_head,
        "params_matmul": matmul,
        "flops_per_token": 6 * matmul + 12 * m.num_layers * m.d_model * seq_len,
        "layers": m.num_layers,
        "d_model": m.d_model,
        "num_heads": m.num_heads,
        "num_kv_heads": m.num_kv_heads,
        "head_dim": m.d_model // m.num_heads,
        "ffn_dim": m.ffn_dim,
        "ffn_activation": m.ffn_activation,
        "vocab_size": m.vocab_size,
        "tie_embeddings": m.tie_embeddings,
        "seq_len": seq_len,
        "recipe": config.precision.recipe,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("Give a config: --config=configs/fog_flash.py:1.5b")
    print(json.dumps(model_info(config), indent=2))


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing model_info defines none.
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fog_flash.py:1.5b.")
    app.run(main)
