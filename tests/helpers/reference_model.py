"""An independent float64 NumPy re-implementation of every block type, from docs/spec.md §1's
equations.

It reads parameters from the Flax tree (same layout) but shares no code with fogjax.model: norms,
RoPE (including the Llama-3.1 frequency rule), GQA attention, activations and the block wiring are
written out again here.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def rmsnorm(z, gain=None, eps=1e-5):
    y = z / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + eps)
    return y if gain is None else y * gain


def inv_frequencies(d_h, base, scaling, factor, low, high, original):
    inv = np.array([base ** (-(2.0 * i) / d_h) for i in range(d_h // 2)])
    if not scaling:
        return inv
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def rope(x, positions, inv):
    """x [B, T, ..., d_h]; pairs channel i with i + d_h/2 (rotate-half)."""
    half = x.shape[-1] // 2
    ang = positions[:, :, None] * inv[None, None, :]  # [B, T, d_h/2]
    ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + (half,))
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def xielu(x, a_p, a_n, beta, eps):
    alpha_p = softplus(a_p)
    alpha_n = beta + softplus(a_n)
    return np.where(
        x > 0, alpha_p * x * x + beta * x, alpha_n * (np.expm1(np.minimum(x, eps)) - x) + beta * x
    )


def regularise(x, kind, p, eps):
    if kind == "none":
        return x
    if kind == "frozen_rms":
        return rmsnorm(x, None, eps)
    if kind == "rms":
        return rmsnorm(x, p["scale"], eps)
    if kind == "tanh":
        return np.tanh(p["alpha"] * x)
    raise ValueError(kind)


def attention(x, p, cfg, positions):
    b, t, d = x.shape
    h, g = cfg.num_heads, cfg.num_kv_heads
    r, d_h = h // g, d // h
    w = p["wqkv"]["kernel"]  # [D, G, R + 2, d_h]
    qkv = np.einsum("btd,dgjk->btgjk", x, w)
    q = qkv[:, :, :, :r, :]
    k = qkv[:, :, :, r, :]
    v = qkv[:, :, :, r + 1, :]
    q = regularise(q, cfg.qk_norm, p.get("q_norm"), cfg.norm_eps)
    k = regularise(k, cfg.qk_norm, p.get("k_norm"), cfg.norm_eps)
    inv = inv_frequencies(
        d_h,
        cfg.rope_base,
        cfg.rope_scaling,
        cfg.rope_scaling_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_context,
    )
    q, k = rope(q, positions, inv), rope(k, positions, inv)
    heads = []
    for head in range(h):
        gi, ri = divmod(head, r)  # query head h uses key/value group h // R
        logits = cfg.softmax_scale * np.einsum("btd,bsd->bts", q[:, :, gi, ri], k[:, :, gi])
        mask = np.tril(np.ones((t, t), bool))
        logits = np.where(mask, logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        heads.append(np.einsum("bts,bsd->btd", probs, v[:, :, gi]))
    o = np.stack(heads, axis=2).reshape(b, t, g, r, d_h)
    return np.einsum("btgrk,grkd->btd", o, p["wo"]["kernel"])


def ffn(x, p, cfg):
    act = cfg.ffn_activation
    wi = p["wi"]["kernel"]
    wo = p["wo"]["kernel"]
    if act in ("swiglu", "smooth_swiglu"):
        a = np.einsum("btd,df->btf", x, wi[:, 0])
        u = np.einsum("btd,df->btf", x, wi[:, 1])
        h = silu(a) * u
        if act == "smooth_swiglu":
            s = np.max(np.abs(a), axis=-1, keepdims=True)
            return ((h / s) @ wo) * s
        return h @ wo
    pre = x @ wi
    if act == "gelu":
        return gelu(pre) @ wo
    xp = p["xielu"]
    return xielu(pre, xp["alpha_p_raw"], xp["alpha_n_raw"], cfg.xielu_beta, cfg.xielu_eps) @ wo


def post(y, cfg, p):
    if cfg.post_norm == "none":
        return y
    if cfg.post_norm == "rms":
        return rmsnorm(y, p["scale"], cfg.norm_eps)
    return y * p["scale"]  # layerscale


def block(x, p, cfg, positions):
    pre = (lambda z, name: rmsnorm(z, p[name]["scale"], cfg.norm_eps)) if cfg.pre_norm else None
    a_in = pre(x, "attn_pre_norm") if pre else x
    x = x + post(attention(a_in, p["attn"], cfg, positions), cfg, p.get("attn_post_norm"))
    m_in = pre(x, "mlp_pre_norm") if pre else x
    return x + post(ffn(m_in, p["mlp"], cfg), cfg, p.get("mlp_post_norm"))


def layer_params(params, i):
    """Parameters of layer i from a scanned (stacked) tree, as float64 NumPy."""

    def take(tree):
        return {
            k: take(v) if isinstance(v, dict) else np.asarray(v, np.float64)[i]
            for k, v in tree.items()
        }

    return take(params["layers"])


def forward(params, cfg, tokens):
    """Logits [B, T, V] float64 of the whole model."""
    emb = np.asarray(params["embedding"], np.float64)
    x = emb[tokens] * cfg.input_scale
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.float64), tokens.shape)
    for i in range(cfg.num_layers):
        x = block(x, layer_params(params, i), cfg, positions)
    if cfg.final_norm:
        x = rmsnorm(x, np.asarray(params["final_norm"]["scale"], np.float64), cfg.norm_eps)
    head = emb.T if cfg.tie_embeddings else np.asarray(params["lm_head"], np.float64)
    return x @ head
