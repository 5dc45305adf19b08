"""OLMo2 with ``model.qk_norm='rms_all_heads'`` <-> transformers' ``Olmo2ForCausalLM``.

Per block: no pre-norm; RMSNorm on each branch output (``post_attention_layernorm``,
``post_feedforward_layernorm``); q and k normalised over the whole projection with gains [H*d_h]
and [G*d_h] (``self_attn.q_norm`` / ``k_norm``), which is why only that variant maps here: the
paper's per-head OLMo2 (gain [d_h]) is not an Olmo2ForCausalLM and exports as remote code
(family_fog.py). fogjax's all-heads gain is flattened in head order, HF's q_proj output order.
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
        mapping.same(("attn", "q_norm", "scale"), "self_attn.q_norm.weight"),
        mapping.same(("attn", "k_norm", "scale"), "self_attn.k_norm.weight"),
        mapping.same(("attn_post_norm", "scale"), "post_attention_layernorm.weight"),
        mapping.same(("mlp_post_norm", "scale"), "post_feedforward_layernorm.weight"),
    ]
