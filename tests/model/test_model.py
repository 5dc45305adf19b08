"""Model zoo: equations against a float64 NumPy reference, counts, initialisation, invariances."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import reference_model as ref
from helpers.params import unrolled_init
from ml_collections import FrozenConfigDict

from fogjax import config_lib
from fogjax.model import build_model, weight_decay_mask
from fogjax.model.attention import xla_attention
from fogjax.model.mlp import MLP
from fogjax.model.rope import apply_rope, rope_frequencies
from fogjax.precision.recipe import Recipe

F32 = Recipe(name="f32", compute_dtype=jnp.float32)
PAPER_COUNTS = {"390m": 385.9e6, "1.5b": 1.544e9, "8b": 8.053e9}


def small_config(arch: str, **overrides):
    """A few-thousand-parameter config of ``arch`` with the paper's per-arch choices."""
    cfg = config_lib.get_config(arch, "tiny")
    with cfg.unlocked():
        m = cfg.model
        m.d_model, m.num_heads, m.num_kv_heads, m.num_layers = 64, 4, 2, 2
        m.ffn_dim = 96 if m.ffn_activation in config_lib.GATED_ACTIVATIONS else 144
        m.vocab_size = 53
        m.post_norm_init = 0.7
        m.rope_original_context = 16  # makes the Llama-3.1 rule touch every branch at d_h = 16
        for k, v in overrides.items():
            setattr(m, k, v)
    return cfg


def init_random(model, tokens, seed=0, params=None):
    """Initialises (or takes ``params``), then perturbs every parameter so gains and scalars are
    not trivially 1/0."""
    if params is None:
        params = nn.unbox(model.init(jax.random.key(seed), tokens)["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [
        p + 0.1 * (jnp.abs(p).mean() + 0.1) * jax.random.normal(k, p.shape)
        for p, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


@functools.cache
def random_params(arch: str, **overrides):
    """``init_random`` params of ``small_config(arch, **overrides)``, built once per module and
    shared read-only (they do not depend on the tokens' shape). The init is the unrolled twin's,
    stacked (helpers.params.unrolled_init: ~2 s of eager compiles instead of ~8 s)."""
    cfg = small_config(arch, **overrides)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = unrolled_init(cfg, tokens, recipe=F32)["params"]
    return init_random(build_model(cfg, F32), tokens, params=params)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("arch", config_lib.ARCHS)
@pytest.mark.parametrize("size", ["390m", "1.5b", "8b"])
def test_parameter_counts_match_paper(arch, size):
    from fogjax.accounting import model_info

    info = model_info(config_lib.get_config(arch, size))
    assert info["params_total"] == pytest.approx(PAPER_COUNTS[size], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", config_lib.ARCHS)
def test_forward_matches_float64_reference(arch):
    cfg = small_config(arch)
    model = build_model(cfg, F32)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.model.vocab_size)
    params = random_params(arch)
    logits = model.apply({"params": params}, tokens)
    expected = ref.forward(jax.tree.map(np.asarray, params), cfg.model, np.asarray(tokens))
    assert logits.dtype == jnp.float32
    assert rel_err(logits, expected) < 1e-5


@pytest.mark.slow
def test_unrolled_layers_match_scan():
    cfg = small_config("fog_flash")
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.model.vocab_size)
    scanned = build_model(cfg, F32)
    params = random_params("fog_flash")
    with cfg.unlocked():
        cfg.model.scan_layers = False
    unrolled = build_model(cfg, F32)
    per_layer = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.model.num_layers):
        per_layer[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    np.testing.assert_allclose(
        unrolled.apply({"params": per_layer}, tokens),
        scanned.apply({"params": params}, tokens),
        rtol=1e-6,
        atol=1e-6,
    )


@functools.cache
def _fog_opt_grads(remat):
    """The gradient of a fixed loss of ``small_config("fog_opt", remat=remat)`` (the plain
    model's, remat='none', is computed once for both parametrisations)."""
    cfg = small_config("fog_opt", remat=remat)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.model.vocab_size)
    model = build_model(cfg, F32)
    return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))(
        random_params("fog_opt")
    )


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(remat):
    g_plain = _fog_opt_grads("none")
    g_remat = _fog_opt_grads(remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_smooth_swiglu_per_channel_matches_reference_swiglu():
    cfg = small_config("llama3_smooth_swiglu", smooth_swiglu_per_channel=True)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.model.vocab_size)
    model = build_model(cfg, F32)
    params = random_params("llama3_smooth_swiglu", smooth_swiglu_per_channel=True)
    with cfg.unlocked():
        cfg.model.ffn_activation = "swiglu"  # the reference's plain SwiGLU: exact equivalence
    expected = ref.forward(jax.tree.map(np.asarray, params), cfg.model, np.asarray(tokens))
    assert rel_err(model.apply({"params": params}, tokens), expected) < 1e-5


@pytest.mark.slow
def test_smooth_swiglu_equals_swiglu_in_float64():
    cfg = small_config("llama3_smooth_swiglu")
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 5, 64), jnp.float64) * 3
        f64 = Recipe(name="f64", compute_dtype=jnp.float64)
        smooth = MLP(FrozenConfigDict(cfg.model), f64)
        params = smooth.init(jax.random.key(1), x)
        with cfg.unlocked():
            cfg.model.ffn_activation = "swiglu"
        plain = MLP(FrozenConfigDict(cfg.model), f64)
        y_smooth, y_plain = smooth.apply(params, x), plain.apply(params, x)
        assert y_smooth.dtype == jnp.float64
        # The two really differ in what the down projection sees (the smoothed input).
        _, seen = smooth.apply(params, x, mutable=["probes"])
        _, seen_plain = plain.apply(params, x, mutable=["probes"])
        amax_smooth = seen["probes"]["ffn_act"]["amax"]
        assert not np.isclose(amax_smooth, seen_plain["probes"]["ffn_act"]["amax"], rtol=0.05)
        np.testing.assert_allclose(y_smooth, y_plain, rtol=1e-12, atol=1e-14)


@functools.cache
def _boxed_params_of(arch):
    """The tiny config's freshly initialised (boxed) params, once per module and arch."""
    model = build_model(config_lib.get_config(arch, "tiny"), F32)
    return model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _params_of(arch):
    return config_lib.get_config(arch, "tiny"), nn.unbox(_boxed_params_of(arch))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fog_max", "fog_opt", "fog_flash"])
def test_fog_initialisation(arch):
    cfg, params = _params_of(arch)
    m = cfg.model
    layers = params["layers"]
    for name in ("attn_post_norm", "mlp_post_norm"):
        np.testing.assert_allclose(layers[name]["scale"], 1 / math.sqrt(m.num_layers), rtol=1e-6)
    assert m.input_scale == 50.0
    assert "final_norm" not in params
    assert not m.pre_norm and "attn_pre_norm" not in layers
    if arch == "fog_flash":
        for name in ("q_norm", "k_norm"):
            alpha = layers["attn"][name]["alpha"]
            assert alpha.shape == (m.num_layers,)  # one scalar per layer
            np.testing.assert_allclose(alpha, 0.5)
    else:
        assert "q_norm" not in layers["attn"] and "k_norm" not in layers["attn"]  # frozen
    if arch == "fog_max":
        xp = layers["mlp"]["xielu"]
        np.testing.assert_allclose(jax.nn.softplus(xp["alpha_p_raw"]), 0.8, rtol=1e-6)
        np.testing.assert_allclose(0.5 + jax.nn.softplus(xp["alpha_n_raw"]), 0.8, rtol=1e-6)


@pytest.mark.slow
def test_tanh_alpha_is_trainable():
    cfg = small_config("fog_flash")
    model = build_model(cfg, F32)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.model.vocab_size)
    params = random_params("fog_flash")
    grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))(params)
    assert np.all(np.abs(grads["layers"]["attn"]["q_norm"]["alpha"]) > 0)
    assert np.all(np.abs(grads["layers"]["attn"]["k_norm"]["alpha"]) > 0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["op", "olmo2", "llama3"])
def test_baseline_initialisation(arch):
    cfg, params = _params_of(arch)
    m, layers = cfg.model, params["layers"]
    if arch == "op":
        assert m.input_scale == 50.0 and "final_norm" not in params
        np.testing.assert_allclose(layers["attn_post_norm"]["scale"], 1 / math.sqrt(m.num_layers))
        assert layers["attn"]["q_norm"]["scale"].shape == (m.num_layers, m.d_model // m.num_heads)
    if arch == "olmo2":
        np.testing.assert_allclose(layers["mlp_post_norm"]["scale"], 1.0)
        assert "final_norm" in params
    if arch == "llama3":
        assert m.input_scale == 1.0 and "attn_post_norm" not in layers
        np.testing.assert_allclose(layers["attn_pre_norm"]["scale"], 1.0)


def test_matrix_init_std():
    cfg, params = _params_of("llama3")
    m = cfg.model
    out_std = 0.02 / math.sqrt(2 * m.num_layers)
    checks = {
        "embedding": (params["embedding"], 0.02),
        "lm_head": (params["lm_head"], 0.02),
        "wqkv": (params["layers"]["attn"]["wqkv"]["kernel"], 0.02),
        "wi": (params["layers"]["mlp"]["wi"]["kernel"], 0.02),
        "attn_out": (params["layers"]["attn"]["wo"]["kernel"], out_std),
        "mlp_out": (params["layers"]["mlp"]["wo"]["kernel"], out_std),
    }
    for name, (w, std) in checks.items():
        w = np.asarray(w, np.float64)
        # The sample std of n normals has relative standard error ~ 1/sqrt(2n); allow 5 of those.
        tol = 5 / math.sqrt(2 * w.size)
        assert abs(w.std() / std - 1) < tol, name
        assert abs(w.mean()) < 5 * std / math.sqrt(w.size), name


@pytest.mark.slow
def test_tied_embeddings_have_no_separate_head():
    cfg = small_config("fog_opt", tie_embeddings=True)
    model = build_model(cfg, F32)
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, cfg.model.vocab_size)
    params = random_params("fog_opt", tie_embeddings=True)
    assert "lm_head" not in params
    expected = ref.forward(jax.tree.map(np.asarray, params), cfg.model, np.asarray(tokens))
    assert rel_err(model.apply({"params": params}, tokens), expected) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama3", "fog_flash"])
def test_causality(arch):
    cfg = small_config(arch)
    model = build_model(cfg, F32)
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.model.vocab_size)
    params = random_params(arch)
    changed = tokens.at[0, 6:].set((tokens[0, 6:] + 7) % cfg.model.vocab_size)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(a[0, :6], b[0, :6])
    assert not np.allclose(a[0, 6:], b[0, 6:])


@pytest.mark.slow
def test_gqa_matches_repeat_kv():
    b, t, g, r, d = 2, 7, 2, 3, 8
    # NumPy draws: each new shape of jax.random.normal is one more eager compile (~1.5 s).
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((b, t, g, r, d), (b, t, g, d), (b, t, g, d))
    )
    grouped = xla_attention(q, k, v, 0.3, F32)
    # Multi-head reference: one group per query head, K and V repeated R times (head h -> h // R).
    k_rep = jnp.repeat(k, r, axis=2)
    v_rep = jnp.repeat(v, r, axis=2)
    mha = xla_attention(q.reshape(b, t, g * r, 1, d), k_rep, v_rep, 0.3, F32)
    np.testing.assert_allclose(grouped.reshape(b, t, g * r, d), mha[:, :, :, 0], rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    inv = rope_frequencies(16, 500_000.0, scaling=True)
    keys = jax.random.split(jax.random.key(0), 2)
    q = jax.random.normal(keys[0], (1, 1, 16))
    k = jax.random.normal(keys[1], (1, 1, 16))

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), inv)
        kn = apply_rope(k, jnp.array([[n]]), inv)
        return float(jnp.sum(qm * kn))

    base = score(5, 2)
    for shift in (1, 17, 300):
        assert score(5 + shift, 2 + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(9, 2), rel=1e-3)


def test_weight_decay_mask_by_role():
    _, params = _params_of("fog_flash")
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    assert "['embedding']" in decayed and "['lm_head']" in decayed
    assert "['layers']['attn']['wqkv']['kernel']" in decayed
    assert "['layers']['mlp']['wo']['kernel']" in decayed
    assert not flat["['layers']['attn_post_norm']['scale']"]  # stacked [L, D] but 1-D per layer
    assert not flat["['layers']['attn']['q_norm']['alpha']"]
    _, params = _params_of("fog_max")
    mask = weight_decay_mask(params)
    assert not mask["layers"]["mlp"]["xielu"]["alpha_p_raw"]


def test_weight_decay_mask_on_boxed_params():
    boxed = _boxed_params_of("fog_flash")
    mask = nn.unbox(weight_decay_mask(boxed))
    assert mask["layers"]["attn"]["wqkv"]["kernel"] and mask["embedding"]
    assert not mask["layers"]["attn_post_norm"]["scale"]
