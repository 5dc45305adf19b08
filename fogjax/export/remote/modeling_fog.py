"""A PyTorch implementation of fogjax's transformer for transformers' ``trust_remote_code=True``:
FOG-max, FOG-opt, FOG-flash, OP, per-head OLMo2, and any fogjax block the stock transformers
classes cannot express (configuration_fog.py lists the choices).

Written against docs/spec.md §1, not translated from the JAX code, and checked against fogjax's
logits by tests/export. Shapes: tokens [B, T] int64 -> logits [B, T, V] in the weights' dtype.
Numerics as fogjax's: RMSNorm, LayerScale, the QK regulariser, RoPE, xIELU and GeLU in float32;
softmax in float32; RoPE frequencies computed in float64 and rounded once (as fogjax/model/rope.py).

Weights (safetensors names; shapes for D, H heads, G key/value heads, d_h, F, V):
  model.embed_tokens.weight [V, D]; lm_head.weight [V, D] (absent when tied); model.norm.weight [D]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight [H*d_h, D], [G*d_h, D], [G*d_h, D], [D, H*d_h]
  model.layers.{i}.self_attn.{q,k}_norm.weight [d_h] (or [H*d_h] / [G*d_h] with
    qk_norm_scope='all_heads'); .alpha [] for qk_type='tanh'; nothing when freeze_qk
  model.layers.{i}.{attn,mlp}_pre_norm.weight [D]; model.layers.{i}.{attn,mlp}_post_norm.weight [D]
  model.layers.{i}.mlp.{gate,up,down}_proj.weight [F, D], [F, D], [D, F] (no gate unless swiglu)
  model.layers.{i}.mlp.act.alpha_p, .alpha_n [] (xielu: softplus-parameterised, as in fogjax)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_fog import FogConfig


class FogRMSNorm(nn.Module):
    """g * x / sqrt(mean(x^2) + eps) over the last axis, in float32; ``learnable=False`` is the
    frozen RMSNorm (no gain)."""

    def __init__(self, size: int, eps: float, learnable: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size)) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


class FogLayerScale(nn.Module):
    """g * x with a per-channel gain (OP's branch-output "norm"), in float32."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.weight.float()).to(x.dtype)


class FogTanh(nn.Module):
    """FOG-flash's QK regulariser tanh(alpha x), one learnable scalar alpha, in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha.float() * x.float()).to(x.dtype)


class FogXIELU(nn.Module):
    """xIELU: alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n); x > 0: alpha_p x^2 + beta x,
    else alpha_n (expm1(min(x, eps)) - x) + beta x; in float32."""

    def __init__(self, beta: float, eps: float):
        super().__init__()
        self.beta, self.eps = beta, eps
        self.alpha_p = nn.Parameter(torch.tensor(math.log(math.expm1(0.8))))
        self.alpha_n = nn.Parameter(torch.tensor(math.log(math.expm1(0.8 - beta))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        alpha_p = nn.functional.softplus(self.alpha_p.float())
        alpha_n = self.beta + nn.functional.softplus(self.alpha_n.float())
        positive = alpha_p * x32 * x32 + self.beta * x32
        negative = alpha_n * (torch.expm1(torch.clamp(x32, max=self.eps)) - x32) + self.beta * x32
        return torch.where(x32 > 0, positive, negative).to(x.dtype)


def rope_inverse_frequencies(config: FogConfig) -> torch.Tensor:
    """[head_dim / 2] float32, from float64 (the Llama-3.1 rule when rope_type is 'llama3')."""
    p, d = config.rope_parameters, config.head_dim
    inv = 1.0 / p["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if p.get("rope_type", "default") == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        original = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (original / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv / factor + smooth * inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        medium = (wavelen <= original / low) & (wavelen >= original / high)
        inv = torch.where(medium, interpolated, scaled)
    return inv.float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, heads, T, d_h] at positions [B, T], in float32 (channel i pairs
    with i + d_h/2)."""
    angles = positions.float()[:, None, :, None] * inv_freq.to(x.device)  # [B, 1, T, d_h/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(s q.k + mask) v with the softmax in float32; q [B, H, T, d_h], k, v [B, G, S, d_h];
    returns ([B, T, H, d_h], probabilities)."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    if attention_mask is None:  # Causal over the whole (uncached) sequence.
        t, s = query.shape[2], key.shape[2]
        attention_mask = torch.full((t, s), float("-inf"), device=query.device).triu(s - t + 1)
    logits = logits + attention_mask
    probs = torch.softmax(logits, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class FogAttention(nn.Module):
    """GQA: q, k, v projections, QK regulariser (before RoPE), RoPE, softmax(s q.k), output."""

    def __init__(self, config: FogConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, g, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.heads, self.kv_heads, self.head_dim = h, g, d
        self.num_key_value_groups = h // g
        self.scaling = config.softmax_scale
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, g * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, g * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.q_norm = self.k_norm = None
        self.all_heads = config.qk_norm_scope == "all_heads"
        if config.qk_norm and config.qk_type == "tanh":
            self.q_norm, self.k_norm = FogTanh(), FogTanh()
        elif config.qk_norm:
            learnable = not config.freeze_qk
            q_size, k_size = (h * d, g * d) if self.all_heads else (d, d)
            self.q_norm = FogRMSNorm(q_size, config.rms_norm_eps, learnable)
            self.k_norm = FogRMSNorm(k_size, config.rms_norm_eps, learnable)

    def _regularise(self, x: torch.Tensor, norm: nn.Module | None, heads: int) -> torch.Tensor:
        """x [B, T, heads * d_h] -> [B, heads, T, d_h], regularised per head (or all at once)."""
        b, t, _ = x.shape
        if norm is not None and self.all_heads:
            x = norm(x)
        x = x.view(b, t, heads, self.head_dim)
        if norm is not None and not self.all_heads:
            x = norm(x)
        return x.transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q = self._regularise(self.q_proj(hidden_states), self.q_norm, self.heads)
        k = self._regularise(self.k_proj(hidden_states), self.k_norm, self.kv_heads)
        v = self.v_proj(hidden_states).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        inv_freq = rope_inverse_frequencies(self.config)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention
        )
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0)
        return self.o_proj(out.reshape(b, t, -1))


class FogMLP(nn.Module):
    """Non-gated act(x W_up) W_down (gelu, xielu) or gated silu(x W_gate) * (x W_up) W_down."""

    def __init__(self, config: FogConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.kind = config.hidden_act
        self.gate_proj = nn.Linear(d, f, bias=False) if self.kind == "swiglu" else None
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act = FogXIELU(config.xielu_beta, config.xielu_eps) if self.kind == "xielu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        if self.kind == "swiglu":
            h = (nn.functional.silu(self.gate_proj(x).float()) * up.float()).to(x.dtype)
        elif self.kind == "gelu":
            h = nn.functional.gelu(up.float()).to(x.dtype)  # the exact erf form
        else:
            h = self.act(up)
        return self.down_proj(h)


def _branch_norm(config: FogConfig, kind: str) -> nn.Module:
    if kind == "pre":
        return FogRMSNorm(config.hidden_size, config.rms_norm_eps) if config.pre_norm else None
    if config.post_norm:
        return FogRMSNorm(config.hidden_size, config.rms_norm_eps)
    return FogLayerScale(config.hidden_size) if config.layerscale else None


class FogDecoderLayer(nn.Module):
    """X' = X + Npost(Attn(Npre(X)));  Y = X' + Npost(FFN(Npre(X')))."""

    def __init__(self, config: FogConfig, layer_idx: int):
        super().__init__()
        self.self_attn = FogAttention(config, layer_idx)
        self.mlp = FogMLP(config)
        self.attn_pre_norm = _branch_norm(config, "pre")
        self.mlp_pre_norm = _branch_norm(config, "pre")
        self.attn_post_norm = _branch_norm(config, "post")
        self.mlp_post_norm = _branch_norm(config, "post")

    @staticmethod
    def _maybe(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: Any, cache: Any) -> Any:
        a = self.self_attn(self._maybe(self.attn_pre_norm, x), positions, mask, cache)
        x = x + self._maybe(self.attn_post_norm, a)
        m = self.mlp(self._maybe(self.mlp_pre_norm, x))
        return x + self._maybe(self.mlp_post_norm, m)


class FogPreTrainedModel(PreTrainedModel):
    config_class = FogConfig
    config: FogConfig
    base_model_prefix = "model"
    _no_split_modules = ["FogDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Values for weights a checkpoint lacks (an export has them all): Linear and Embedding
        N(0, initializer_range^2), gains 1 (from the base class), alpha and xIELU at their
        docs/spec.md §1 initial values. For training from scratch, use fogjax."""
        super()._init_weights(module)
        c = self.config
        if isinstance(module, FogLayerScale):
            init.ones_(module.weight)
        if isinstance(module, FogTanh):
            init.constant_(module.alpha, 0.5)
        if isinstance(module, FogXIELU):
            init.constant_(module.alpha_p, math.log(math.expm1(0.8)))
            init.constant_(module.alpha_n, math.log(math.expm1(0.8 - c.xielu_beta)))


class FogModel(FogPreTrainedModel):
    """tokens [B, T] -> final hidden states [B, T, D]."""

    def __init__(self, config: FogConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [FogDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = (
            FogRMSNorm(config.hidden_size, config.rms_norm_eps) if config.final_layernorm else None
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        x = inputs_embeds
        if self.config.input_upscale != 1.0:
            x = x * self.config.input_upscale
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(x.shape[1], device=x.device) + seen).unsqueeze(0)
        position_ids = position_ids.expand(x.shape[0], -1)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=x,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        for layer in self.layers:
            x = layer(x, position_ids, mask, cache)
        if self.norm is not None:
            x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache)


class FogForCausalLM(FogPreTrainedModel, GenerationMixin):
    """tokens [B, T] -> logits [B, T, V]."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FogConfig):
        super().__init__(config)
        self.model = FogModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
