"""Which Hugging Face class a fogjax model becomes, and its ``config.json``.

A model exports to transformers' own class when that class computes exactly fogjax's function:
``LlamaForCausalLM`` for pre-norm SwiGLU blocks without a QK regulariser (Llama3, and
Llama3 + SmoothSwiGLU, whose scale cancels outside FP8: family_llama.py), ``Olmo2ForCausalLM``
for OLMo2 with ``model.qk_norm='rms_all_heads'``. Everything else (FOG-max/opt/flash, OP,
per-head OLMo2, or a baseline with a changed option such as a softmax scale that is not
1/sqrt(d_h)) exports as remote code, the ``fog`` model type of remote/configuration_fog.py.

The config dicts are built here and validated by transformers' config classes when written
(fogjax/export/writer.py); nothing here needs transformers.
"""

from __future__ import annotations

import math
from typing import Any

from fogjax.config_lib import GATED_ACTIVATIONS

FAMILIES = ("llama", "olmo2", "fog")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "olmo2": "Olmo2ForCausalLM", "fog": "FogForCausalLM"}
# The remote code's classes, as transformers' auto_map names them (files in DIR).
AUTO_MAP = {
    "AutoConfig": "configuration_fog.FogConfig",
    "AutoModelForCausalLM": "modeling_fog.FogForCausalLM",
}


def _head_dim(m: Any) -> int:
    return m.d_model // m.num_heads


def native_mismatches(m: Any, family: str) -> list[str]:
    """Why transformers' own ``family`` class cannot compute model config ``m`` ([] if it can)."""
    want = {
        "llama": {"pre_norm": True, "post_norm": "none", "qk_norm": "none"},
        "olmo2": {"pre_norm": False, "post_norm": "rms", "qk_norm": "rms_all_heads"},
    }[family]
    out = [
        f"model.{k}={getattr(m, k)!r} (needs {v!r})" for k, v in want.items() if getattr(m, k) != v
    ]
    if m.ffn_activation not in GATED_ACTIVATIONS:
        out.append(f"model.ffn_activation={m.ffn_activation!r} (needs swiglu)")
    if m.input_scale != 1.0:
        out.append(f"model.input_scale={m.input_scale} (needs 1)")
    if not m.final_norm:
        out.append("model.final_norm=False (needs True)")
    if not math.isclose(m.softmax_scale, 1 / math.sqrt(_head_dim(m)), rel_tol=1e-6):
        out.append(f"model.softmax_scale={m.softmax_scale} (needs 1/sqrt(d_h))")
    return out


def choose_family(m: Any) -> str:
    """'llama', 'olmo2' (transformers' own classes) or 'fog' (remote code)."""
    for family in ("llama", "olmo2"):
        if not native_mismatches(m, family):
            return family
    return "fog"


def rope_parameters(m: Any) -> dict[str, Any]:
    """transformers 5's ``rope_parameters``: rotate-half RoPE with fogjax's base, and Llama-3.1
    frequency scaling when ``model.rope_scaling`` (the same rule, fogjax/model/rope.py)."""
    if not m.rope_scaling:
        return {"rope_type": "default", "rope_theta": float(m.rope_base)}
    return {
        "rope_type": "llama3",
        "rope_theta": float(m.rope_base),
        "factor": float(m.rope_scaling_factor),
        "low_freq_factor": float(m.rope_low_freq_factor),
        "high_freq_factor": float(m.rope_high_freq_factor),
        "original_max_position_embeddings": int(m.rope_original_context),
    }


def config_dict(m: Any, family: str, seq_len: int, eos_id: int | None, dtype: str) -> dict:
    """The ``config.json`` fields of model config ``m`` as ``family``.

    Args:
      m: the run's ``model`` config section.
      family: one of FAMILIES (:func:`choose_family`).
      seq_len: the trained context (``max_position_embeddings``).
      eos_id: the tokenizer's end-of-document id (None if unknown); fogjax uses no BOS token:
        documents are packed after the previous one's EOS, so EOS is also ``bos_token_id``.
      dtype: 'float32' or 'bfloat16', the dtype of the exported weights.
    """
    fields: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "vocab_size": int(m.vocab_size),
        "hidden_size": int(m.d_model),
        "intermediate_size": int(m.ffn_dim),
        "num_hidden_layers": int(m.num_layers),
        "num_attention_heads": int(m.num_heads),
        "num_key_value_heads": int(m.num_kv_heads),
        "max_position_embeddings": int(seq_len),
        "rms_norm_eps": float(m.norm_eps),
        "initializer_range": float(m.init_std),
        "tie_word_embeddings": bool(m.tie_embeddings),
        "rope_parameters": rope_parameters(m),
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": dtype,
    }
    if family in ("llama", "olmo2"):
        fields.update(hidden_act="silu", attention_bias=False)
    if family == "llama":
        fields.update(head_dim=_head_dim(m), mlp_bias=False)
    if family == "fog":
        fields.update(_fog_fields(m), auto_map=dict(AUTO_MAP))
    return fields


def _fog_fields(m: Any) -> dict[str, Any]:
    """The remote code's block choices (remote/configuration_fog.py), FOG release names first."""
    act = "swiglu" if m.ffn_activation in GATED_ACTIVATIONS else m.ffn_activation
    return {
        "qk_norm": m.qk_norm != "none",
        "freeze_qk": m.qk_norm == "frozen_rms",
        "qk_type": "tanh" if m.qk_norm == "tanh" else "norm",
        "qk_norm_scope": "all_heads" if m.qk_norm == "rms_all_heads" else "head",
        "pre_norm": bool(m.pre_norm),
        "post_norm": m.post_norm == "rms",
        "layerscale": m.post_norm == "layerscale",
        "input_upscale": float(m.input_scale),
        "final_layernorm": bool(m.final_norm),
        "softmax_scale": float(m.softmax_scale),
        "head_dim": _head_dim(m),
        "hidden_act": act,
        "xielu_beta": float(m.xielu_beta),
        "xielu_eps": float(m.xielu_eps),
    }
