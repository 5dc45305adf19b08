"""Flax Linen modules for the FOG architectures and their baselines."""

from __future__ import annotations

from typing import Any

from fogjax.model.transformer import Transformer, validate_model_config, weight_decay_mask
from fogjax.precision.recipes import Recipe, make_recipe

__all__ = ["Transformer", "build_model", "validate_model_config", "weight_decay_mask"]


def build_model(config: Any, recipe: Recipe | None = None) -> Transformer:
    """The Transformer of a full run config (sections `model`, `precision`, `log`)."""
    recipe = recipe or make_recipe(config.precision)
    return Transformer(config.model, recipe, kurtosis_form=config.log.kurtosis_form)
