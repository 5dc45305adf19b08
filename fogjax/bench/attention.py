"""Attention alone: TFLOP/s of each (implementation, recipe) at a config's shapes.

    python -m fogjax.bench --config=configs/fog_flash.py:1.5b \
        --attention=xla:bf16,cudnn:bf16,xla:fp8dpa,cudnn:fp8dpa

The brief's "FP8 attention at 1 PFLOP/s" is a kernel number, which the full train step hides
behind the GEMMs of the linears; this measures causal GQA attention by itself, through the model's
own attention functions (fogjax/model/attention.py) with the recipe's FP8 state, at the config's
``train.batch_size`` x ``train.seq_len`` and ``model.num_heads`` / ``num_kv_heads`` / head dim.

Per variant: the forward alone and forward + backward (gradients of q, k, v and the FP8 state), each
compiled, warmed up and timed (median). FLOPs are the causal model FLOPs, no recomputation counted:
forward 2 GEMMs = 2 B N T^2 d_h (half of 4 B N T^2 d_h), forward + backward 6 B N T^2 d_h.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fogjax.bench import hlo_stats, text_table
from fogjax.model.attention import ATTENTION_FUNCTIONS, ATTENTION_IMPLS
from fogjax.precision.cudnn_attention import require_cudnn_attention
from fogjax.precision.recipe import Recipe
from fogjax.precision.registry import make_recipe

FIELDS = (
    "label",  # 'impl:recipe'
    "impl",
    "recipe",
    "status",
    "error",
    "shape",  # {'batch', 'seq_len', 'num_heads', 'num_kv_heads', 'head_dim'}
    "fwd_ms",
    "fwd_tflops",  # 2 B N T^2 d / forward time / 1e12
    "train_ms",
    "train_tflops",  # 6 B N T^2 d / forward+backward time / 1e12
    "cudnn_attention_calls",  # in the optimized forward+backward HLO
    "cudnn_fp8_attention_calls",
    "fp8_gemm_custom_calls",  # cuBLASLt FP8 GEMMs (the einsum path on GPU)
    "fp8_dots_hlo",  # FP8 dot_generals left in the optimized HLO (CPU keeps none: it emulates)
)


class AttentionOnly(nn.Module):
    """The model's attention core: q [B,T,G,R,d], k and v [B,T,G,d] -> [B,T,G,R,d]."""

    impl: str
    recipe: Recipe
    scale: float

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return ATTENTION_FUNCTIONS[self.impl](q, k, v, self.scale, self.recipe)


def parse_variants(spec: str) -> list[tuple[str, str]]:
    """``'xla:bf16,cudnn:fp8dpa'`` -> ``[('xla', 'bf16'), ('cudnn', 'fp8dpa')]``."""
    variants = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        impl, _, recipe = item.partition(":")
        if impl not in ATTENTION_IMPLS or not recipe:
            raise ValueError(
                f"--attention entry {item!r} must be impl:recipe with impl one of "
                f"{ATTENTION_IMPLS}, e.g. cudnn:fp8dpa."
            )
        variants.append((impl, recipe))
    if not variants:
        raise ValueError("--attention needs at least one impl:recipe, e.g. cudnn:fp8dpa.")
    return variants


def attention_flops(batch: int, seq_len: int, num_heads: int, head_dim: int) -> tuple[int, int]:
    """(forward, forward + backward) causal model FLOPs of one attention call."""
    forward = 2 * batch * num_heads * seq_len * seq_len * head_dim
    return forward, 3 * forward


def _shape(config: ml_collections.ConfigDict) -> dict[str, int]:
    m, t = config.model, config.train
    return {
        "batch": t.batch_size,
        "seq_len": t.seq_len,
        "num_heads": m.num_heads,
        "num_kv_heads": m.num_kv_heads,
        "head_dim": m.d_model // m.num_heads,
    }


def _time(fn: Any, args: tuple, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_variant(
    config: ml_collections.ConfigDict, impl: str, recipe_name: str, steps: int, warmup: int
) -> dict[str, Any]:
    """One row: the variant timed, or its error."""
    shape = _shape(config)
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(label=f"{impl}:{recipe_name}", impl=impl, recipe=recipe_name, shape=shape)
    try:
        precision = ml_collections.ConfigDict(config.precision.to_dict())
        precision.recipe = recipe_name
        recipe = make_recipe(precision)
        b, t, n, g, d = (
            shape[k] for k in ("batch", "seq_len", "num_heads", "num_kv_heads", "head_dim")
        )
        recipe.check_attention_impl(impl)  # e.g. no cuDNN FP8 attention under fp8dpa_current
        if impl == "cudnn":
            require_cudnn_attention(recipe.quantizes_attention, d, t)
        dtype = recipe.compute_dtype
        keys = jax.random.split(jax.random.key(config.seed), 4)
        q = jax.random.normal(keys[0], (b, t, g, n // g, d), dtype)
        k = jax.random.normal(keys[1], (b, t, g, d), dtype)
        v = jax.random.normal(keys[2], (b, t, g, d), dtype)
        cotangent = jax.random.normal(keys[3], q.shape, dtype)
        module = AttentionOnly(impl, recipe, config.model.softmax_scale)
        fp8 = module.init(jax.random.key(0), q, k, v).get("fp8", {})

        def forward(fp8, q, k, v):
            return module.apply({"fp8": fp8} if fp8 else {}, q, k, v)

        def loss(fp8, q, k, v):
            return jnp.sum(forward(fp8, q, k, v).astype(jnp.float32) * cotangent)

        train = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        compiled = train.lower(fp8, q, k, v).compile()
        optimized = compiled.as_text()
        row.update(
            cudnn_attention_calls=hlo_stats.count_cudnn_attention_calls(optimized),
            cudnn_fp8_attention_calls=hlo_stats.count_cudnn_fp8_attention_calls(optimized),
            fp8_gemm_custom_calls=hlo_stats.count_fp8_gemm_custom_calls(optimized),
            fp8_dots_hlo=hlo_stats.count_fp8_dots(optimized),
        )
        fwd_flops, train_flops = attention_flops(b, t, n, d)
        fwd_s = _time(jax.jit(forward), (fp8, q, k, v), steps, warmup)
        row.update(fwd_ms=1e3 * fwd_s, fwd_tflops=fwd_flops / fwd_s / 1e12)
        train_s = _time(compiled, (fp8, q, k, v), steps, warmup)
        row.update(train_ms=1e3 * train_s, train_tflops=train_flops / train_s / 1e12)
        row["status"] = "ok"
    except Exception as e:  # a variant this machine cannot run is a row with its error
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table, failed rows' errors on their own lines below it."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = ("variant", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "cudnn f8/all")
    cells = [
        (
            r["label"],
            fmt(r["fwd_ms"], ".3f"),
            fmt(r["fwd_tflops"], ".1f"),
            fmt(r["train_ms"], ".3f"),
            fmt(r["train_tflops"], ".1f"),
            f"{fmt(r['cudnn_fp8_attention_calls'], 'd')}/{fmt(r['cudnn_attention_calls'], 'd')}",
        )
        for r in rows
    ]
    table = text_table.aligned(header, cells)
    return "\n".join([table] + [f"{r['label']}: {r['error']}" for r in rows if r["error"]])
