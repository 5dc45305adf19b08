"""fused_amax: the twin is its input bit for bit, the FFN's own amax is the one the FP8 dot would
measure (so a step's states, outputs and gradients are unchanged), and in the compiled GPU program
the activation, its FP8 cast and its amax run in one pass (no bf16 activation is written)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import fp8_state
from helpers.recipes import precision_config
from ml_collections import FrozenConfigDict

from fogjax import config_lib
from fogjax.bench import aot, hlo_stats, targets
from fogjax.model.mlp import MLP, XIELU, gelu, swiglu
from fogjax.precision import fused_amax, scaling
from fogjax.precision.fp8_recipes import recipe_from_config
from fogjax.precision.recipe import FP8_COLLECTION


def _every_bf16() -> np.ndarray:
    return np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16)


def test_exact_twin_returns_every_bf16_value_bit_for_bit():
    x = _every_bf16()
    y = np.asarray(jax.jit(fused_amax.exact_twin)(jnp.asarray(x)))
    assert y.dtype == x.dtype
    nan = np.isnan(x.astype(np.float32))
    np.testing.assert_array_equal(y.view(np.uint16)[~nan], x.view(np.uint16)[~nan])
    assert np.isnan(y[nan].astype(np.float32)).all()


def _xielu(x):
    module = XIELU()
    return module.apply(module.init(jax.random.key(0), x), x)


@pytest.mark.parametrize(
    "name, fn, shape",
    [
        ("gelu", gelu, (64, 256)),
        ("swiglu", lambda p: swiglu(p[..., 0, :], p[..., 1, :]), (64, 2, 128)),
        ("xielu", _xielu, (64, 256)),
    ],
)
def test_recomputed_amax_is_the_amax_of_the_activation_bit_for_bit(name, fn, shape):
    x = (jax.random.normal(jax.random.key(1), shape) * 30).astype(jnp.bfloat16)
    x = x.at[0, 0].set(-0.75)  # GeLU's and xIELU's most negative outputs sit near here
    direct = jax.jit(lambda x: scaling.amax(fn(x)))(x)
    fused = jax.jit(lambda x: fused_amax.recomputed_amax(fn, x))(x)
    assert fused.dtype == jnp.float32 and fused.shape == ()
    assert float(fused) > 0
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(direct), err_msg=name)


class _UnfusedRecipe:
    """The same FP8 recipe with the FFN's own amax switched off (the dot measures it itself)."""

    @property
    def takes_lhs_amax(self) -> bool:
        return False


def _unfused(recipe):
    cls = type("Unfused" + type(recipe).__name__, (_UnfusedRecipe, type(recipe)), {})
    return cls(**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)})


@pytest.mark.parametrize("arch", ["fog_flash", "fog_max", "llama3"])
def test_an_fp8_ffn_step_is_unchanged_by_the_fused_amax(arch):
    """Output, parameter and input gradients and the updated FP8 states of one FFN step are
    bit-identical with the FFN's own amax and with the dot's (gelu, xielu, swiglu)."""
    model_cfg = FrozenConfigDict(config_lib.get_config(arch, "tiny").model)
    fused = recipe_from_config(precision_config(recipe="fp8"), "fp8", fp8_attention=False)
    assert fused.takes_lhs_amax and not _unfused(fused).takes_lhs_amax
    x = (jax.random.normal(jax.random.key(2), (2, 8, model_cfg.d_model)) * 3).astype(jnp.bfloat16)
    variables = MLP(model_cfg, fused).init(jax.random.key(3), x)
    params, fp8 = variables["params"], variables[FP8_COLLECTION]

    def step(recipe):
        def loss(params, fp8, x):
            y = MLP(model_cfg, recipe).apply({"params": params, FP8_COLLECTION: fp8}, x)
            return jnp.sum(jnp.square(y.astype(jnp.float32))), y

        grad = fp8_state.value_and_grad(loss, (0, 1, 2), fp8_argnum=1, has_aux=True)
        return jax.jit(grad)(params, fp8, x)

    first, second = step(fused), step(_unfused(fused))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The wo input's state did observe something (the fused amax reached the bulk update).
    history = first[1][1]["wo"]["dot"]["lhs_amax_history"]
    assert float(history[0]) > 0


def _source(by_name, name):
    """The instruction whose buffer ``name`` is (through tuples, bitcasts and copies)."""
    inst = by_name[name]
    while inst.opcode in ("get-tuple-element", "bitcast", "copy"):
        inst = by_name[inst.operands[0]]
    return inst


@pytest.mark.slow
def test_the_compiled_gpu_ffn_casts_the_activation_from_the_gemm_output():
    """FOG-flash's FFN step (forward and backward) compiled for an H100: every fusion that writes an
    E4M3 [tokens, F] tensor reads the bf16 [tokens, F] it needs straight from the wi GEMM, so the
    GeLU, its cast and its amax run in one pass and no bf16 activation is written in between."""
    cfg = config_lib.get_config("fog_flash", "tiny").model
    recipe = recipe_from_config(precision_config(recipe="fp8"), "fp8", fp8_attention=False)
    mlp = MLP(FrozenConfigDict(cfg), recipe)
    tokens, f = 2 * 256, cfg.ffn_dim
    x = jnp.zeros((2, 256, cfg.d_model), jnp.bfloat16)
    abstract = jax.eval_shape(mlp.init, jax.random.key(0), x)
    device = targets.target_devices(targets.get_target("h100"), 1)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), (abstract, x)
    )

    def loss(variables, x):
        return jnp.sum(jnp.square(mlp.apply(variables, x).astype(jnp.float32)))

    lowered = jax.jit(jax.grad(loss)).trace(*args).lower(lowering_platforms=("cuda",))
    options = {"xla_allow_excess_precision": False, "xla_gpu_enable_triton_gemm": False}
    with aot.no_persistent_cache_writes():  # a compile-only executable cannot be cached
        instructions = list(hlo_stats.instructions(lowered.compile(options).as_text()))
    by_name = {i.name: i for i in instructions}
    size = lambda shape: int(np.prod(shape))  # noqa: E731
    casts = [
        i
        for i in instructions
        if i.opcode == "fusion" and ("f8e4m3fn", tokens * f) in {(d, size(s)) for d, s in i.shapes}
    ]
    assert casts
    for cast in casts:
        for operand, shapes in zip(cast.operands, cast.operand_shapes, strict=True):
            if ("bf16", tokens * f) in {(d, size(s)) for d, s in shapes}:
                assert _source(by_name, operand).opcode == "custom-call", (cast, operand)
