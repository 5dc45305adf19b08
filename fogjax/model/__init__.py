"""Flax Linen modules for the FOG architectures and their baselines."""

from __future__ import annotations

from typing import Any

import ml_collections

from fogjax.model.transformer import Transformer, validate_model_config, weight_decay_mask
from fogjax.precision.recipe import Recipe
from fogjax.precision.registry import make_recipe

__all__ = [
    "Transformer",
    "build_model",
    "document_eos_id",
    "validate_model_config",
    "weight_decay_mask",
]


def document_eos_id(config: Any) -> int | None:
    """The EOS id attention masks documents at (``data.document_mask``), or None when off.

    Raises:
      ValueError: the mask is on but ``data.eos_id`` is unset (the trainer sets it from the
        dataset at start-up), or the attention implementation cannot mask.
    """
    data = config.get("data", {})
    if not data.get("document_mask", False):
        return None
    if config.model.attention_impl != "xla":
        raise ValueError(
            f"data.document_mask=True needs model.attention_impl='xla', not "
            f"{config.model.attention_impl!r}: JAX's cuDNN attention "
            "(jax.nn.dot_product_attention) and fogjax's fused FP8 kernel take no segment ids "
            "(only sequence lengths). Set --config.model.attention_impl=xla, or "
            "--config.data.document_mask=False."
        )
    eos_id = int(data.get("eos_id", -1))
    if eos_id < 0:
        raise ValueError(
            "data.document_mask=True needs data.eos_id, the id that ends a document; the trainer "
            "sets it from the dataset's metadata.json. Set --config.data.eos_id=ID."
        )
    return eos_id


def build_model(config: Any, recipe: Recipe | None = None) -> Transformer:
    """The Transformer of a full run config (sections `model`, `precision`, `log`,
    `data.document_mask` / `data.eos_id`, and `train.loss_chunk_tokens` for the train step)."""
    recipe = recipe or make_recipe(config.precision)
    # Frozen: a module must not change when the caller later edits its (mutable) config.
    model_cfg = ml_collections.FrozenConfigDict(config.model)
    return Transformer(
        model_cfg,
        recipe,
        kurtosis_form=config.log.kurtosis_form,
        document_eos_id=document_eos_id(config),
        loss_chunk_tokens=config.get("train", {}).get("loss_chunk_tokens", 0),
    )
