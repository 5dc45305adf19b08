"""Under GeLU the activation, not wi's FP8 dot, reports the amax of wi's output gradient
(fused_amax.activation_observing_grad_amax, mlp.gelu_reports_wi_grad_amax): the same numbers as
the dot observing it, and on the GPU one kernel for GeLU's backward, the E5M2 cast and the amax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.steps import tiny_config

from fogjax import config_lib
from fogjax.bench import aot, hlo_module, targets
from fogjax.model import build_model, mlp
from fogjax.precision import fused_amax
from fogjax.train import compiler_options


def test_the_activation_gives_gelus_gradient_and_reports_its_amax():
    pre = jax.random.normal(jax.random.key(0), (4, 64, 96), jnp.bfloat16) * 3
    weight = jax.random.normal(jax.random.key(1), (4, 64, 96), jnp.float32)
    scale_inv = jnp.full((1,), 0.25, jnp.float32)

    def loss(act):
        return lambda p, s: jnp.sum(act(p, s).astype(jnp.float32) * weight)

    plain = jax.jit(jax.grad(loss(lambda p, s: mlp.gelu(p)), argnums=0))(pre, scale_inv)
    observing = lambda p, s: fused_amax.activation_observing_grad_amax(mlp.gelu_float32, p, s)  # noqa: E731
    np.testing.assert_array_equal(observing(pre, scale_inv), mlp.gelu(pre))
    d_pre, d_scale = jax.jit(jax.grad(loss(observing), argnums=(0, 1)))(pre, scale_inv)
    np.testing.assert_array_equal(d_pre, plain)
    assert d_pre.dtype == jnp.bfloat16 and d_scale.shape == (1,) and d_scale.dtype == jnp.float32
    np.testing.assert_array_equal(d_scale, [np.max(np.abs(np.asarray(plain, np.float32)))])


def _mlp_grads(monkeypatch, reports: bool):
    """Gradients of a tiny FP8 FFN (params, input, every fp8 state's observation), compiled with
    the GPU step's options (no excess precision: bf16 values stay bf16 in every fusion)."""
    monkeypatch.setattr(mlp, "gelu_reports_wi_grad_amax", lambda recipe, act: reports)
    cfg = tiny_config("fp8")
    recipe = build_model(cfg).recipe
    assert cfg.model.ffn_activation == "gelu" and recipe.takes_lhs_amax
    ffn = mlp.MLP(cfg.model, recipe)
    x = jax.random.normal(jax.random.key(0), (2, 16, cfg.model.d_model), jnp.bfloat16)
    variables = ffn.init(jax.random.key(1), x)
    variables = {
        "params": variables["params"],
        "fp8": jax.tree.map(lambda a: a * 0.5 + 0.01, variables["fp8"]),  # scales other than 1
    }
    weight = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

    def loss(v, x):
        return jnp.sum(ffn.apply(v, x).astype(jnp.float32) * weight)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    options = compiler_options.for_platform("gpu")
    compiled = grad.lower(variables, x).compile(compiler_options=options)
    return compiled(variables, x)


def test_the_ffn_gradients_and_amaxes_are_those_of_the_dot_observing(monkeypatch):
    reported = _mlp_grads(monkeypatch, True)
    observed = _mlp_grads(monkeypatch, False)
    wi_amax = reported[0]["fp8"]["wi"]["dot"]["grad_scale_inv"]
    assert float(wi_amax[0]) > 0  # a real amax arrived, from the activation
    jax.tree.map(np.testing.assert_array_equal, reported, observed)


def _ffn_backward_bf16_writes(monkeypatch, reports: bool) -> list[str]:
    """Fusions in the backward of the guard config's GPU step (390M width, fp8) that write a bf16
    [tokens, ffn_dim] tensor: GeLU's backward output, when it is not fused into the FP8 cast."""
    monkeypatch.setattr(mlp, "gelu_reports_wi_grad_amax", lambda recipe, act: reports)
    texts = []
    keep = aot.require_gpu_program
    monkeypatch.setattr(aot, "require_gpu_program", lambda text: (texts.append(text), keep(text)))
    c = config_lib.get_config("fog_flash", "390m")
    c.update_from_flattened_dict(
        {"model.num_layers": 2, "train.batch_size": 1, "train.seq_len": 512}
    )
    c.precision.recipe = "fp8"
    row = aot.aot_row("fp8", c, targets.get_target("h100"), 1, False)
    assert row["status"] == "ok", row["error"]
    module = hlo_module.parse_module(texts[-1])
    ffn = {512 * c.model.ffn_dim}
    return [
        i.name
        for computation in module.computations.values()
        for i in computation
        if i.opcode == "fusion"
        and "transpose(jvp" in hlo_module.op_name(i)
        and any(dtype == "bf16" and int(np.prod(dims)) in ffn for dtype, dims in i.shapes)
    ]


@pytest.mark.slow
def test_gelus_backward_is_not_written_in_bf16_before_its_fp8_cast(monkeypatch):
    assert _ffn_backward_bf16_writes(monkeypatch, True) == []
    assert _ffn_backward_bf16_writes(monkeypatch, False) != []  # what the activation's report saves
