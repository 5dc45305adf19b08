"""KV-cache decoding: prefill + one-token steps give the full forward pass's logits, every arch and
recipe; the cache leaves the FP8 state alone; sampling filters; same seed, same tokens."""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO_ROOT

from fogjax import config_lib, sharding
from fogjax.inference.decoding import (
    Decoder,
    PromptTooLongError,
    Sampling,
    bucket_length,
    cached_forward,
    decoding_model,
    init_cache,
    sample_tokens,
)
from fogjax.model import build_model
from fogjax.precision.registry import make_recipe

CACHE, TOTAL, PREFILL = 16, 12, 6
# Row 1's prompt is shorter than the prefill width: its padding slots must be overwritten.
LENGTHS = np.array([PREFILL, 3])
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_config(arch: str, recipe: str):
    cfg = config_lib.get_config(arch, "tiny")
    m = cfg.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.vocab_size = 2, 64, 2, 1, 256
    m.ffn_dim = 192
    cfg.precision.recipe = recipe
    return cfg


def trained_like_variables(model, seed: int = 0) -> dict:
    """Random variables of ``model``'s shapes, filled in NumPy (no init to compile): matrices
    N(0, 0.02^2) plus a 0.05 perturbation, gains and scalars 0.6 + N(0, 0.1^2); under FP8,
    delayed scales that are not 1 (scale_inv 2**-4: values up to 28 representable, larger ones
    saturate), as in a trained checkpoint."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(path[-1])
        if "scale_inv" in name:
            return np.full(s.shape, 2.0**-4, s.dtype)
        if "history" in name:
            return np.zeros(s.shape, s.dtype)
        if any(k in name for k in ("kernel", "embedding", "lm_head")):
            return (0.07 * rng.standard_normal(s.shape)).astype(s.dtype)
        return (0.6 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    return {c: jax.tree_util.tree_map_with_path(fill, tree) for c, tree in shapes.items()}


def cached_logits(cfg, variables, tokens):
    """Logits of row r at positions [0, TOTAL): a prefill of PREFILL columns (row 1 holds only
    LENGTHS[1] real tokens, then garbage), then one token per step from each row's own length."""
    model = decoding_model(cfg.model, make_recipe(cfg.precision), CACHE)
    cache = init_cache(model, tokens.shape[0])
    rows = jnp.arange(tokens.shape[0])
    prompt = jnp.where(jnp.arange(PREFILL) < LENGTHS[:, None], tokens[:, :PREFILL], 7)
    positions = jnp.broadcast_to(jnp.arange(PREFILL), prompt.shape)
    first, cache = cached_forward(model, variables, cache, prompt, positions)

    def step(cache, i):
        pos = jnp.asarray(LENGTHS) + i
        logits, cache = cached_forward(
            model, variables, cache, tokens[rows, pos][:, None], pos[:, None]
        )
        return cache, logits[:, 0]

    steps = TOTAL - LENGTHS.min()
    cache, per_step = jax.lax.scan(step, cache, jnp.arange(steps))
    return first, jnp.swapaxes(per_step, 0, 1), cache


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["bf16", "fp8dpa"])
@pytest.mark.parametrize("arch", config_lib.ARCHS)
def test_cached_decoding_matches_full_forward(arch, recipe):
    cfg = tiny_config(arch, recipe)
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, TOTAL), 0, cfg.model.vocab_size)

    variables = trained_like_variables(model)

    def both(variables, tokens):
        return model.apply(variables, tokens), cached_logits(cfg, variables, tokens)

    # One compilation per case, at XLA's lowest backend optimisation level: both sides of the
    # comparison are in it, and it compiles three times faster.
    compiled = jax.jit(both).lower(variables, tokens).compile(FAST_COMPILE)
    full, (first, per_step, cache) = jax.device_get(compiled(variables, tokens))
    scale = np.abs(full).max()
    got, want = [], []
    for r, n in enumerate(LENGTHS):
        got += [first[r, :n], per_step[r, : TOTAL - n]]
        want += [full[r, :n], full[r, n:]]
    got, want = np.concatenate(got), np.concatenate(want)
    assert got.shape == (2 * TOTAL, cfg.model.vocab_size)
    # Same arithmetic up to the order of float32 sums over masked (exactly zero) slots.
    np.testing.assert_allclose(got, want, atol=2e-2 * scale, rtol=0)
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.9
    # Stacked per layer like the params: [L, B, S, G, d_h].
    key = cache["layers"]["attn"]["key"]
    assert key.shape == (2, 2, CACHE, 1, 32)
    # Slots past each row's last position (row 0 stepped on to 14, row 1 to 11) stay zero.
    key = np.asarray(key, np.float32)
    assert np.all(key[:, 0, 15:] == 0) and np.all(key[:, 1, TOTAL:] == 0)
    assert np.all(np.any(key[:, 1, :TOTAL] != 0, axis=(-2, -1)))


def test_decoding_never_writes_the_fp8_state():
    cfg = tiny_config("fog_flash", "fp8dpa")
    model = decoding_model(cfg.model, make_recipe(cfg.precision), CACHE)
    tokens = jnp.arange(1, 5)[None]

    variables = trained_like_variables(build_model(cfg))

    @jax.jit
    def decode_with_fp8_mutable(variables, tokens):
        cache = init_cache(model, 1)
        _, mutated = model.apply(
            {**variables, "cache": cache}, tokens, tokens - 1, mutable=["cache", "fp8"]
        )
        return variables["fp8"], mutated["fp8"]

    before, after = decode_with_fp8_mutable(variables, tokens)
    # Even allowed to, decoding leaves every amax history and scale bit for bit as it was.
    leaves = jax.tree.leaves(before)
    assert leaves and any(np.any(np.asarray(x) != 1) for x in leaves)
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_sampling_filters_against_numpy():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    rng = jax.random.key(0)

    sample = jax.jit(sample_tokens)  # One compilation for every setting.

    def freq(s):
        picks = np.asarray(sample(logits, rng, *s.as_arrays()))
        return np.bincount(picks, minlength=4) / len(picks)

    assert np.all(freq(Sampling()) == [1, 0, 0, 0])
    np.testing.assert_allclose(freq(Sampling(1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(freq(Sampling(1.0, top_k=2)), [0.625, 0.375, 0, 0], atol=0.03)
    # top_p=0.7: {0.5, 0.3} is the smallest set reaching 0.7.
    np.testing.assert_allclose(freq(Sampling(1.0, top_p=0.7)), [0.625, 0.375, 0, 0], atol=0.03)
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(freq(Sampling(0.5)), p / p.sum(), atol=0.03)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_bucket_length():
    assert [bucket_length(n, 128) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 128]


@pytest.fixture(scope="module")
def decoder():
    cfg = tiny_config("llama3", "bf16")
    variables = trained_like_variables(build_model(cfg))
    mesh = sharding.make_mesh(cfg.mesh)
    return Decoder(cfg.model, make_recipe(cfg.precision), variables, 32, mesh), cfg, variables


@pytest.mark.slow
def test_decoder_generate_greedy_is_argmax_of_full_forward(decoder):
    dec, cfg, variables = decoder
    prompts = [[5, 6, 7], [9, 1, 2, 3, 4]]  # Different lengths: row 0's padding gets overwritten.
    out = dec.generate(prompts, max_new_tokens=6)
    # Teacher-forced full forward passes over prompt + generated tokens (padded to one shape).
    seqs = np.zeros((2, 16), np.int32)
    for i, (p, new) in enumerate(zip(prompts, out, strict=True)):
        assert len(new) == 6
        seqs[i, : len(p) + 6] = p + new
    logits = np.asarray(jax.jit(build_model(cfg).apply)(variables, seqs), np.float64)
    for i, p in enumerate(prompts):
        rows = logits[i, len(p) - 1 : len(p) + 5]
        chosen = rows[np.arange(6), out[i]]
        # Each token is the argmax, up to bf16 ties between the two computations.
        np.testing.assert_allclose(chosen, rows.max(-1), atol=1e-2 * np.abs(rows).max())
        assert np.mean(rows.argmax(-1) == out[i]) >= 0.8


def test_decoder_seed_and_stop(decoder):
    dec, _, _ = decoder
    s = Sampling(temperature=1.0, top_k=50)
    prompts = [[1, 2, 3], [1, 2, 3]]  # The greedy test's shapes: no new compilation.
    a = dec.generate(prompts, 6, s, seed=3)
    assert a == dec.generate(prompts, 6, s, seed=3)
    assert a != dec.generate(prompts, 6, s, seed=4)
    assert a[0] != a[1]  # Rows draw different samples.
    stopped = dec.generate(prompts, 6, s, seed=3, stop=lambda row, toks: len(toks) == 2)
    assert stopped == [row[:2] for row in a]
    with pytest.raises(PromptTooLongError, match="context of 32"):
        dec.generate([list(range(30))], 3)


@pytest.mark.slow
def test_fogjax_never_imports_lm_eval():
    code = (
        "import sys, fogjax.evaluate, fogjax.evaluate.__main__, fogjax.evaluate.loss, "
        "fogjax.generate, fogjax.inference.load, fogjax.inference.decoding, fogjax.train.loop; "
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    root = str(REPO_ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
