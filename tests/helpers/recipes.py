"""A ``precision`` config section for recipe tests (config_lib's fields, locked like the real)."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

LINEAR_DIMS = (((1,), (0,)), ((), ()))
QK_DIMS = (((2,), (2,)), ((0,), (0,)))


def precision_config(**overrides) -> ml_collections.ConfigDict:
    """The ``precision`` section with config_lib's fields and defaults, ``overrides`` applied."""
    c = ml_collections.ConfigDict(
        {
            "recipe": "bf16",
            "backend": "xla",
            "compute_dtype": "bfloat16",
            "amax_history_len": 1024,
            "amax_reduction": "max",
            "margin": 0,
        }
    )
    c.update(overrides)
    c.lock()
    return c


class RecipeBlock(nn.Module):
    """Calls both recipe hooks from a compact method, as the model's Linear and attention do."""

    recipe: object

    @nn.compact
    def __call__(self, x, w, q, k):
        y = self.recipe.linear_dot_general("dot")(x, w, LINEAR_DIMS)
        logits = self.recipe.attention_dot_general("qk")(
            q, k, QK_DIMS, preferred_element_type=jnp.float32
        )
        return y, logits
