"""Small models for the Hugging Face export tests: configs of every architecture, parameters
with every entry perturbed (so a swapped gain or a transposed block could not go unseen), and
loading an export in transformers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fogjax import config_lib
from fogjax.model import build_model
from helpers.params import unrolled_init

# (case id, arch, model overrides): the 7 architectures, OLMo2 in both QK-norm variants, and a
# tied-embedding Llama3.
CASES = [
    ("llama3", "llama3", {}),
    ("llama3_smooth_swiglu", "llama3_smooth_swiglu", {}),
    ("olmo2", "olmo2", {}),
    ("olmo2_all_heads", "olmo2", {"qk_norm": "rms_all_heads"}),
    ("op", "op", {}),
    ("fog_max", "fog_max", {}),
    ("fog_opt", "fog_opt", {}),
    ("fog_flash", "fog_flash", {}),
    ("llama3_tied", "llama3", {"tie_embeddings": True}),
]
# The transformers class each case must become.
HF_CLASS = {
    "llama3": "LlamaForCausalLM",
    "llama3_smooth_swiglu": "LlamaForCausalLM",
    "llama3_tied": "LlamaForCausalLM",
    "olmo2_all_heads": "Olmo2ForCausalLM",
}
VOCAB = 512


def tiny_config(arch: str, **model):
    """2 layers, d_model 128, 4 query heads in 2 GQA groups (so head order matters), vocab 512,
    float32 compute without FP8 casts (the numerics an export runs in)."""
    c = config_lib.get_config(arch, "tiny")
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 2, 128, 4, 2
    m.vocab_size, m.ffn_base_dim = VOCAB, 256
    for key, value in model.items():
        setattr(m, key, value)
    c.precision.recipe, c.precision.compute_dtype = "bf16", "float32"
    c.train.seq_len = 64
    return c


def perturbed_params(config, seed: int = 0) -> dict:
    """The model's init with each entry multiplied by 1 + 0.3 N(0, 1): gains and scalars that
    start equal (1, alpha0) all differ, as after training. NumPy float32 leaves."""
    leaves, tree = jax.tree.flatten(jax.device_get(_init_params(config, seed)))
    rng = np.random.default_rng(seed)
    noisy = [(x * (1 + 0.3 * rng.standard_normal(x.shape))).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(tree, noisy)


def _init_params(config, seed: int) -> dict:
    """The model's init params; for one scanned run of blocks, the unrolled twin's, stacked
    (helpers.params.unrolled_init: a few seconds of eager compiles instead of ~8 s)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    if build_model(config).layer_names == ("layers",):
        return unrolled_init(config, tokens, seed)["params"]
    return nn.unbox(build_model(config).init(jax.random.key(seed), tokens)["params"])


def fogjax_logits(config, params, tokens: np.ndarray) -> np.ndarray:
    """fogjax's float32 logits [B, T, V] of ``tokens`` [B, T]."""
    model = build_model(config)
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


def load_hf(directory: str):
    """The export in transformers, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32
    )
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def max_relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (relative to the largest logit, since logits near 0 have
    no meaningful elementwise relative error)."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def trained_config():
    """A tiny FOG-flash (remote-code family) on the byte tokenizer, trained in float32 without
    FP8 casts, so fogjax's own harness model and the exported float32 model compute alike."""
    from configs.default import get_config

    c = get_config()
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.ffn_base_dim = 2, 64, 2, 1, 128
    m.vocab_size = 300  # Padded beyond the byte tokenizer's 257: the export keeps every row.
    c.precision.recipe, c.precision.compute_dtype = "bf16", "float32"
    c.data.path = "embedded:bytes"
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.ckpt_every = 4, 8, 32, 2
    t.eval_every, t.log_every, t.stats_every = 0, 4, 1
    c.optim.warmup_steps, c.optim.cooldown_steps = 1, 1
    return c
