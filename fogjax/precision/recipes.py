"""The precision-recipe API in one import, for existing callers.

``Recipe``, ``DotGeneral``, ``FP8_COLLECTION`` and ``dtype_from_name`` live in recipe.py (the
interface, which imports nothing else from fogjax); ``make_recipe`` and ``available`` in
registry.py (the name table). Modules inside fogjax/precision import those two directly, never
this one, which keeps the import graph a tree.
"""

from __future__ import annotations

from fogjax.precision.recipe import FP8_COLLECTION, DotGeneral, Recipe, dtype_from_name
from fogjax.precision.registry import RECIPES, available, make_recipe

__all__ = [
    "FP8_COLLECTION",
    "RECIPES",
    "DotGeneral",
    "Recipe",
    "available",
    "dtype_from_name",
    "make_recipe",
]
