"""Configuration of fogjax's remote-code models (FOG-max, FOG-opt, FOG-flash, OP, per-head OLMo2,
and any fogjax block the stock transformers classes cannot express), shipped next to the weights
by ``python -m fogjax.export`` and loaded with ``trust_remote_code=True``.

The block is docs/spec.md §1's one shape, X' = X + Npost(Attn(Npre(X))), Y = X' + Npost(FFN(
Npre(X'))); the fields choose its parts. Where the FOG release's Megatron-to-HF configs have a
name for a choice, it is used here (qk_norm, freeze_qk, qk_type, pre_norm, post_norm,
input_upscale, layerscale, final_layernorm, softmax_scale); the rest are transformers' usual
names. This file needs transformers only (no torch).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

HIDDEN_ACTS = ("gelu", "xielu", "swiglu")
QK_TYPES = ("norm", "tanh")
QK_NORM_SCOPES = ("head", "all_heads")


class FogConfig(PretrainedConfig):
    """Fields (defaults: a tiny FOG-flash):

    vocab_size, hidden_size (D), intermediate_size (FFN width), num_hidden_layers (L),
    num_attention_heads (H), num_key_value_heads (G, GQA: query head h uses key/value head
    h // (H / G)), head_dim (D / H), max_position_embeddings, rms_norm_eps, initializer_range,
    tie_word_embeddings, rope_parameters ({'rope_type': 'default' | 'llama3', 'rope_theta', and
    llama3's factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}).
    hidden_act: 'gelu' (exact erf, non-gated), 'xielu' (non-gated; xielu_beta, xielu_eps) or
      'swiglu' (silu(x Wg) * (x Wu), gated).
    pre_norm: RMSNorm (learnable gain) before attention and FFN.
    post_norm: RMSNorm (learnable gain) on each branch output; layerscale: a per-channel gain
      there instead (OP). At most one of the two.
    qk_norm: a regulariser on q and k, before RoPE; qk_type 'norm' (RMSNorm over each head's
      d_h, or over the whole projection with qk_norm_scope='all_heads'; no gain when
      freeze_qk) or 'tanh' (tanh(alpha x), one learnable alpha for q and one for k per layer).
    input_upscale: multiplier of the embedding output (1 = none; FOG and OP: 1/sigma0 = 50).
    final_layernorm: RMSNorm before the LM head.
    softmax_scale: s in softmax(s q.k) (1/sqrt(head_dim) for the baselines; FOG's is larger).
    """

    model_type = "fog"

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 1152
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int | None = None
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    hidden_act: str = "gelu"
    xielu_beta: float = 0.5
    xielu_eps: float = -1e-6
    pre_norm: bool = False
    post_norm: bool = True
    layerscale: bool = False
    qk_norm: bool = True
    qk_type: str = "tanh"
    freeze_qk: bool = False
    qk_norm_scope: str = "head"
    input_upscale: float = 50.0
    final_layernorm: bool = False
    softmax_scale: float = 0.17678
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"Invalid FogConfig: {message}")

        require(
            self.hidden_act in HIDDEN_ACTS,
            f"hidden_act={self.hidden_act!r}; use one of {HIDDEN_ACTS}",
        )
        require(self.qk_type in QK_TYPES, f"qk_type={self.qk_type!r}; use one of {QK_TYPES}")
        require(
            self.qk_norm_scope in QK_NORM_SCOPES,
            f"qk_norm_scope={self.qk_norm_scope!r}; use one of {QK_NORM_SCOPES}",
        )
        require(
            not (self.post_norm and self.layerscale),
            "post_norm and layerscale exclude each other",
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_attention_heads must be a multiple of num_key_value_heads",
        )
        require(
            not isinstance(self.input_upscale, bool),
            "input_upscale is the embedding multiplier (a number, 1.0 = none), not a flag",
        )
        rope_type = self.rope_parameters.get("rope_type", "default")
        require(rope_type in ("default", "llama3"), f"rope_type={rope_type!r}: default or llama3")
