"""Creating the train state sharded from the start: abstract first, then shard at creation.

``jax.eval_shape`` gives the boxed (logically named) abstract state; the rules turn the names
into NamedShardings; ``jax.jit(init, out_shardings=...)`` materialises every array directly in
its shards, so no full copy of an 8B model ever lands on one device. The same abstract tree (with
shardings) is the restore target for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fogjax import sharding

State = dict[str, Any]

# Collections of the model's variables that belong to the train state.
STATE_COLLECTIONS = ("params", "fp8")


def make_init_fn(
    model: nn.Module, tx: optax.GradientTransformation, seq_len: int
) -> Callable[[jax.Array], State]:
    """``init(rng) -> state`` with boxed (logically partitioned) params and optimizer moments."""

    def init(rng: jax.Array) -> State:
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        variables = model.init(rng, tokens)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "fp8": variables.get("fp8", {}),
            "opt_state": tx.init(params),
        }

    return init


def strip_boxes(tree: Any) -> Any:
    """Removes logical-partitioning boxes without applying sharding constraints (abstract trees)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box
    )


def abstract_state(init: Callable[[jax.Array], State], mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """(unboxed abstract state with shardings attached, the matching sharding tree)."""
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        strip_boxes(boxed),
        shardings,
    )
    return abstract, shardings


def create_state(init: Callable[[jax.Array], State], shardings: Any, seed: int) -> State:
    """The freshly initialised state, created directly in its shards."""
    unboxed_init = lambda rng: nn.unbox(init(rng))  # noqa: E731
    return jax.jit(unboxed_init, out_shardings=shardings)(jax.random.key(seed))


def count_params(abstract: State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract["params"]))
