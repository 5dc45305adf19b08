"""Reading a Hugging Face checkpoint directory as the params of a fogjax config
(``--config.train.init_from=DIR``): transformers' own Llama and OLMo2 checkpoints, and fogjax's
exports of every architecture.

Everything is checked before a byte of weights is used, and each mismatch is named with the
config field that fixes it: the checkpoint's family must be the one this config exports as
(hf_config.choose_family: the same function), its config.json must agree with the config on
every field that shapes or changes the function (widths, heads, vocabulary, norms, RoPE, softmax
scale, QK regulariser, ...), and every tensor must be present with the shape the run needs.
Weights are read memory-mapped and converted to float32 NumPy arrays in the run's layout (the
trainer casts them to its master dtype). Needs requirements-export.txt (transformers, no torch).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from fogjax.export import family_fog, family_llama, family_olmo2, hf_config, mapping
from fogjax.export.layout import flatten, join_layers
from fogjax.export.remote_code import config_class, quiet_transformers
from fogjax.export.safetensors_io import SafetensorsCheckpoint
from fogjax.precision.registry import make_recipe

LAYER_MAPPINGS = {
    "llama": family_llama.layer_mappings,
    "olmo2": family_olmo2.layer_mappings,
    "fog": family_fog.layer_mappings,
}
# A config.json field -> the fogjax config field that sets it (rope_* are rope_parameters keys).
FIXES = {
    "vocab_size": "model.vocab_size",
    "hidden_size": "model.d_model",
    "intermediate_size": "model.ffn_dim",
    "num_hidden_layers": "model.num_layers",
    "num_attention_heads": "model.num_heads",
    "num_key_value_heads": "model.num_kv_heads",
    "head_dim": "model.d_model / model.num_heads",
    "rms_norm_eps": "model.norm_eps",
    "tie_word_embeddings": "model.tie_embeddings",
    "hidden_act": "model.ffn_activation",
    "attention_bias": "(fogjax has no biases)",
    "mlp_bias": "(fogjax has no biases)",
    "rope_type": "model.rope_scaling",
    "rope_theta": "model.rope_base",
    "factor": "model.rope_scaling_factor",
    "low_freq_factor": "model.rope_low_freq_factor",
    "high_freq_factor": "model.rope_high_freq_factor",
    "original_max_position_embeddings": "model.rope_original_context",
    "qk_norm": "model.qk_norm",
    "freeze_qk": "model.qk_norm",
    "qk_type": "model.qk_norm",
    "qk_norm_scope": "model.qk_norm",
    "pre_norm": "model.pre_norm",
    "post_norm": "model.post_norm",
    "layerscale": "model.post_norm",
    "input_upscale": "model.input_scale",
    "final_layernorm": "model.final_norm",
    "softmax_scale": "model.softmax_scale",
    "xielu_beta": "model.xielu_beta",
    "xielu_eps": "model.xielu_eps",
}
# Which fogjax config a family's checkpoint needs, for the error that names it.
SUGGESTED_CONFIG = {
    "llama": "--config=configs/llama3.py (or configs/llama3_smooth_swiglu.py)",
    "olmo2": "--config=configs/olmo2.py --config.model.qk_norm=rms_all_heads",
    "fog": "the arch of the run it was exported from (model.arch in its fogjax_export.json)",
}
# Tensors some checkpoints carry that hold no parameter (old transformers' RoPE buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _fail(directory: str, message: str) -> None:
    raise ValueError(f"Cannot initialise from {directory} (train.init_from): {message}")


def _load_hf_config(directory: str) -> Any:
    """The checkpoint's config through its transformers class (defaults filled in)."""
    import json

    from transformers import LlamaConfig, Olmo2Config  # requirements-export.txt

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        _fail(directory, "no config.json there; point at a directory saved by transformers' "
              "save_pretrained or by python -m fogjax.export.")  # fmt: skip
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    classes = {"llama": LlamaConfig, "olmo2": Olmo2Config, "fog": None}
    if model_type not in classes:
        _fail(
            directory,
            f"config.json has model_type={model_type!r}; fogjax imports 'llama' "
            "(LlamaForCausalLM), 'olmo2' (Olmo2ForCausalLM) and its own exports ('fog').",
        )
    with quiet_transformers():
        return model_type, (classes[model_type] or config_class()).from_pretrained(directory)


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return not (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=1e-6)
        )
    return a != b


def check_config(directory: str, config: Any) -> str:
    """The checkpoint's family, after checking it computes the function of ``config.model``.

    Raises:
      ValueError: naming every mismatching field and the config field that fixes it.
    """
    family, hf = _load_hf_config(directory)
    m = config.model
    want = hf_config.choose_family(m)
    if family != want:
        reasons = hf_config.native_mismatches(m, family) if family != "fog" else []
        why = f" ({'; '.join(reasons)})" if reasons else ""
        _fail(
            directory,
            f"it holds a {hf_config.ARCHITECTURES[family]} checkpoint, but model.arch="
            f"{m.arch!r} with this config is the {want!r} family{why}. Use "
            f"{SUGGESTED_CONFIG[family]}.",
        )
    expected = hf_config.config_dict(m, family, config.train.seq_len, None, "float32")
    rope = expected.pop("rope_parameters")
    got_rope = dict(getattr(hf, "rope_parameters", None) or {})
    pairs = [(k, v, getattr(hf, k, None)) for k, v in expected.items() if k in FIXES]
    if rope["rope_type"] != got_rope.get("rope_type", "default"):
        pairs.append(("rope_type", rope["rope_type"], got_rope.get("rope_type", "default")))
    else:
        pairs += [(k, v, got_rope.get(k)) for k, v in rope.items() if k != "rope_type"]
    wrong = [
        f"{k}={theirs!r} in config.json but {FIXES[k]} gives {ours!r}"
        for k, ours, theirs in pairs
        if _differs(ours, theirs)
    ]
    if wrong:
        _fail(
            directory,
            "its config does not match this run's: "
            + "; ".join(wrong)
            + ". Set those fields to the checkpoint's values (e.g. --config.model.d_model=...).",
        )
    return family


def read_params(directory: str, config: Any, abstract_params: Any) -> dict:
    """The params of ``config`` from the checkpoint in ``directory``, as float32 NumPy arrays in
    the model's layout (scanned or not).

    Args:
      directory: a Hugging Face checkpoint directory (config.json and safetensors).
      config: the full run config.
      abstract_params: the run's params as shapes (``Run.abstract['params']``), to check against.
    Raises:
      ValueError: a missing directory, an unsupported or mismatching checkpoint (nothing read).
    """
    if not os.path.isdir(directory):
        _fail(directory, "no such directory.")
    family = check_config(directory, config)
    m = config.model
    try:
        ckpt = SafetensorsCheckpoint(directory)
    except FileNotFoundError as e:
        _fail(directory, str(e))
    top_maps, layer_maps = mapping.top_level(m), LAYER_MAPPINGS[family](m)
    needed = [n for mp in top_maps for n in mp.names] + [
        mapping.layer_prefix(i) + n
        for i in range(m.num_layers)
        for mp in layer_maps
        for n in mp.names
    ]
    present, wanted = set(ckpt.names), set(needed)
    missing = [n for n in needed if n not in present]
    tied_head = ["lm_head.weight"] if m.tie_embeddings else []  # Some writers keep both.
    unexpected = [
        n
        for n in ckpt.names
        if n not in wanted and n not in tied_head and not n.endswith(IGNORED_SUFFIXES)
    ]
    if missing or unexpected:
        _fail(
            directory,
            f"its tensors do not match this config's model (missing: {missing[:5] or 'none'}"
            f"{' ...' if len(missing) > 5 else ''}; unexpected: {unexpected[:5] or 'none'}"
            f"{' ...' if len(unexpected) > 5 else ''}). Is it the same architecture?",
        )
    recipe = make_recipe(config.precision)

    def read(name: str) -> np.ndarray:
        return np.asarray(ckpt.read(name), np.float32)

    try:
        top, layers = mapping.from_hf(read, m.num_layers, top_maps, layer_maps)
    except ValueError as e:  # A reshape that cannot work: a tensor of another shape.
        shapes = {n: ckpt.shape(n) for n in needed[:8]}
        _fail(directory, f"a tensor has the wrong shape ({e}); first tensors: {shapes}.")
    params = join_layers(top, layers, m, recipe)
    want = {p: tuple(a.shape) for p, a in flatten(abstract_params).items()}
    got = {p: a.shape for p, a in flatten(params).items()}
    wrong = [
        f"{'/'.join(p)}: {got.get(p)} (needs {want.get(p)})"
        for p in sorted(set(want) | set(got))
        if want.get(p) != got.get(p)
    ]
    if wrong:
        _fail(directory, "parameter shapes do not match the config: " + "; ".join(wrong[:8]))
    return params
