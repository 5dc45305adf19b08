"""The chunked LM-head cross-entropy (fogjax/train/lm_loss.py) against the full-logits path.

Tolerances. The loss: both paths sum the same float32 per-token losses in a different order, a
relative error below ~n * 2^-24 for n <= 60 tokens, so 1e-5. Gradients in bf16: per element both
paths run the same operations on the same operands (the chunk's logits are the same dot products,
dlogits the same formula rounded once to bf16); what differs is dhead's float32 accumulation order
across chunks before its one rounding to bf16, which can move an element by one bf16 step (2^-7
relative at most), and a float32 last-bit difference can flip one bf16 dlogit by one step, which
changes a dhidden element by far less than that. So 2^-7 relative, plus an absolute floor of 2^-7
of the largest element (elements near zero). In float32 compute: summation order only, 1e-5.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.steps import batch, jit_grads, setup, tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fogjax import config_lib, sharding
from fogjax.precision.bf16_dot import bf16_dot_general
from fogjax.train import lm_loss, preflight

D, V = 64, 512
BF16_RTOL = 2.0**-7
F32_RTOL = 1e-5


def full_loss(hidden, head, targets):
    """The unchunked path: the model's LM head GEMM, then the train step's optax loss."""
    logits = bf16_dot_general(hidden, head, (((2,), (0,)), ((), ())))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def inputs(rows, length, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k[0], (rows, length, D)).astype(dtype)
    head = (0.3 * jax.random.normal(k[1], (D, V))).astype(dtype)
    targets = jax.random.randint(k[2], (rows, length), 0, V)
    return hidden, head, targets


def assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_chunk_plan_balances_the_chunks():
    assert lm_loss.chunk_plan(4, 4096, 8192) == (2048, 2)  # 4 x 2048 tokens per chunk
    assert lm_loss.chunk_plan(1, 20, 7) == (7, 3)  # 21 positions: the last chunk padded by 1
    assert lm_loss.chunk_plan(1, 100, 30) == (25, 4)  # 4 chunks of 25, not 30+30+30+10
    assert lm_loss.chunk_plan(3, 10, 12) == (4, 3)  # 12 positions: padded by 2
    assert lm_loss.chunk_plan(8, 32, 4) == (1, 32)  # at least one position of every row
    assert lm_loss.chunk_plan(2, 16, 10**6) == (16, 1)


@pytest.mark.parametrize(
    "dtype, rows, length, chunk",
    [
        (jnp.bfloat16, 3, 10, 12),  # 4 positions x 3 rows per chunk, the last padded by 2
        (jnp.bfloat16, 1, 20, 7),  # [N, D] as one row; N = 20 not a multiple of 7
        (jnp.bfloat16, 2, 16, 10**6),  # one chunk
        (jnp.float32, 2, 16, 8),
    ],
)
def test_loss_and_gradients_match_the_full_logits(dtype, rows, length, chunk):
    hidden, head, targets = inputs(rows, length, dtype)
    want, (dh_want, dw_want) = jax.jit(jax.value_and_grad(full_loss, (0, 1)))(hidden, head, targets)

    def chunked(hidden, head, targets):
        return lm_loss.chunked_cross_entropy(hidden, head, targets, chunk)

    got, (dh, dw) = jax.jit(jax.value_and_grad(chunked, (0, 1)))(hidden, head, targets)
    assert dh.dtype == dw.dtype == dtype
    np.testing.assert_allclose(float(got), float(want), rtol=F32_RTOL)
    np.testing.assert_allclose(float(jax.jit(chunked)(hidden, head, targets)), float(want), 1e-5)
    rtol = BF16_RTOL if dtype == jnp.bfloat16 else F32_RTOL
    assert_close(dh, dh_want, rtol)
    assert_close(dw, dw_want, rtol)

    # The cotangent is folded in after the fact: a scaled loss (1 / micro_batches) scales both.
    _, (dh2, dw2) = jax.jit(jax.value_and_grad(lambda *a: chunked(*a) / 4, (0, 1)))(
        hidden, head, targets
    )
    np.testing.assert_array_equal(np.asarray(dh2, np.float32), np.asarray(dh, np.float32) / 4)
    np.testing.assert_array_equal(np.asarray(dw2, np.float32), np.asarray(dw, np.float32) / 4)


def test_only_a_chunk_of_logits_is_ever_live():
    shapes = (
        jax.ShapeDtypeStruct((4, 512, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((D, 8192), jnp.bfloat16),
        jax.ShapeDtypeStruct((4, 512), jnp.int32),
    )
    logits_bytes = 4 * 512 * 8192 * 4  # float32 [B, T, V], 64 MiB

    def temp_bytes(fn):
        compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = temp_bytes(full_loss)
    chunked = temp_bytes(lambda h, w, y: lm_loss.chunked_cross_entropy(h, w, y, 256))
    assert full > 2 * logits_bytes  # the logits and their gradient
    assert chunked < logits_bytes / 2, (chunked, full)  # chunks of 256 tokens: 1/8 of the logits


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])  # (data, fsdp, tensor)
def test_sharded_loss_matches_one_device_and_never_gathers_the_batch(shape):
    hidden, head, targets = inputs(8, 12, jnp.float32)

    def grads(hidden, head, targets):
        fn = lambda *a: lm_loss.chunked_cross_entropy(*a, chunk_tokens=8)  # noqa: E731
        return jax.value_and_grad(fn, (0, 1))(hidden, head, targets)

    want = jax.jit(grads)(hidden, head, targets)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)))
    rows = P(sharding.BATCH_MESH_AXES)
    in_shardings = tuple(NamedSharding(mesh, s) for s in (rows, P("fsdp", "tensor"), rows))
    with sharding.sharding_context(mesh):
        step = jax.jit(grads, in_shardings=in_shardings, out_shardings=(None, in_shardings[:2]))
        hlo = step.lower(hidden, head, targets).compile().as_text()
        got = step(hidden, head, targets)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=F32_RTOL)
    for g, w in zip(got[1], want[1], strict=True):
        assert_close(g, w, F32_RTOL)
    # The only all-gather is the head's D over 'fsdp' (FSDP), into [D, V / tensor].
    gathered = set(re.findall(r"= (\S+) all-gather\(", hlo))
    assert gathered <= {f"f32[{D},{V // shape[2]}]{{1,0}}"}, gathered


def test_chunk_tokens_is_validated():
    for bad in (-1, 2.5, True, "8192"):
        with pytest.raises(ValueError, match="train.loss_chunk_tokens=.* non-negative integer"):
            lm_loss.check_chunk_tokens(bad)
    config = config_lib.get_config("fog_flash", "tiny")
    config.train.loss_chunk_tokens = -1
    with pytest.raises(ValueError, match="--config.train.loss_chunk_tokens=8192"):
        preflight.validate_train_config(config)


def _tiny(chunk_tokens):
    return setup(tiny_config("bf16", loss_chunk_tokens=chunk_tokens))


@pytest.mark.slow
def test_train_step_loss_and_gradients_equal_the_unchunked_ones():
    tokens = batch(b=8, t=32)
    full_model, state, _ = _tiny(0)
    model, _, _ = _tiny(64)  # 2 micro-batches of 4 x 32 tokens: 2 chunks of 4 x 16
    assert model.loss_chunk_tokens == 64 and full_model.loss_chunk_tokens == 0
    # The statistics variant with 2 micro-batches: probes and the micro-batch scan go through the
    # chunked loss too.
    want = jit_grads(full_model, 2, True)(state, tokens)
    got = jit_grads(model, 2, True)(state, tokens)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=F32_RTOL)
    # Every parameter's gradient (float32: the bf16 gradients summed over the micro-batches).
    for path, g in jax.tree_util.tree_leaves_with_path(got[1]):
        w = dict(jax.tree_util.tree_leaves_with_path(want[1]))[path]
        assert_close(g, w, BF16_RTOL)
    kurtosis = jax.tree.leaves(got[3]), jax.tree.leaves(want[3])
    for g, w in zip(*kurtosis, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


@pytest.mark.slow
def test_the_chunked_loss_trains_with_a_tied_head_too():
    tokens = [batch(seed=s) for s in range(4)]
    cfg = tiny_config("bf16", loss_chunk_tokens=64)
    cfg.model.tie_embeddings = True  # the head is the embedding, transposed
    _, state, step = setup(cfg)
    assert "lm_head" not in state["params"]
    step = jax.jit(step)
    losses = []
    for i in range(30):
        state, m = step(state, tokens[i % 4])
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < losses[0] - 1.0, (losses[0], losses[-4:])
