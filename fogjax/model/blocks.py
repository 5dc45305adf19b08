"""The transformer block and the architecture registry (docs/spec.md §1).

Every architecture is one block shape,
    X' = X + Npost(Attn(Npre(X)));   Y = X' + Npost(FFN(Npre(X'))),
with different choices of Npre, Npost, QK regulariser, FFN activation, input scale and final
norm. The registry below records those choices per architecture; FOG-max, FOG-opt and FOG-flash
are three entries over the same FOG post-norm block, not three copies of code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

from fogjax.model import probes
from fogjax.model.attention import Attention
from fogjax.model.layers import LayerScale, RMSNorm
from fogjax.model.mlp import MLP
from fogjax.precision.recipe import Recipe

Array = jax.Array

SIGMA0 = 0.02
POST_NORMS = ("none", "rms", "layerscale")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """The per-architecture choices of docs/spec.md §1 (sizes live in fogjax.config_lib)."""

    pre_norm: bool  # RMSNorm (gain 1) before attention and FFN.
    post_norm: str  # 'none' | 'rms' | 'layerscale' on each branch output.
    qk_norm: str  # 'none' | 'rms' | 'rms_all_heads' | 'frozen_rms' | 'tanh'.
    ffn_activation: str  # 'swiglu' | 'smooth_swiglu' | 'gelu' | 'xielu'.
    input_scale: float  # Embedding output multiplier.
    final_norm: bool  # RMSNorm before the LM head.
    fog_softmax_scale: bool  # Larger fixed softmax scale (frozen QK gain folded in).
    post_norm_gain_is_one: bool = False  # OLMo2 initialises its post-norm gain to 1.


_FOG = dict(
    pre_norm=False,
    post_norm="rms",
    qk_norm="frozen_rms",
    input_scale=1.0 / SIGMA0,
    final_norm=False,
    fog_softmax_scale=True,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama3": ArchSpec(True, "none", "none", "swiglu", 1.0, True, False),
    "llama3_smooth_swiglu": ArchSpec(True, "none", "none", "smooth_swiglu", 1.0, True, False),
    "olmo2": ArchSpec(False, "rms", "rms", "swiglu", 1.0, True, False, post_norm_gain_is_one=True),
    "op": ArchSpec(False, "layerscale", "rms", "gelu", 1.0 / SIGMA0, False, False),
    "fog_max": ArchSpec(**{**_FOG, "ffn_activation": "xielu"}),
    "fog_opt": ArchSpec(**{**_FOG, "ffn_activation": "gelu"}),
    "fog_flash": ArchSpec(**{**_FOG, "ffn_activation": "gelu", "qk_norm": "tanh"}),
}


def _branch_norm(kind: str, gain_init: float, eps: float, dtype: Any, name: str) -> Any:
    if kind == "none":
        return lambda x: x
    if kind == "rms":
        return RMSNorm(eps, learnable=True, gain_init=gain_init, dtype=dtype, name=name)
    if kind == "layerscale":
        return LayerScale(gain_init, dtype=dtype, name=name)
    raise ValueError(f"Unknown model.post_norm={kind!r}; choose one of {POST_NORMS}.")


class Block(nn.Module):
    """One transformer block: x [B, T, D] -> [B, T, D] (compute dtype).

    Returns ``(y, None)`` so it can be the body of ``nn.scan`` over layers.
    """

    cfg: Any  # the `model` config section
    recipe: Recipe
    kurtosis_form: str = "token"
    decode_length: int = 0  # KV-cache slots of the attention (0: no cache).

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segments: Array | None = None
    ) -> tuple[Array, None]:
        """``segments``: int32 [B, T] document ids that attention must not cross, or None."""
        cfg, dtype = self.cfg, self.recipe.compute_dtype

        def pre(name: str) -> Any:
            if not cfg.pre_norm:
                return lambda h: h
            return RMSNorm(cfg.norm_eps, learnable=True, dtype=dtype, name=name)

        def post(name: str) -> Any:
            return _branch_norm(cfg.post_norm, cfg.post_norm_init, cfg.norm_eps, dtype, name)

        attn = Attention(cfg, self.recipe, self.kurtosis_form, self.decode_length, name="attn")
        x = x + post("attn_post_norm")(attn(pre("attn_pre_norm")(x), positions, segments))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        mlp = MLP(cfg, self.recipe, self.kurtosis_form, name="mlp")
        x = x + post("mlp_post_norm")(mlp(pre("mlp_pre_norm")(x)))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        probes.probe(self, "block_out", x, self.kurtosis_form)
        return x, None


def post_norm_init(arch: str, num_layers: int) -> float:
    """Initial post-norm / LayerScale gain: 1/sqrt(L) for FOG and OP, 1 for OLMo2."""
    return 1.0 if ARCHITECTURES[arch].post_norm_gain_is_one else 1.0 / math.sqrt(num_layers)
