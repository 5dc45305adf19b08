"""A ``precision`` config section for recipe tests (config_lib's fields, locked like the real)."""

import ml_collections


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
