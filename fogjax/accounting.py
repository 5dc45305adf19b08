"""Parameter counts, FLOPs per token and train-state memory of a config (``python -m fogjax.info``
prints them; the trainer and the bench take FLOPs per token from here).

Shapes come from ``jax.eval_shape``: nothing is allocated, so the 8B config answers in seconds.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fogjax import optim
from fogjax.model import build_model, weight_decay_mask
from fogjax.precision.recipe import Recipe
from fogjax.precision.registry import make_recipe


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


def _nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _opt_state_part(opt_state: Any, field: str) -> list[Any]:
    """The subtrees of ``opt_state`` held in NamedTuple fields called ``field`` (mu, nu,
    remainder), wherever the optax chain nests them."""
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            for name in node._fields:
                (found.append if name == field else visit)(getattr(node, name))
        elif isinstance(node, tuple | list):
            for child in node:
                visit(child)

    visit(opt_state)
    return found


def abstract_variables(config: Any) -> Any:
    """All of ``config``'s model variables (params and the recipe's FP8 state), unboxed
    ShapeDtypeStructs."""
    model = build_model(config, make_recipe(config.precision))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))


def state_memory(config: Any, variables: Any = None) -> dict[str, Any]:
    """Bytes of the train state's components for ``config`` as given (shapes only, no arrays).

    Components: ``params`` (the stored parameters; they are the
    master copy, in ``optim.master_dtype``: no other persistent copy exists, GEMM operands are
    cast per step), ``master_remainder`` (int16 per parameter with
    ``optim.master_rounding=remainder``), ``grads`` (one gradient tree in ``optim.grad_dtype``),
    ``mu`` and ``nu`` (the stored moments with their block scales), ``fp8_state`` (the FP8
    recipes' amax histories and scales). Activations and XLA temporaries are not included.

    Returns ``{"bytes": {component: int, ..., "total": int},
    "bytes_per_param": {component: float, ..., "total": float}, "num_params": int}``.
    ``variables``: :func:`abstract_variables` of ``config`` when the caller has them.
    """
    if variables is None:
        variables = abstract_variables(config)
    params32 = variables["params"]
    tx = optim.make_optimizer(config.optim, config.train.steps, weight_decay_mask)
    opt_state = jax.eval_shape(tx.init, params32)
    params = jax.eval_shape(optim.master_cast(config.optim), params32)
    grad_dtype = optim.grad_dtype(config.optim)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params32))
    sizes = {
        "params": _nbytes(params),
        "master_remainder": _nbytes(_opt_state_part(opt_state, "remainder")),
        "grads": n * grad_dtype.itemsize,
        "mu": _nbytes(_opt_state_part(opt_state, "mu")),
        "nu": _nbytes(_opt_state_part(opt_state, "nu")),
        "fp8_state": _nbytes(variables.get("fp8", {})),
    }
    sizes["total"] = sum(sizes.values())
    return {
        "bytes": sizes,
        "bytes_per_param": {k: v / n for k, v in sizes.items()},
        "num_params": n,
    }
