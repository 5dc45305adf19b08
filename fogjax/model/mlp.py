"""Feed-forward networks: non-gated (GeLU, xIELU) and gated (SwiGLU, SmoothSwiGLU).

The equations are docs/spec.md §1.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fogjax.model import probes
from fogjax.model.layers import Linear, grad_arrives_whole, recompute_in_backward
from fogjax.precision import fused_amax, scaling
from fogjax.precision.recipe import FP8_COLLECTION, Recipe

Array = jax.Array

GATED = ("swiglu", "smooth_swiglu")
NON_GATED = ("gelu", "xielu")
ACTIVATIONS = GATED + NON_GATED


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class XIELU(nn.Module):
    """xIELU with per-layer trainable scalars (float32).

    alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n);
    f(x) = alpha_p x^2 + beta x for x > 0, else alpha_n (expm1(min(x, eps)) - x) + beta x.
    Both effective alphas start at ``alpha_init``.
    """

    alpha_init: float = 0.8
    beta: float = 0.5
    eps: float = -1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.alpha_init <= self.beta:
            raise ValueError(
                f"model.xielu_alpha_init={self.alpha_init} must exceed model.xielu_beta="
                f"{self.beta} (alpha_n = beta + softplus(a_n) > beta)."
            )
        a_p = self.param(
            "alpha_p_raw", nn.initializers.constant(_inverse_softplus(self.alpha_init)), ()
        )
        a_n = self.param(
            "alpha_n_raw",
            nn.initializers.constant(_inverse_softplus(self.alpha_init - self.beta)),
            (),
        )
        alpha_p = jax.nn.softplus(a_p)
        alpha_n = self.beta + jax.nn.softplus(a_n)
        return _xielu(x, alpha_p, alpha_n, self.beta, self.eps)


@functools.partial(recompute_in_backward, static_argnums=(3, 4))
def _xielu(x: Array, alpha_p: Array, alpha_n: Array, beta: float, eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    positive = alpha_p * jnp.square(x32) + beta * x32
    negative = alpha_n * (jnp.expm1(jnp.minimum(x32, eps)) - x32) + beta * x32
    return jnp.where(x32 > 0, positive, negative).astype(x.dtype)


def gelu_float32(x: Array) -> Array:
    """The exact (erf) GeLU, evaluated in float32, returned in x's dtype."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


# Its float32 intermediates recomputed in the backward, not saved.
gelu = recompute_in_backward(gelu_float32)


@recompute_in_backward
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up, evaluated in float32 (at least), returned in up's dtype."""
    acc = jnp.promote_types(up.dtype, jnp.float32)
    return (jax.nn.silu(gate.astype(acc)) * up.astype(acc)).astype(up.dtype)


def gelu_reports_wi_grad_amax(recipe: Recipe, act: str) -> bool:
    """Whether the GeLU, not wi's FP8 dot, reports the amax of wi's output gradient
    (fused_amax.activation_observing_grad_amax): under delayed scaling on XLA
    (``recipe.takes_lhs_amax``), so that GeLU's backward, that gradient's E5M2 cast and its amax
    run as one kernel. The same numbers either way (tests/model/test_mlp_grad_amax.py)."""
    return recipe.takes_lhs_amax and act == "gelu"


class MLP(nn.Module):
    """FFN: x [B, T, D] -> [B, T, D] in the recipe's compute dtype.

    Non-gated: act(x W_in) W_out with W_in [D, F]. Gated: silu(x W_g) * (x W_u) W_out with the
    gate and up projections fused in one kernel [D, 2, F]. ``smooth_swiglu`` divides the input of
    W_out by a stop-gradient per-token (or per-channel) max and multiplies it back after the GEMM:
    exact in real arithmetic, it only changes what the FP8 cast of that input sees.
    """

    cfg: Any  # the `model` config section
    recipe: Recipe
    kurtosis_form: str = "token"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, recipe = self.cfg, self.recipe
        dtype = recipe.compute_dtype
        acc = jnp.promote_types(dtype, jnp.float32)  # elementwise math in >= float32
        act = cfg.ffn_activation
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scale_out_init else None
        gated = act in GATED
        in_features = (2, cfg.ffn_dim) if gated else (cfg.ffn_dim,)
        in_axes = ("embed", None, "mlp") if gated else ("embed", "mlp")
        wi = Linear(in_features, in_axes, cfg.init_std, recipe, name="wi")
        grad_amax_in_activation = gelu_reports_wi_grad_amax(recipe, act)
        pre = wi(x, observe_grad=not grad_amax_in_activation)
        probes.probe(self, "ffn_pre", pre, self.kurtosis_form)

        down_scale = None
        if gated:
            activation = lambda p: swiglu(p[..., 0, :], p[..., 1, :].astype(dtype))  # noqa: E731
        elif act == "gelu":
            activation = gelu
        else:
            activation = XIELU(cfg.xielu_alpha_init, cfg.xielu_beta, cfg.xielu_eps, name="xielu")
        if grad_amax_in_activation:
            states = wi.variables[FP8_COLLECTION]["dot"]
            # Its per-device stand-in under FSDP, where the scan has them (packed_scales.py).
            sink = states.get("grad" + scaling.PARTIALS_SUFFIX, states["grad_scale_inv"])
            h = fused_amax.activation_observing_grad_amax(gelu_float32, pre, sink)
        else:
            h = activation(pre)
        if act == "smooth_swiglu":
            h, down_scale = _smooth(pre[..., 0, :], h, cfg.smooth_swiglu_per_channel)
        probes.probe(self, "ffn_act", h, self.kurtosis_form)
        # The FP8 cast of h, its amax and the activation in one pass (fused_amax.py); SmoothSwiGLU's
        # h is divided by a max over h first, so its cast cannot start before a pass over h anyway.
        h_amax = None
        if recipe.takes_lhs_amax and act != "smooth_swiglu":
            h_amax = fused_amax.recomputed_amax(activation, pre)

        wo = Linear((cfg.d_model,), ("mlp", "embed"), out_std or cfg.init_std, recipe, name="wo")
        if down_scale is not None and cfg.smooth_swiglu_per_channel:
            # (h / s) @ (diag(s) W_out): the per-channel scale folds into the weight's rows.
            y = wo(h, row_scale=down_scale, grad_cast_transpose=grad_arrives_whole(cfg))
        else:
            # A down_scale after the GEMM is an elementwise producer of its gradient.
            whole = grad_arrives_whole(cfg) and down_scale is None
            y = wo(h, x_amax=h_amax, grad_cast_transpose=whole)
            if down_scale is not None:
                y = (y.astype(acc) * down_scale).astype(dtype)
        probes.probe(self, "ffn_out", y, self.kurtosis_form)
        return y


def _smooth(gate: Array, h: Array, per_channel: bool) -> tuple[Array, Array]:
    """Divides h by a stop-gradient max: per token of |gate| ([B, T, 1]) or per channel of |h|."""
    acc = jnp.promote_types(h.dtype, jnp.float32)
    if per_channel:
        s = jnp.max(jnp.abs(h.astype(acc)), axis=(0, 1))  # [F]
    else:
        s = jnp.max(jnp.abs(gate.astype(acc)), axis=-1, keepdims=True)  # [B, T, 1]
    s = jax.lax.stop_gradient(jnp.maximum(s, 1e-30))
    return (h.astype(acc) / s).astype(h.dtype), s
