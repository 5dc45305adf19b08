"""The current-scaling recipes ``fp8_current`` and ``fp8dpa_current``: what they quantise, which
config fields apply, what they refuse (Transformer Engine, cuDNN's fused FP8 attention), and the
train step's FP8 GEMMs (traced, not compiled)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from helpers import recipes
from helpers.recipes import RecipeBlock
from helpers.steps import fp8_dot_counts, tiny_config

from fogjax import config_lib
from fogjax.bench import attention as bench_attention
from fogjax.model import build_model
from fogjax.precision import registry
from fogjax.precision.cudnn_attention import CudnnAttentionUnavailable
from fogjax.precision.fp8_current import Fp8CurrentDotGeneral
from fogjax.precision.fp8_dot import Fp8DotGeneral
from fogjax.precision.fp8_recipes import Fp8Recipe
from fogjax.precision.recipe import FP8_COLLECTION
from fogjax.precision.registry import make_recipe
from fogjax.train.run import build_run


def precision_config(**overrides) -> ml_collections.ConfigDict:
    return recipes.precision_config(**{"recipe": "fp8_current", **overrides})


_Block = RecipeBlock


def test_registry_lists_both_current_recipes():
    assert {"fp8_current", "fp8dpa_current"} <= set(registry.available())


@pytest.mark.parametrize("name, attention", [("fp8_current", False), ("fp8dpa_current", True)])
def test_recipes_quantise_what_fp8_and_fp8dpa_do_with_no_state(name, attention):
    recipe = make_recipe(precision_config(recipe=name))
    assert isinstance(recipe, Fp8Recipe) and recipe.name == name and recipe.current
    assert recipe.quantizes_linears and recipe.runs_fp8_linear_gemms
    assert recipe.quantizes_attention is attention
    assert recipe.amax_update_rule is None  # no delayed-scaling state for the step to update
    assert isinstance(recipe.linear_dot_general("x"), Fp8CurrentDotGeneral)
    qk = recipe.attention_dot_general("qk")
    assert isinstance(qk, Fp8CurrentDotGeneral) is attention
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shapes = ((4, 32), (32, 8), (2, 8, 16), (2, 6, 16))
    args = [jax.random.normal(k, s).astype(jnp.bfloat16) for k, s in zip(keys, shapes, strict=True)]
    variables = _Block(recipe).init(jax.random.PRNGKey(0), *args)
    assert FP8_COLLECTION not in variables  # no amax history, no scales: nothing to carry
    y, logits = _Block(recipe).apply({}, *args)
    assert y.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_history_fields_are_ignored_and_margin_applies():
    recipe = make_recipe(
        precision_config(
            recipe="fp8dpa_current", amax_history_len=7, amax_reduction="most_recent", margin=2
        )
    )
    for hook in (recipe.linear_dot_general, recipe.attention_dot_general):
        module = hook("x")
        assert isinstance(module, Fp8CurrentDotGeneral) and module.margin == 2
    # The delayed recipes are unchanged.
    delayed = make_recipe(precision_config(recipe="fp8dpa"))
    assert isinstance(delayed.linear_dot_general("x"), Fp8DotGeneral) and not delayed.current
    assert delayed.amax_update_rule == ("max", 0)


@pytest.mark.parametrize("name, fix", [("fp8_current", "fp8 "), ("fp8dpa_current", "fp8dpa ")])
def test_te_backend_is_refused_before_looking_for_transformer_engine(name, fix):
    with pytest.raises(ValueError, match="runs delayed scaling only") as error:
        make_recipe(precision_config(recipe=name, backend="te"))
    message = str(error.value)
    assert "--config.precision.backend=xla" in message
    assert f"--config.precision.recipe={fix}" in message


def test_cudnn_fp8_attention_is_refused_under_fp8dpa_current():
    recipe = make_recipe(precision_config(recipe="fp8dpa_current"))
    with pytest.raises(CudnnAttentionUnavailable, match="cannot be current-scaled") as error:
        recipe.check_attention_impl("cudnn")
    assert "--config.model.attention_impl=xla" in str(error.value)
    assert "--config.precision.recipe=fp8dpa" in str(error.value)
    with pytest.raises(CudnnAttentionUnavailable):
        recipe.fused_fp8_attention("fp8_attention")
    recipe.check_attention_impl("xla")
    # fp8_current keeps attention in BF16: cuDNN's BF16 kernel is the GPU check's business.
    make_recipe(precision_config(recipe="fp8_current")).check_attention_impl("cudnn")
    make_recipe(precision_config(recipe="fp8dpa")).check_attention_impl("cudnn")


def test_start_up_refuses_cudnn_with_fp8dpa_current_before_checking_the_gpu():
    cfg = tiny_config("fp8dpa_current")
    with cfg.unlocked():
        cfg.model.attention_impl = "cudnn"
    # On this CPU machine the GPU check would fail too; the recipe's refusal comes first.
    with pytest.raises(CudnnAttentionUnavailable, match="cannot run 'fp8dpa_current'"):
        build_run(cfg)
    # And a model built some other way refuses when it is traced.
    with pytest.raises(CudnnAttentionUnavailable, match="cannot be current-scaled"):
        jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 128), jnp.int32))


def test_attention_bench_reports_the_refusal_as_its_row_error():
    config = config_lib.get_config("fog_flash", "tiny")
    row = bench_attention.measure_variant(config, "cudnn", "fp8dpa_current", 1, 0)
    assert row["status"] == "error" and "cannot be current-scaled" in row["error"]


@pytest.mark.parametrize(
    "recipe, fwd, bwd",
    [("fp8_current", 4, 8), ("fp8dpa_current", 6, 12)],  # per layer, as fp8 / fp8dpa
)
def test_train_step_runs_the_fp8_gemms_of_fp8_and_fp8dpa(recipe, fwd, bwd):
    run = build_run(tiny_config(recipe))  # abstract state only: nothing is compiled
    assert run.abstract["fp8"] == {}
    tokens = jax.ShapeDtypeStruct((8, 33), jnp.int32)
    step = functools.partial(run.make_train_step(), with_stats=False)
    counts = fp8_dot_counts(jax.make_jaxpr(step)(run.abstract, tokens))
    assert counts == {
        ("float8_e4m3fn", "float8_e4m3fn"): fwd,
        ("float8_e5m2", "float8_e4m3fn"): bwd,
    }, counts
