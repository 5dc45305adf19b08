"""data.document_mask: attention stays inside each document of a window (segment ids from EOS).

A window holding two documents gives the second the logits it has alone (float32, XLA
attention); without the mask they differ; the cuDNN attention is refused at start-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.params import filled_params
from test_model import F32, small_config

from fogjax.model import build_model, document_eos_id
from fogjax.model.transformer import Transformer, segment_ids

EOS = 0


def test_segment_ids_count_the_eos_before_each_token():
    tokens = jnp.array([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 1, 2, 3, 4, 5, 6]])
    assert segment_ids(tokens, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_second_document_sees_only_itself():
    cfg = small_config("fog_flash")  # The default model: post-norm, tanh QK regulariser.
    with cfg.unlocked():
        cfg.data.document_mask, cfg.data.eos_id = True, EOS
    masked = build_model(cfg, F32)
    assert masked.document_eos_id == EOS
    plain = Transformer(masked.cfg, F32, document_eos_id=None)
    rng = np.random.default_rng(0)
    first = rng.integers(1, 53, 9).tolist() + [EOS]
    second = rng.integers(1, 53, 14).tolist()
    window = jnp.array([first + second])
    params = {"params": filled_params(masked, window.shape)}  # any values do
    masked_fn, plain_fn = jax.jit(masked.apply), jax.jit(plain.apply)
    alone = masked_fn(params, jnp.array([second]))[0]
    with_mask, without = masked_fn(params, window)[0], plain_fn(params, window)[0]
    np.testing.assert_allclose(with_mask[len(first) :], alone, rtol=2e-5, atol=2e-5)
    # The first document is unchanged by the mask (it sees nothing after itself anyway)...
    np.testing.assert_allclose(with_mask[: len(first)], without[: len(first)], rtol=1e-6, atol=1e-6)
    # ...and without it the second document attends to the first.
    assert np.abs(np.asarray(without[len(first) :]) - np.asarray(alone)).max() > 1e-2


def test_cudnn_attention_and_a_missing_eos_are_refused():
    cfg = small_config("llama3")
    assert document_eos_id(cfg) is None  # Off by default.
    with cfg.unlocked():
        cfg.data.document_mask = True
    with pytest.raises(ValueError, match="needs data.eos_id"):
        document_eos_id(cfg)
    with cfg.unlocked():
        cfg.data.eos_id = 3
        cfg.model.attention_impl = "cudnn"
    with pytest.raises(ValueError, match="attention_impl='xla'.*take no segment ids"):
        document_eos_id(cfg)
