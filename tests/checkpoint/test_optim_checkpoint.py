"""Quantised optimizer state in checkpoints: sharded like its parameters, bit-exact round trips
of every state precision across meshes, and a named refusal across precisions."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fogjax import checkpoint, config_lib, optim, sharding
from fogjax.optim.moment_formats import Quantized
from fogjax.train import run as state_lib

# Every preset, and int8 moments (the one format no preset uses).
PRECISIONS = {
    "fog_fp16": {},
    "fog_fp8_m1": {},
    "fog_fp8": {},
    "bf16": {},
    "custom": dict(mu_dtype="int8", nu_dtype="int8", master_dtype="bfloat16"),
}

# A model's parameters without the model (so each case compiles only the optimizer): logical
# names as the Transformer gives them, last axes holding several blocks of 32.
PARAM_SHAPES = {
    "embedding": ((256, 64), ("vocab", "embed")),
    "kernel": ((2, 64, 192), ("layers", "embed", "mlp")),
    "lm_head": ((64, 256), ("embed", "vocab")),
    "scale": ((2, 64), ("layers", "norm")),
}
MASK = {"embedding": True, "kernel": True, "lm_head": True, "scale": False}


def optim_config(preset: str, **fields):
    c = config_lib.get_config("fog_flash", "tiny").optim
    c.state_precision = preset
    c.state_block_size = 32
    c.warmup_steps = 0
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def init_fn(optim_cfg):
    """``init(rng) -> state`` as fogjax.train.run.make_init_fn builds it, for PARAM_SHAPES."""
    tx = optim.make_optimizer(optim_cfg, 100, MASK)

    def init(rng):
        keys = jax.random.split(rng, len(PARAM_SHAPES))
        params = {
            name: nn.LogicallyPartitioned(0.02 * jax.random.normal(k, shape), names)
            for k, (name, (shape, names)) in zip(keys, PARAM_SHAPES.items(), strict=True)
        }
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": optim.master_cast(optim_cfg)(params),
            "fp8": {},
            "opt_state": tx.init(params),
        }

    return init, tx


def mesh_of(shape):
    devices = jax.devices()[: math.prod(shape)]
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)), devices)


def leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def updater(optim_cfg, mesh, create=True):
    """(abstract, shardings, created state or None, ``update(state, step) -> state``) on
    ``mesh``: one optimizer update with t-distributed gradients seeded by ``step``, compiled
    once."""
    init, tx = init_fn(optim_cfg)
    with sharding.sharding_context(mesh):
        abstract, shardings = state_lib.abstract_state(init, mesh)
        state = state_lib.create_state(init, shardings, 0) if create else None

    @jax.jit(out_shardings=shardings)
    def apply(state, grads):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state}

    def update(state, step):
        grads = t_grads(optim_cfg, state["params"], step)
        with sharding.sharding_context(mesh):
            return apply(state, grads)

    return abstract, shardings, state, update


def t_grads(optim_cfg, params, step):
    """t-distributed (heavy-tailed) gradients like ``params``, seeded by ``step``."""
    rng = np.random.default_rng(step)
    return jax.tree.map(
        lambda p: rng.standard_t(3, p.shape).astype(optim.grad_dtype(optim_cfg)), params
    )


def stepped_state(optim_cfg, mesh):
    """(abstract, shardings, state) after two updates (so moments, scales, remainders and
    counts are all non-trivial)."""
    abstract, shardings, state, update = updater(optim_cfg, mesh)
    for step in range(2):
        state = update(state, step)
    return abstract, shardings, state


def stepped_states(optim_cfgs, mesh):
    """(shardings, states): ``{name: state}`` of every config in ``optim_cfgs`` after the two
    updates of :func:`stepped_state` (the same initial values and gradients), but created and
    updated by one program for them all: one compilation instead of one per config (13 s instead
    of 19 s for the five of PRECISIONS on 2 cores)."""
    inits = {name: init_fn(cfg) for name, cfg in optim_cfgs.items()}

    def init(rng):
        return {name: fn(rng) for name, (fn, _) in inits.items()}

    with sharding.sharding_context(mesh):
        _, shardings = state_lib.abstract_state(init, mesh)
        states = state_lib.create_state(init, shardings, 0)

    @jax.jit(out_shardings=shardings)
    def apply(states, grads):
        out = {}
        for name, (_, tx) in inits.items():
            state = states[name]
            updates, opt_state = tx.update(grads[name], state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            out[name] = {**state, "params": params, "opt_state": opt_state}
        return out

    for step in range(2):
        grads = {n: t_grads(cfg, states[n]["params"], step) for n, cfg in optim_cfgs.items()}
        with sharding.sharding_context(mesh):
            states = apply(states, grads)
    return shardings, states


@pytest.mark.slow
def test_stochastic_rounding_resumes_exactly(tmp_path):
    """4 steps straight = 2 steps, save, restore on another mesh, 2 more: bit for bit, with
    stochastic rounding of the master and of FP8 moments (their bits come from the step)."""
    cfg = optim_config(
        "custom",
        master_dtype="bfloat16",
        master_rounding="stochastic",
        mu_dtype="float8_e4m3fn",
        nu_dtype="float16",
        moment_rounding="stochastic",
    )
    _, _, state, update = updater(cfg, mesh_of((1, 8, 1)))
    for step in range(4):
        state = update(state, step)
        if step == 1:
            with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
                assert ckpt.save(2, state, {}, {}, force=True)
    straight = jax.device_get(state)
    abstract, _, _, update = updater(cfg, mesh_of((2, 4, 1)), create=False)
    with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
        resumed, _, _ = ckpt.restore(abstract)
    for step in range(2, 4):
        resumed = update(resumed, step)
    for path, x in leaves(straight).items():
        got = np.asarray(leaves(resumed)[path])
        np.testing.assert_array_equal(
            got.reshape(-1).view(np.uint8), np.asarray(x).reshape(-1).view(np.uint8), path
        )


@pytest.mark.slow
def test_round_trip_across_meshes_is_bitwise(tmp_path):
    """Every precision's state, saved on fsdp=8 (one checkpoint holding them all, so orbax runs
    once), restores on data=2 x fsdp=2 x tensor=2 bit for bit, in the new mesh's shardings."""
    cfgs = {preset: optim_config(preset, **fields) for preset, fields in PRECISIONS.items()}
    shardings8, states = stepped_states(cfgs, mesh_of((1, 8, 1)))
    for path, x in leaves(states).items():
        assert x.sharding == leaves(shardings8)[path], path
    expected = jax.device_get(states)
    with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
        assert ckpt.save(2, states, {"position": 2}, {}, force=True)
    mesh = mesh_of((2, 2, 2))
    with sharding.sharding_context(mesh):
        targets = {p: state_lib.abstract_state(init_fn(c)[0], mesh) for p, c in cfgs.items()}
    with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
        restored, _, _ = ckpt.restore({p: abstract for p, (abstract, _) in targets.items()})
    got = leaves(restored)
    new_shardings = leaves({p: shardings for p, (_, shardings) in targets.items()})
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
    [..., blocks] its partition spec wherever the block count divides the mesh axis, and the
    real model's state gets them too (fogjax.train.run.build_run)."""
    cfg = config_lib.get_config("fog_flash", "tiny")
    cfg.model.num_layers, cfg.model.num_kv_heads = 2, 2
    cfg.optim.state_precision, cfg.optim.master_dtype = "custom", "bfloat16"
    cfg.optim.mu_dtype, cfg.optim.nu_dtype = "int8", "bfloat16"
    cfg.optim.master_rounding = "remainder"
    run = state_lib.build_run(cfg, mesh_of((1, 4, 2)))
    params = run.shardings["params"]
    master = run.shardings["opt_state"][2]
    adam = master.inner[0]
    lm_head = params["lm_head"].spec  # [embed, vocab] = (fsdp, tensor)
    assert lm_head == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert master.remainder["lm_head"].spec == lm_head
    assert isinstance(adam.mu["lm_head"], Quantized)
    assert adam.mu["lm_head"].values.spec == lm_head
    assert adam.mu["lm_head"].scale.spec == lm_head  # [256, 4096 / 128 = 32]: 32 splits on 2
    assert run.abstract["opt_state"][2].inner[0].mu["lm_head"].scale.shape == (256, 32)
    assert adam.nu["lm_head"] == params["lm_head"]  # bfloat16 nu: a plain array
    # FFN-in [L, 256, 1152]: scales [L, 256, 9]; 9 blocks do not split over tensor=2, so that
    # dimension is replicated (the divisibility fallback of fogjax.sharding), the rest follows.
    assert params["layers"]["mlp"]["wi"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert adam.mu["layers"]["mlp"]["wi"]["kernel"].scale.spec == P(None, "fsdp", None)


def test_restoring_another_state_precision_is_refused_by_name(tmp_path):
    _, _, state = stepped_state(optim_config("fp32"), mesh_of((1, 8, 1)))
    with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
        assert ckpt.save(2, state, {"position": 2}, {}, force=True)
    mesh = mesh_of((1, 8, 1))
    for other in (optim_config("fog_fp16"), optim_config("custom", master_dtype="bfloat16")):
        with sharding.sharding_context(mesh):
            abstract, _ = state_lib.abstract_state(init_fn(other)[0], mesh)
        with (
            checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt,
            pytest.raises(
                checkpoint.StatePrecisionMismatchError,
                match=r"another optimizer-state precision: 'params/.*' is saved as float32, "
                r"this run stores (float16|bfloat16).*state_precision, master_dtype",
            ),
        ):
            ckpt.restore(abstract)
    # Parameters of another shape are still the generic refusal, not a precision one.
    PARAM_SHAPES["scale"] = ((2, 32), ("layers", "norm"))
    try:
        with sharding.sharding_context(mesh):
            abstract, _ = state_lib.abstract_state(init_fn(optim_config("fp32"))[0], mesh)
    finally:
        PARAM_SHAPES["scale"] = ((2, 64), ("layers", "norm"))
    with (
        checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt,
        pytest.raises(checkpoint.CheckpointMismatchError) as err,
    ):
        ckpt.restore(abstract)
    assert not isinstance(err.value, checkpoint.StatePrecisionMismatchError)
