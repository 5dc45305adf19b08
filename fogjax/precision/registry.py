"""Recipe name -> recipe factory, and :func:`make_recipe` from the config's ``precision`` section.

A plain table, filled here, at import time of this module only: importing any recipe module has no
side effect, and no recipe module imports this one (recipe.py <- fp8_recipes.py / fp4_recipes.py
<- registry.py), so there is no import circle. Adding a recipe is one entry below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fogjax.precision import fp4_recipes, fp8_recipes
from fogjax.precision.recipe import Recipe, dtype_from_name


def _bf16(precision: Any) -> Recipe:
    return Recipe(name="bf16", compute_dtype=dtype_from_name(precision.compute_dtype))


# Each factory takes the ``precision`` config section and returns a validated Recipe.
RECIPES: dict[str, Callable[[Any], Recipe]] = {
    "bf16": _bf16,
    "fp8": lambda p: fp8_recipes.recipe_from_config(p, "fp8", fp8_attention=False),
    "fp8dpa": lambda p: fp8_recipes.recipe_from_config(p, "fp8dpa", fp8_attention=True),
    "fp8_current": lambda p: fp8_recipes.recipe_from_config(
        p, "fp8_current", fp8_attention=False, scaling="current"
    ),
    "fp8dpa_current": lambda p: fp8_recipes.recipe_from_config(
        p, "fp8dpa_current", fp8_attention=True, scaling="current"
    ),
    "nvfp4": lambda p: fp4_recipes.recipe_from_config(p, "nvfp4"),
    "mxfp4": lambda p: fp4_recipes.recipe_from_config(p, "mxfp4"),
}


def available() -> list[str]:
    """The recipe names ``precision.recipe`` accepts, sorted."""
    return sorted(RECIPES)


def make_recipe(precision: Any) -> Recipe:
    """Builds the recipe named by ``precision.recipe`` (a ConfigDict or any attribute object)."""
    name = precision.recipe
    if name not in RECIPES:
        raise ValueError(
            f"Unknown precision.recipe={name!r}. Choose one of {available()} "
            "(e.g. --config.precision.recipe=fp8dpa)."
        )
    recipe = RECIPES[name](precision)
    first_last = fp4_recipes.high_precision_layers(precision)
    if any(first_last) and not isinstance(recipe, fp4_recipes.Fp4Recipe):
        raise ValueError(
            f"precision.high_precision_layers={first_last} keeps "
            f"blocks in BF16 under an FP4 recipe only, not under {name!r}; use "
            "--config.precision.recipe=nvfp4 (or mxfp4), or leave it at (0, 0)."
        )
    return recipe
