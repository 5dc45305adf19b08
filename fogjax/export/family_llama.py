"""Llama3 and Llama3 + SmoothSwiGLU <-> transformers' ``LlamaForCausalLM`` (no remote code).

Per block: pre-norm RMSNorms (``input_layernorm`` before attention, ``post_attention_layernorm``
before the FFN: both are pre-norms in HF's naming), separate q/k/v/o projections, and the
gate/up/down SwiGLU projections.

SmoothSwiGLU shares SwiGLU's weights and exports as SwiGLU: fogjax/model/mlp.py divides h by a
stop-gradient maximum s (per token, or per channel with the scale folded into W_out's rows) and
multiplies the product by s again, (h / s) W s = h W. The scale exists only for what the FP8 cast
of h sees; outside FP8 it cancels (up to float rounding, ~1e-7 relative in float32).
"""

from __future__ import annotations

from typing import Any

from fogjax.export import mapping
from fogjax.export.mapping import Mapping


def layer_mappings(model_cfg: Any) -> list[Mapping]:
    """The mappings of one block's parameters."""
    return [
        *mapping.attention(model_cfg),
        *mapping.mlp(model_cfg, gated=True),
        mapping.same(("attn_pre_norm", "scale"), "input_layernorm.weight"),
        mapping.same(("mlp_pre_norm", "scale"), "post_attention_layernorm.weight"),
    ]
