"""The scanned block saves its small float32 residuals as one array per layer
(fogjax/model/packed_residuals.py): the step's gradients and observed amaxes are the same bits as
the plain block's, and the layer scan writes one packed residual instead of one [5] per FP8 dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.steps import batch, setup, tiny_config
from test_packed_scales import _layer_scan_shapes

from fogjax.model import packed_residuals
from fogjax.model.blocks import Block
from fogjax.train.step import compute_grads


def test_pack_and_unpack_restore_every_leaf_in_order():
    leaves = [
        jnp.arange(3, dtype=jnp.float32),
        jnp.ones((2, 4), jnp.bfloat16),  # not float32: kept apart
        jnp.full((1,), 7.0, jnp.float32),
        jnp.zeros((packed_residuals.MAX_PACKED_SIZE + 1,), jnp.float32),  # too large
        jnp.float32(2.5),
    ]
    vector, matrix, rest, shapes = packed_residuals.pack(leaves)
    assert vector.shape == (5,) and vector.dtype == jnp.float32 and matrix is None
    assert len(rest) == 2
    assert shapes == (("vector", (3,)), None, ("vector", (1,)), None, ("vector", ()))
    back = packed_residuals.unpack(vector, matrix, rest, shapes)
    for a, b in zip(back, leaves, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert packed_residuals.pack([jnp.ones((9, 9))])[0] is None


def test_per_device_amaxes_go_into_their_own_matrix():
    """Under FSDP (D devices) the [D, k] per-device amaxes are concatenated along k, apart from
    the replicated vector; a [D, k] that is not float32, or a [k, D], stays where it was."""
    d = 4
    leaves = [
        jnp.arange(8, dtype=jnp.float32).reshape(d, 2),
        jnp.full((1,), 7.0, jnp.float32),
        jnp.arange(4, dtype=jnp.float32).reshape(d, 1) + 10,
        jnp.ones((d, 1), jnp.bfloat16),  # not float32: kept apart
        jnp.ones((2, d), jnp.float32),  # not [D, k]: into the vector
    ]
    vector, matrix, rest, shapes = packed_residuals.pack(leaves, devices=d)
    assert matrix.shape == (d, 3) and vector.shape == (1 + 2 * d,) and len(rest) == 1
    np.testing.assert_array_equal(matrix[:, 2], [10, 11, 12, 13])
    back = packed_residuals.unpack(vector, matrix, rest, shapes)
    for a, b in zip(back, leaves, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # One device: no per-device amaxes; every small float32 goes into the vector.
    assert packed_residuals.pack(leaves)[1] is None


CASES = [
    # recipe, micro-batches, kurtosis probes on, model.remat
    ("fp8dpa", 1, False, "none"),
    ("fp8dpa", 2, True, "none"),
    ("fp8_current", 1, False, "none"),
]


@pytest.mark.parametrize("recipe,micro_batches,with_stats,remat", CASES)
def test_the_step_saves_one_packed_residual_and_gets_the_same_bits(
    monkeypatch, recipe, micro_batches, with_stats, remat
):
    """2 layers. The loss, gradients, observed amaxes and probe outputs of the step equal the plain
    block's bit for bit. fp8dpa with FP8 attention einsums has six delayed-scaled dots per layer,
    each saving a float32 [5]: with one micro-batch (every scan of length 2 is a layer scan) the
    packed layer scan writes none of them, the plain one at least six."""
    cfg = tiny_config(recipe)
    with cfg.unlocked():
        cfg.model.remat = remat
    model, state, _ = setup(cfg)
    params = state["params"]
    fp8 = jax.tree.map(lambda x: x * 0.5 + 0.01, state.get("fp8", {}))
    tokens = batch(b=4, t=16)
    rng = jax.random.key(3)

    def trace_and_run():
        jax.clear_caches()

        def program(p, f, t):
            return compute_grads(model, p, f, t, micro_batches, with_stats, rng=rng)

        shapes = _layer_scan_shapes(jax.make_jaxpr(program)(params, fp8, tokens), 2)
        return shapes, jax.jit(program)(params, fp8, tokens)

    shapes, packed = trace_and_run()
    monkeypatch.setattr(packed_residuals.PackedResidualBlock, "__call__", Block.__call__)
    plain_shapes, plain = trace_and_run()
    if recipe == "fp8dpa" and micro_batches == 1 and remat == "none":
        assert (2, 5) not in shapes and plain_shapes.count((2, 5)) >= 6, (shapes, plain_shapes)
    assert len(jax.tree.leaves(packed)) > 3
    jax.tree.map(np.testing.assert_array_equal, packed, plain)
