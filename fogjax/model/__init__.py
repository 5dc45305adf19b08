"""Flax Linen modules for the FOG architectures and their baselines."""

from __future__ import annotations

from typing import Any

import ml_collections

from fogjax.model.transformer import Transformer, validate_model_config, weight_decay_mask
from fogjax.precision.recipe import Recipe
from fogjax.precision.registry import make_recipe

__all__ = ["Transformer", "build_model", "validate_model_config", "weight_decay_mask"]


def build_model(config: Any, recipe: Recipe | None = None) -> Transformer:
    """The Transformer of a full run config (sections `model`, `precision`, `log`)."""
    recipe = recipe or make_recipe(config.precision)
    # Frozen: a module must not change when the caller later edits its (mutable) config.
    model_cfg = ml_collections.FrozenConfigDict(config.model)
    return Transformer(model_cfg, recipe, kurtosis_form=config.log.kurtosis_form)
