"""cuDNN's fused FP8 attention arithmetic, re-derived in float32 jnp: a stand-in kernel for CPU.

The real kernels (``jax._src.cudnn.fused_attention_stablehlo``'s FP8 primitives) only run on
Hopper GPUs. This emulation follows cuDNN's documented FP8 flash-attention graph so that the
wrapper in ``fogjax/precision/cudnn_attention.py`` (scales, descales, amaxes, state updates,
sharding) can be tested on CPU; the GPU-marked tests compare it with the real kernel.

Forward (BTNH, causal, GQA: query head n uses key/value head n // (N / G)):
    S  = scale * (q8 . k8^T) * descale_q * descale_k          float32
    P  = softmax(S);  amax_s = max P;  P8 = cast(P * scale_s)
    O  = (P8 . v8) * descale_s * descale_v;  amax_o = max|O|;  O8 = cast(O * scale_o)
Backward:
    dO = do8 * descale_dO;  dV = (P8^T . dO) * descale_s           amax_dV, cast(dV * scale_dV)
    dP = dO . (v8 * descale_v)^T;  dS = P * (dP - rowsum(dO * O8 * descale_o))
    amax_dP = max|dS|;  dS8 = cast(dS * scale_dP);  dS' = dS8 * descale_dP
    dQ = scale * dS' . k8 * descale_k;  dK = scale * dS'^T . q8 * descale_q   (amaxes, casts)
Casts saturate to E4M3 (+-448), as cuDNN's do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fogjax.precision.formats import E4M3, saturating_cast

F32 = jnp.float32


def _scalar(x):
    return jnp.reshape(x, ()).astype(F32)


def _repeat_kv(x, n_heads):
    return jnp.repeat(x.astype(F32), n_heads // x.shape[2], axis=2)


def _sum_groups(x, kv_heads):
    b, s, n, h = x.shape
    return x.reshape(b, s, kv_heads, n // kv_heads, h).sum(axis=3)


def _amax(x):
    return jnp.max(jnp.abs(x)).astype(F32).reshape(1, 1, 1, 1)


def _logits(q8, k8, descale_q, descale_k, scale):
    n, t, s = q8.shape[2], q8.shape[1], k8.shape[1]
    logits = jnp.einsum("btnh,bsnh->bnts", q8.astype(F32), _repeat_kv(k8, n))
    logits = logits * (_scalar(descale_q) * _scalar(descale_k) * scale)
    causal = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    return jnp.where(causal, logits, -1e30)


def forward(q8, k8, v8, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, *, scale):
    logits = _logits(q8, k8, descale_q, descale_k, scale)
    probs = jax.nn.softmax(logits, axis=-1)
    p8 = saturating_cast(probs * _scalar(scale_s), E4M3)
    out = jnp.einsum("bnts,bsnh->btnh", p8.astype(F32), _repeat_kv(v8, q8.shape[2]))
    out = out * (_scalar(descale_s) * _scalar(descale_v))
    o8 = saturating_cast(out * _scalar(scale_o), E4M3)
    stats = jax.nn.logsumexp(logits, axis=-1)  # [B, N, T]
    return o8, _amax(probs), _amax(out), stats


def backward(
    q8,
    k8,
    v8,
    o8,
    do8,
    stats,
    descale_q,
    descale_k,
    descale_v,
    descale_o,
    descale_do,
    descale_s,
    descale_dp,
    scale_s,
    scale_dq,
    scale_dk,
    scale_dv,
    scale_dp,
    *,
    scale,
):
    n, g = q8.shape[2], k8.shape[2]
    logits = _logits(q8, k8, descale_q, descale_k, scale)
    probs = jnp.exp(logits - stats[..., None])
    p8 = saturating_cast(probs * _scalar(scale_s), E4M3).astype(F32) * _scalar(descale_s)
    d_out = do8.astype(F32) * _scalar(descale_do)
    dv = _sum_groups(jnp.einsum("bnts,btnh->bsnh", p8, d_out), g)
    dp = jnp.einsum("btnh,bsnh->bnts", d_out, _repeat_kv(v8, n) * _scalar(descale_v))
    delta = jnp.einsum("btnh,btnh->bnt", d_out, o8.astype(F32) * _scalar(descale_o))
    ds = probs * (dp - delta[..., None])
    ds8 = saturating_cast(ds * _scalar(scale_dp), E4M3).astype(F32) * _scalar(descale_dp)
    dq = jnp.einsum("bnts,bsnh->btnh", ds8, _repeat_kv(k8, n) * _scalar(descale_k)) * scale
    dk = jnp.einsum("bnts,btnh->bsnh", ds8, q8.astype(F32) * _scalar(descale_q)) * scale
    dk = _sum_groups(dk, g)
    return (
        saturating_cast(dq * _scalar(scale_dq), E4M3),
        saturating_cast(dk * _scalar(scale_dk), E4M3),
        saturating_cast(dv * _scalar(scale_dv), E4M3),
        _amax(dq),
        _amax(dk),
        _amax(dv),
        _amax(ds),
    )
