"""Every fogjax block <-> the remote code shipped with the export (remote/modeling_fog.py):
FOG-max, FOG-opt, FOG-flash, OP, per-head OLMo2, and any configuration the stock transformers
classes cannot express.

Per block, as modeling_fog.py names them: the projections (mapping.attention, mapping.mlp), the
QK regulariser (``self_attn.{q,k}_norm.weight`` for a learnable RMSNorm, ``.alpha`` for tanh,
nothing for the frozen RMSNorm), ``{attn,mlp}_pre_norm.weight`` and ``{attn,mlp}_post_norm.weight``
(RMSNorm or LayerScale gain), and xIELU's ``mlp.act.alpha_p`` / ``alpha_n`` (fogjax's raw,
softplus-parameterised scalars).
"""

from __future__ import annotations

from typing import Any

from fogjax.config_lib import GATED_ACTIVATIONS
from fogjax.export import mapping
from fogjax.export.mapping import Mapping


def layer_mappings(model_cfg: Any) -> list[Mapping]:
    """The mappings of one block's parameters."""
    m = model_cfg
    out = [*mapping.attention(m), *mapping.mlp(m, gated=m.ffn_activation in GATED_ACTIVATIONS)]
    for which in ("q", "k"):
        if m.qk_norm in ("rms", "rms_all_heads"):
            out.append(
                mapping.same(("attn", f"{which}_norm", "scale"), f"self_attn.{which}_norm.weight")
            )
        elif m.qk_norm == "tanh":
            out.append(
                mapping.same(("attn", f"{which}_norm", "alpha"), f"self_attn.{which}_norm.alpha")
            )
    for branch in ("attn", "mlp"):
        if m.pre_norm:
            out.append(mapping.same((f"{branch}_pre_norm", "scale"), f"{branch}_pre_norm.weight"))
        if m.post_norm != "none":
            out.append(mapping.same((f"{branch}_post_norm", "scale"), f"{branch}_post_norm.weight"))
    if m.ffn_activation == "xielu":
        out.append(mapping.same(("mlp", "xielu", "alpha_p_raw"), "mlp.act.alpha_p"))
        out.append(mapping.same(("mlp", "xielu", "alpha_n_raw"), "mlp.act.alpha_n"))
    return out
