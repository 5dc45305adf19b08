"""Causal grouped-query attention with the paper's QK regularisers (docs/spec.md §1).

Layout: the fused QKV kernel is [D, G, R + 2, d_h] with R = H / G query heads per key/value group,
so query head h = g * R + r uses key/value group g (the repeat-kv convention), and tensor
parallelism can shard whole groups. Per group the R query heads come first, then K, then V.

Order of operations: QKV projection -> QK regulariser per head over d_h (``rms_all_heads``: over
the whole projection, as Hugging Face's Olmo2) -> RoPE -> logits
s * q.k in float32 -> causal softmax in float32 -> PV -> output projection [G, R, d_h, D].

QK^T and PV get their dot_general from the precision recipe (FP8 under ``fp8dpa``); with
``model.attention_impl='cudnn'`` one fused cuDNN flash-attention kernel replaces both (BF16, or FP8
under ``fp8dpa`` with the recipe's delayed scaling: precision/cudnn_attention.py).

Decoding (``decode_length`` > 0): keys and values (after the regulariser and RoPE, in the compute
dtype) are written into a ``cache`` collection of ``decode_length`` slots at each token's position,
and queries attend to every slot at or before their own position. The same recipe dot_generals
run over the cache, so FP8 quantisation (elementwise, with the checkpoint's delayed scales) sees
exactly the values a full forward pass would; nothing writes the FP8 state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fogjax.model import probes
from fogjax.model.layers import (
    Linear,
    RMSNorm,
    grad_arrives_whole,
    recompute_in_backward,
    rms_norm,
)
from fogjax.model.rope import apply_rope, rope_frequencies
from fogjax.precision.recipe import Recipe
from fogjax.sharding import mesh_axis_of, split_axis, split_batch_axes

Array = jax.Array

QK_NORMS = ("none", "rms", "rms_all_heads", "frozen_rms", "tanh")
ATTENTION_IMPLS = ("xla", "cudnn")

# Large negative logit for masked positions: finite so that fully-masked rows cannot produce NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# The variable collection of the decoding KV cache (stacked [L, ...] under nn.scan, like params).
CACHE_COLLECTION = "cache"


class TanhRegulariser(nn.Module):
    """FOG-flash's QK regulariser tanh(alpha * x) with one learnable scalar alpha (float32)."""

    alpha_init: float = 0.5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), ())
        return _tanh_regularise(x, alpha)


@recompute_in_backward
def _tanh_regularise(x: Array, alpha: Array) -> Array:
    return jnp.tanh(alpha * x.astype(jnp.float32)).astype(x.dtype)


class AllHeadsRMSNorm(nn.Module):
    """RMSNorm over every head of a projection at once, as Hugging Face's Olmo2 (and OLMo-core)
    normalise q and k: x [..., heads..., d_h] is flattened to [..., prod(heads) * d_h], normalised
    with one learnable gain of that length (float32, flattened in head order, so entry
    h * d_h + i is head h's channel i), and reshaped back. ``n_head_axes``: the head axes before
    d_h (2 for q [B, T, G, R, d_h], 1 for k [B, T, G, d_h])."""

    eps: float
    n_head_axes: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        lead = x.shape[: x.ndim - self.n_head_axes - 1]
        flat = x.reshape(lead + (-1,))
        # Replicated gain (logical axis None): its entries span every head, so no mesh axis that
        # splits heads can split it.
        gain = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (None,)),
            flat.shape[-1:],
            jnp.float32,
        )
        return rms_norm(flat, gain, self.eps, jnp.dtype(self.dtype)).reshape(x.shape)


def make_qk_regulariser(
    cfg: Any, dtype: Any, name: str, n_head_axes: int = 1
) -> Callable[[Array], Array]:
    """The QK regulariser named by ``cfg.qk_norm``: per head over d_h (the last axis), except
    ``rms_all_heads``, which normalises the whole projection (its ``n_head_axes`` head axes and
    d_h together: :class:`AllHeadsRMSNorm`)."""
    kind = cfg.qk_norm
    if kind == "none":
        return lambda x: x
    if kind == "rms":
        return RMSNorm(cfg.norm_eps, learnable=True, logical_axis="kv", dtype=dtype, name=name)
    if kind == "rms_all_heads":
        return AllHeadsRMSNorm(cfg.norm_eps, n_head_axes, dtype, name=name)
    if kind == "frozen_rms":
        return RMSNorm(cfg.norm_eps, learnable=False, dtype=dtype, name=name)
    if kind == "tanh":
        return TanhRegulariser(cfg.tanh_alpha_init, name=name)
    raise ValueError(f"Unknown model.qk_norm={kind!r}; choose one of {QK_NORMS}.")


def xla_attention(
    q: Array, k: Array, v: Array, scale: float, recipe: Recipe, visible: Array | None = None
) -> Array:
    """Softmax attention from two recipe dot_generals: causal, or as ``visible`` says.

    Args:
      q: [B, T, G, R, d_h]; k, v: [B, S, G, d_h], all in the compute dtype.
      scale: softmax scale s; logits are s * q.k in float32.
      visible: None for causal attention (S = T), or a bool mask broadcastable to the logits
        [B, G, T, R, S] saying which keys each query sees (the KV cache's).
    Returns:
      [B, T, G, R, d_h] in the compute dtype.

    Called from inside a Linen compact method: FP8 dot_generals bind to the calling module.
    """
    dtype = recipe.compute_dtype
    qk = recipe.attention_dot_general("qk")
    pv = recipe.attention_dot_general("pv")
    # Contract d_h; batch over (B, G): logits [B, G, T, R, S].
    logits = qk(q, k, (((4,), (3,)), ((0, 2), (0, 2))), preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    if visible is None:
        t, s = q.shape[1], k.shape[1]
        visible = jnp.arange(t)[:, None, None] >= jnp.arange(s)[None, None, :]  # [T, 1, S]
    logits = jnp.where(visible, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    # Contract S; batch over (B, G): [B, G, T, R, d_h].
    out = pv(probs, v, (((4,), (1,)), ((0, 1), (0, 2))), preferred_element_type=dtype)
    return jnp.transpose(out.astype(dtype), (0, 2, 1, 3, 4))


def cudnn_attention(q: Array, k: Array, v: Array, scale: float, recipe: Recipe) -> Array:
    """cuDNN fused flash attention, same shapes as xla_attention: FP8 under a recipe that quantises
    attention (precision/cudnn_attention.py, state named ``fp8_attention``), otherwise the compute
    dtype through ``jax.nn.dot_product_attention(implementation='cudnn')``."""
    if recipe.quantizes_attention:
        return recipe.fused_fp8_attention("fp8_attention")(q, k, v, scale)
    return _bf16_cudnn_attention(q, k, v, scale)


def cudnn_attention_fp8_output(
    q: Array, k: Array, v: Array, scale: float, recipe: Recipe
) -> tuple[Array, tuple[Array, Array] | None]:
    """:func:`cudnn_attention`, and where the out-projection can read it (FP8 attention under our
    delayed-scaling dots, ``recipe.takes_lhs_amax``) cuDNN's E4M3 output with its float32 [1]
    scale_inv, else None: FP8 across the attention boundary, as Transformer Engine's fp8_mha.
    The out-projection then skips its own cast of the output (a read of it, an E4M3 write and an
    amax: two kernels per layer and micro-batch) and quantises nothing twice."""
    if recipe.quantizes_attention and recipe.takes_lhs_amax:
        return recipe.fused_fp8_attention("fp8_attention")(q, k, v, scale, fp8_output=True)
    return cudnn_attention(q, k, v, scale, recipe), None


def _bf16_cudnn_attention(q: Array, k: Array, v: Array, scale: float) -> Array:
    """cuDNN attention in the compute dtype: q [B, T, G, R, H], k and v [B, S, G, H]."""
    b, t, g, r, d = q.shape
    q = q.reshape(b, t, g * r, d)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes:
        out = _fused_attention(q, k, v, scale)
    else:
        out = _fused_attention_in_manual_mesh(mesh, q, k, v, scale)
    return out.reshape(b, t, g, r, d)


def _fused_attention(q: Array, k: Array, v: Array, scale: float) -> Array:
    """Causal cuDNN attention: q [B, T, N, H], k and v [B, S, G, H] -> [B, T, N, H]."""
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation="cudnn"
    )


def _fused_attention_in_manual_mesh(mesh: Any, q: Array, k: Array, v: Array, scale: float) -> Array:
    """:func:`_fused_attention` inside a shard_map over the axes ``mesh`` still leaves to XLA.

    Inside a shard_map over some mesh axes (the train step's data-parallel accumulation holds
    'data'), XLA's partitioning of jax's cuDNN custom call fails (jax 0.10.2, "INTERNAL:
    custom_partitioner"); with every axis manual, jax lowers the call as is. Each device takes its
    rows (the remaining batch axes) and its key/value groups ('tensor', where it divides G; the
    query heads of a group are contiguous, so N splits with G) and needs no collective.
    """
    batch_axes = split_batch_axes(mesh, q.shape[0])
    heads = split_axis(mesh, mesh_axis_of("heads"), k.shape[2])
    spec = P(batch_axes or None, None, heads, None)
    return jax.shard_map(
        functools.partial(_fused_attention, scale=scale),
        in_specs=(spec, spec, spec),
        out_specs=spec,
        check_vma=True,
    )(q, k, v)


# model.attention_impl -> f(q, k, v, scale, recipe), called from inside a compact method.
ATTENTION_FUNCTIONS = {"xla": xla_attention, "cudnn": cudnn_attention}


def check_decoding_supported(cfg: Any, recipe: Recipe) -> None:
    """Raises ValueError when the KV cache cannot reproduce this model's attention."""
    if cfg.attention_impl == "cudnn" and recipe.quantizes_attention:
        raise ValueError(
            "Decoding with model.attention_impl='cudnn' under an FP8-attention recipe is not "
            "supported: the fused kernel's FP8 state cannot drive the cached attention. Decode "
            "with recipe=bf16 (or fp8, FP8 linears only), or train with attention_impl='xla'."
        )


class Attention(nn.Module):
    """x [B, T, D] -> [B, T, D]: fused QKV, QK regulariser, RoPE, causal GQA, output projection.

    With ``decode_length`` > 0 the keys and values go through the KV cache (module docstring);
    ``positions`` [B, T] then say where each token sits, and are its cache slots.
    """

    cfg: Any  # the `model` config section
    recipe: Recipe
    kurtosis_form: str = "token"
    decode_length: int = 0  # Cache slots; 0 = no cache (training and full forward passes).

    @nn.compact
    def __call__(self, x: Array, positions: Array, segments: Array | None = None) -> Array:
        """``segments``: int32 [B, T] document ids; a query sees only keys of its own document
        (and causally). None: plain causal attention."""
        cfg, recipe = self.cfg, self.recipe
        g, d_h = cfg.num_kv_heads, cfg.d_model // cfg.num_heads
        r = cfg.num_heads // g
        probes.probe(self, "qkv_in", x, self.kurtosis_form)
        qkv = Linear(
            (g, r + 2, d_h), ("embed", "heads", None, "kv"), cfg.init_std, recipe, name="wqkv"
        )(x)
        probes.probe(self, "qkv", qkv, self.kurtosis_form)
        q, k, v = qkv[..., :r, :], qkv[..., r, :], qkv[..., r + 1, :]

        q = make_qk_regulariser(cfg, recipe.compute_dtype, "q_norm", n_head_axes=2)(q)
        k = make_qk_regulariser(cfg, recipe.compute_dtype, "k_norm", n_head_axes=1)(k)
        probes.probe(self, "q_reg", q, self.kurtosis_form)
        probes.probe(self, "k_reg", k, self.kurtosis_form)

        inv_freq = rope_frequencies(
            d_h,
            cfg.rope_base,
            cfg.rope_scaling,
            cfg.rope_scaling_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_context,
        )
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        out_fp8 = None  # cuDNN FP8 attention's own E4M3 output, where wo can read it.
        if self.decode_length:
            k, v, visible = self._cached_keys_values(k, v, positions)
            out = xla_attention(q, k, v, cfg.softmax_scale, recipe, visible)
        elif cfg.attention_impl not in ATTENTION_FUNCTIONS:
            raise ValueError(
                f"Unknown model.attention_impl={cfg.attention_impl!r}; choose one of "
                f"{ATTENTION_IMPLS}."
            )
        elif segments is not None:
            # Only XLA attention takes a mask (fogjax.model.document_eos_id refuses the others).
            t = segments.shape[1]
            causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
            same = segments[:, :, None] == segments[:, None, :]  # [B, T, S]
            visible = (causal & same)[:, None, :, None, :]  # [B, 1, T, 1, S] as the logits
            out = xla_attention(q, k, v, cfg.softmax_scale, recipe, visible)
        elif cfg.attention_impl == "cudnn":
            out, out_fp8 = cudnn_attention_fp8_output(q, k, v, cfg.softmax_scale, recipe)
        else:
            out = ATTENTION_FUNCTIONS[cfg.attention_impl](q, k, v, cfg.softmax_scale, recipe)

        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scale_out_init else None
        return Linear(
            (cfg.d_model,),
            ("heads", None, "kv", "embed"),
            out_std or cfg.init_std,
            recipe,
            name="wo",
        )(out, x_fp8=out_fp8, grad_cast_transpose=grad_arrives_whole(cfg))

    def _cached_keys_values(
        self, k: Array, v: Array, positions: Array
    ) -> tuple[Array, Array, Array]:
        """Writes k, v [B, T, G, d_h] into cache slots ``positions`` [B, T]; returns the whole
        cache (keys, values [B, S, G, d_h], S = decode_length) and the mask [B, 1, T, 1, S] of
        the slots each query may see (slot <= its position: earlier tokens and itself)."""
        check_decoding_supported(self.cfg, self.recipe)
        b, _, g, d_h = k.shape
        shape = (b, self.decode_length, g, d_h)
        axes = ("batch", "length", "heads", "kv")
        keys = self.variable(CACHE_COLLECTION, "key", jnp.zeros, shape, k.dtype)
        values = self.variable(CACHE_COLLECTION, "value", jnp.zeros, shape, v.dtype)
        rows = jnp.arange(b)[:, None]
        # Slots past the end (a position >= decode_length) are dropped, never wrapped around.
        keys.value = nn.with_logical_constraint(
            keys.value.at[rows, positions].set(k, mode="drop"), axes
        )
        values.value = nn.with_logical_constraint(
            values.value.at[rows, positions].set(v, mode="drop"), axes
        )
        slots = jnp.arange(self.decode_length)
        visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
        return keys.value, values.value, visible[:, None, :, None, :]
