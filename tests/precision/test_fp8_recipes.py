"""FP8 recipes from the config: what each quantises, field validation, and the TE backend's
start-up checks (CPU) and adapter (flax's FP8 op stands in for TE's; the real TE test needs a GPU).
"""

import functools
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import fp8_ops
from helpers import fp8_state
from helpers.recipes import LINEAR_DIMS, RecipeBlock, precision_config

from fogjax.precision import te
from fogjax.precision.fp8_dot import Fp8DotGeneral
from fogjax.precision.fp8_recipes import Fp8Recipe
from fogjax.precision.recipe import FP8_COLLECTION, Recipe
from fogjax.precision.registry import make_recipe

_Block = RecipeBlock


def _block_inputs(dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return (
        jax.random.normal(keys[0], (4, 32)).astype(dtype),
        jax.random.normal(keys[1], (32, 8)).astype(dtype),
        jax.random.normal(keys[2], (2, 8, 16)).astype(dtype),
        jax.random.normal(keys[3], (2, 6, 16)).astype(dtype),
    )


@pytest.mark.parametrize(
    "name, linears, attention",
    [("bf16", False, False), ("fp8", True, False), ("fp8dpa", True, True)],
)
@pytest.mark.slow
def test_recipes_quantise_what_table_9_says(name, linears, attention):
    recipe = make_recipe(precision_config(recipe=name, amax_history_len=16))
    assert recipe.name == name and recipe.compute_dtype == jnp.bfloat16
    assert recipe.quantizes_linears is linears and recipe.quantizes_attention is attention
    variables = _Block(recipe).init(jax.random.PRNGKey(0), *_block_inputs())
    fp8 = variables.get(FP8_COLLECTION, {})
    assert ("dot" in fp8) is linears
    assert ("qk" in fp8) is attention
    for module_state in fp8.values():
        assert module_state["lhs_amax_history"].shape == (16,)
        assert set(module_state) == {
            f"{op}_{v}" for op in ("lhs", "rhs", "grad") for v in ("amax_history", "scale_inv")
        }
    y, logits = _Block(recipe).apply(variables, *_block_inputs())
    assert y.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_fp8_modules_carry_the_config_fields():
    recipe = make_recipe(
        precision_config(
            recipe="fp8dpa", amax_history_len=7, amax_reduction="most_recent", margin=1
        )
    )
    assert isinstance(recipe, Fp8Recipe) and recipe.backend == "xla"
    for hook in (recipe.linear_dot_general, recipe.attention_dot_general):
        module = hook("x")
        assert isinstance(module, Fp8DotGeneral)
        assert (module.amax_history_len, module.amax_reduction, module.margin) == (
            7,
            "most_recent",
            1,
        )


def test_fp8_recipe_quantises_in_fp8_not_bf16():
    """The FP8 path differs from the bf16 path: the outputs are those of E4M3 operands."""
    x, w, q, k = _block_inputs(jnp.float32)
    bf16 = _Block(make_recipe(precision_config(recipe="bf16", compute_dtype="float32")))
    fp8 = _Block(make_recipe(precision_config(recipe="fp8", compute_dtype="float32")))
    y_ref, _ = bf16.apply({}, x, w, q, k)
    y_fp8, _ = fp8.apply(fp8.init(jax.random.PRNGKey(0), x, w, q, k), x, w, q, k)
    e4m3 = lambda a: jnp.asarray(a).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    np.testing.assert_allclose(y_fp8, e4m3(x) @ e4m3(w), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_fp8, y_ref, rtol=1e-3, atol=1e-3)


def test_default_config_sections_build():
    from fogjax import config_lib

    for arch in ("fog_flash", "llama3"):
        config = config_lib.get_config(arch, "tiny")
        recipe = make_recipe(config.precision)
        assert recipe.name == config.precision.recipe


@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("amax_reduction", "mean", "'max'"),
        ("margin", -1, "use 0"),
        ("amax_history_len", 0, "use 1024"),
        ("backend", "cuda", "'xla'"),
        ("compute_dtype", "int8", "'bfloat16'"),
    ],
)
def test_bad_fields_name_the_field_and_the_fix(field, value, fix):
    with pytest.raises(ValueError, match=f"precision.{field}") as error:
        make_recipe(precision_config(recipe="fp8", **{field: value}))
    assert fix in str(error.value)


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(ValueError, match="fp8dpa"):
        make_recipe(precision_config(recipe="fp9"))


def test_te_backend_without_transformer_engine_names_requirements_gpu(monkeypatch):
    # Make `import transformer_engine` fail even where it happens to be installed.
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    with pytest.raises(te.TransformerEngineUnavailable, match="requirements-gpu.txt") as error:
        make_recipe(precision_config(recipe="fp8", backend="te"))
    assert "import transformer_engine.jax" in str(error.value)
    assert "precision.backend=xla" in str(error.value)


@pytest.mark.skipif(
    any(d.platform == "gpu" for d in jax.devices()), reason="checks the no-GPU path"
)
def test_te_backend_without_gpu_names_requirements_gpu(monkeypatch):
    # A stand-in TE package that imports fine: the GPU check must still stop the start-up.
    for name in (
        "transformer_engine",
        "transformer_engine.common",
        "transformer_engine.common.recipe",
        "transformer_engine.jax",
        "transformer_engine.jax.flax",
    ):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(te.TransformerEngineUnavailable, match="requirements-gpu.txt") as error:
        make_recipe(precision_config(recipe="fp8dpa", backend="te"))
    assert "no GPU" in str(error.value)


# DetachedDotGeneral is what carries TE's module; flax's Fp8DirectDotGeneralOp keeps the same kind
# of state in the same collection, so it stands in for TE's module on CPU.
_FLAX_OP = functools.partial(fp8_ops.Fp8DirectDotGeneralOp, amax_history_length=4, parent=None)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        w = self.param("kernel", nn.initializers.normal(0.3), (x.shape[-1], x.shape[-1]))
        y = te.DetachedDotGeneral(make_module=_FLAX_OP, name="dot")(x, w, LINEAR_DIMS)
        return jnp.tanh(y), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            _Layer,
            variable_axes={"params": 0, FP8_COLLECTION: 0},
            split_rngs={"params": True},
            length=2,
        )
        return scan(name="layers")(x, None)[0]


@pytest.mark.slow
def test_detached_dot_general_keeps_foreign_state_in_fp8_and_matches_it():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16))
    model = _Stack()
    variables = model.init(jax.random.PRNGKey(2), x)
    assert set(variables) == {"params", FP8_COLLECTION}
    state = variables[FP8_COLLECTION]["layers"]["dot"]["state"][fp8_ops.OVERWRITE_WITH_GRADIENT]
    assert state["input_amax_history"].shape == (2, 4)  # stacked per layer

    def loss(params, fp8):
        return jnp.sum(model.apply({"params": params, FP8_COLLECTION: fp8}, x) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    params, fp8 = variables["params"], variables[FP8_COLLECTION]
    for _ in range(2):
        g_params, fp8 = step(params, fp8)
    # The same two steps with flax's op applied directly, layer by layer.
    direct = fp8_ops.Fp8DirectDotGeneralOp(amax_history_length=4)
    kernels = params["layers"]["kernel"]
    flax_states = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(2)]

    def direct_loss(kernels, states):
        h = x
        for i in range(2):
            out = direct.apply(
                {fp8_ops.OVERWRITE_WITH_GRADIENT: states[i]}, h, kernels[i], LINEAR_DIMS
            )
            h = jnp.tanh(out)
        return jnp.sum(h**2)

    direct_step = jax.jit(jax.grad(direct_loss, argnums=(0, 1)))
    for _ in range(2):
        g_kernels, flax_states = direct_step(kernels, flax_states)
    np.testing.assert_array_equal(g_params["layers"]["kernel"], g_kernels)
    ours = fp8["layers"]["dot"]["state"][fp8_ops.OVERWRITE_WITH_GRADIENT]
    for i in range(2):
        jax.tree.map(
            np.testing.assert_array_equal,
            jax.tree.map(lambda a, i=i: a[i], ours),
            flax_states[i],
        )
    assert float(ours["input_scale"][0, 0]) != 1.0  # the scales really were updated


@pytest.mark.gpu
def test_te_backend_trains_a_linear_close_to_the_xla_backend():
    """Real Transformer Engine (GPU only): its FP8 linear tracks ours within FP8 rounding."""
    x, w, _, _ = _block_inputs()

    class Linear(nn.Module):
        recipe: Recipe

        @nn.compact
        def __call__(self, x, w):
            return self.recipe.linear_dot_general("dot")(x, w, LINEAR_DIMS)

    outs = {}
    for backend in ("te", "xla"):
        model = Linear(make_recipe(precision_config(recipe="fp8", backend=backend)))
        variables = model.init(jax.random.PRNGKey(0), x, w)
        fp8 = variables[FP8_COLLECTION]

        def loss(x, w, fp8, model=model):
            return jnp.sum(model.apply({FP8_COLLECTION: fp8}, x, w).astype(jnp.float32) ** 2)

        # TE's state: gradient = new value; ours: gradient = amax, applied by the helper.
        step = jax.jit(fp8_state.value_and_grad(loss, (0, 1, 2), 2))
        for _ in range(3):
            value, (dx, dw, fp8) = step(x, w, fp8)
        assert np.isfinite(float(value))
        outs[backend] = (value, dx, dw)
    for te_value, xla_value in zip(outs["te"], outs["xla"], strict=True):
        np.testing.assert_allclose(
            np.asarray(te_value, np.float32), np.asarray(xla_value, np.float32), rtol=0.1, atol=0.1
        )
