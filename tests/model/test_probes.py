"""Kurtosis probes against NumPy, both forms, and their place in the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.params import filled_params

from fogjax import config_lib
from fogjax.model import build_model
from fogjax.model.probes import PROBE_TENSORS, kurtosis


def numpy_kurtosis(x, form):
    x = np.asarray(x, np.float64).reshape(x.shape[0], x.shape[1], -1)
    if form == "token":
        per = [np.mean(t**4) / np.mean(t**2) ** 2 for seq in x for t in seq]
    else:
        per = [np.mean(seq**4) / np.mean(seq**2) ** 2 for seq in x]
    return float(np.mean(per))


@pytest.mark.parametrize("form", ["token", "sequence"])
def test_kurtosis_matches_numpy_on_outliers(form):
    x = np.random.default_rng(0).standard_normal((3, 5, 4, 8)).astype(np.float32)
    x[:, :, 1, 3] *= 30.0  # one outlier channel
    x[0, 2] *= 0.01  # tokens of very different scale separate the two forms
    got = float(kurtosis(jnp.asarray(x), form))
    assert got == pytest.approx(numpy_kurtosis(x, form), rel=1e-5)
    assert got > 10


def test_forms_differ_and_gaussian_gives_three():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((4, 256, 512)).astype(np.float32)
    for form in ("token", "sequence"):
        assert float(kurtosis(jnp.asarray(g), form)) == pytest.approx(3.0, abs=0.05)
    scaled = g * rng.uniform(0.1, 10, size=(4, 256, 1)).astype(np.float32)
    # Per-token kurtosis ignores per-token scale; per-sequence kurtosis sees the mixture.
    assert float(kurtosis(jnp.asarray(scaled), "token")) == pytest.approx(3.0, abs=0.05)
    assert float(kurtosis(jnp.asarray(scaled), "sequence")) > 4.0


def test_probes_only_when_asked_and_per_layer():
    cfg = config_lib.get_config("fog_flash", "tiny")
    with cfg.unlocked():
        cfg.precision.recipe = "bf16"
    model = build_model(cfg)
    tokens = jnp.ones((2, 16), jnp.int32)
    # A training state holds only params (and fp8); any values do (filled, not an init to compile).
    variables = {"params": filled_params(model, tokens.shape)}
    plain = jax.jit(lambda v: model.apply(v, tokens)).lower(variables).as_text()
    probed_fn = jax.jit(lambda v: model.apply(v, tokens, mutable=["probes"]))
    probed = probed_fn.lower(variables).as_text()
    # No probe reductions are traced without the probes collection: smaller program.
    assert len(plain) < len(probed)
    _, state = probed_fn(variables)
    layers = state["probes"]["layers"]
    found = {
        **layers["attn"],
        **layers["mlp"],
        **{k: v for k, v in layers.items() if k == "block_out"},
    }
    assert set(found) == set(PROBE_TENSORS)
    for stats in found.values():
        assert stats["kurtosis"].shape == (cfg.model.num_layers,)
        assert np.all(np.asarray(stats["kurtosis"]) >= 1.0)  # mean(x^4) >= mean(x^2)^2
