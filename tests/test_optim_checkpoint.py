"""Quantised optimizer state in checkpoints: sharded like its parameters, bit-exact round trips
of every state precision across meshes, and a named refusal across precisions."""

import math

import jax
import numpy as np
import pytest

from fogjax import checkpoint, config_lib, optim, sharding
from fogjax import state as state_lib
from fogjax.optim_formats import Quantized

# Every preset, and int8 moments (the one format no preset uses).
PRECISIONS = {
    "fog_fp16": {},
    "fog_fp8_m1": {},
    "fog_fp8": {},
    "bf16": {},
    "custom": dict(mu_dtype="int8", nu_dtype="int8", master_dtype="bfloat16"),
}


def small_config(preset: str, **fields):
    """2 layers, width 64, 2 key/value groups (tensor=2 divides them); blocks of 32 so every
    kernel's last axis holds several blocks."""
    c = config_lib.get_config("fog_flash", "tiny")
    c.model.num_layers, c.model.d_model, c.model.ffn_dim = 2, 64, 192
    c.model.num_heads, c.model.num_kv_heads, c.model.vocab_size = 2, 2, 256
    c.precision.recipe = "bf16"
    c.train.batch_size, c.train.seq_len = 8, 16
    c.optim.state_precision = preset
    c.optim.state_block_size = 32
    c.optim.warmup_steps = 0
    for k, v in fields.items():
        setattr(c.optim, k, v)
    return c


def mesh_of(shape):
    devices = jax.devices()[: math.prod(shape)]
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)), devices)


def leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stepped_state(cfg, mesh):
    """create_state on ``mesh``, then two optimizer updates with random gradients (so moments,
    scales, remainders and counts are all non-trivial)."""
    run = state_lib.build_run(cfg, mesh)
    rng = np.random.default_rng(0)
    with sharding.sharding_context(mesh):
        state = state_lib.create_state(run.init, run.shardings, cfg.seed)

        @jax.jit(out_shardings=run.shardings)
        def update(state, grads):
            updates, opt_state = run.tx.update(grads, state["opt_state"], state["params"])
            params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
            return {**state, "params": params, "opt_state": opt_state}

        for _ in range(2):
            grads = jax.tree.map(
                lambda p: rng.standard_t(3, p.shape).astype(optim.grad_dtype(cfg.optim)),
                state["params"],
            )
            state = update(state, grads)
    return run, state


@pytest.mark.parametrize("preset", list(PRECISIONS))
def test_round_trip_across_meshes_is_bitwise(preset, tmp_path):
    cfg = small_config(preset, **PRECISIONS[preset])
    run8, state = stepped_state(cfg, mesh_of((1, 8, 1)))
    for path, x in leaves(state).items():
        assert x.sharding == leaves(run8.shardings)[path], path
    expected = jax.device_get(state)
    with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
        assert ckpt.save(2, state, {"position": 2}, {}, force=True)
    run = state_lib.build_run(cfg, mesh_of((2, 2, 2)))
    with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
        restored, _, _ = ckpt.restore(run.abstract)
    got, new_shardings = leaves(restored), leaves(run.shardings)
    assert got.keys() == leaves(expected).keys()
    for path, x in leaves(expected).items():
        assert got[path].dtype == x.dtype and got[path].sharding == new_shardings[path], path
        np.testing.assert_array_equal(
            np.asarray(got[path]).reshape(-1).view(np.uint8),
            np.asarray(x).reshape(-1).view(np.uint8),
            err_msg=path,
        )


def test_new_state_leaves_are_sharded_like_their_parameters():
    """Stored moments and remainders carry their parameter's sharding; block scales
    [..., blocks] its partition spec wherever the block count divides the mesh axis."""
    cfg = small_config("bf16", mu_dtype="int8", state_precision="custom", master_dtype="bfloat16")
    cfg.optim.master_rounding = "remainder"
    run = state_lib.build_run(cfg, mesh_of((1, 4, 2)))
    params = run.shardings["params"]
    _, _, master = run.shardings["opt_state"]
    adam = master.inner[0]
    lm_head = params["lm_head"].spec  # [embed, vocab] = (fsdp, tensor)
    assert lm_head == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert master.remainder["lm_head"].spec == lm_head
    assert isinstance(adam.mu["lm_head"], Quantized)
    assert adam.mu["lm_head"].values.spec == lm_head
    assert adam.mu["lm_head"].scale.spec == lm_head  # [64, 256 / 32 = 8]: 8 splits on tensor=2
    assert adam.nu["lm_head"] == params["lm_head"]  # bfloat16 nu: a plain array
    scale_shape = run.abstract["opt_state"][2].inner[0].mu["lm_head"].scale.shape
    assert scale_shape == (64, 8)


def test_restoring_another_state_precision_is_refused_by_name(tmp_path):
    cfg32 = small_config("fp32")
    _, state = stepped_state(cfg32, mesh_of((1, 8, 1)))
    with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
        assert ckpt.save(2, state, {"position": 2}, {}, force=True)
    for other in (small_config("fog_fp16"), small_config("custom", master_dtype="bfloat16")):
        run = state_lib.build_run(other, mesh_of((1, 8, 1)))
        with (
            checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt,
            pytest.raises(
                checkpoint.StatePrecisionMismatchError,
                match=r"another optimizer-state precision: 'params/.*' is saved as float32, "
                r"this run stores (float16|bfloat16).*state_precision, master_dtype",
            ),
        ):
            ckpt.restore(run.abstract)
    # A different model is still the generic refusal, not a precision one.
    wider = small_config("fp32")
    wider.model.d_model = 128
    run = state_lib.build_run(wider, mesh_of((1, 8, 1)))
    with (
        checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt,
        pytest.raises(checkpoint.CheckpointMismatchError) as err,
    ):
        ckpt.restore(run.abstract)
    assert not isinstance(err.value, checkpoint.StatePrecisionMismatchError)
