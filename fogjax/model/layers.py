"""Basic layers: RMSNorm (learnable or frozen), LayerScale, and the recipe-aware Linear.

Parameters are float32; activations run in the recipe's compute dtype. Every parameter carries
logical axis names (see fogjax/sharding.py for how they map onto the mesh).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fogjax.precision.recipe import Recipe

Array = jax.Array


def recompute_in_backward(
    fn: Callable[..., Array], static_argnums: tuple[int, ...] = ()
) -> Callable[..., Array]:
    """``fn`` whose intermediates are recomputed in the backward pass instead of saved.

    For elementwise float32 arithmetic on bf16 tensors (norms, activations, the QK regulariser)
    autodiff would save the float32 upcast of the input for the backward: a float32 copy of every
    such activation, per layer, stacked by the layer scan (at 1.5B and 4 x 4096 tokens, 0.8 GB per
    MLP activation per layer). Under ``jax.checkpoint`` only ``fn``'s inputs are saved, in their
    own dtype, and the backward recomputes the float32 values from them, as fused GeLU / SwiGLU /
    RMSNorm kernels do; the recomputation is elementwise and fuses into the backward's kernels.
    The numbers are the same: the backward runs the same float32 operations on the same inputs.
    """
    return jax.checkpoint(
        fn, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=static_argnums
    )


def rms_normalize(x: Array, eps: float) -> Array:
    """z / sqrt(mean(z^2) + eps) over the last axis, reduced in float32; returns float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm_g(z) = g * z / sqrt(mean(z^2) + eps) over the last axis.

    Attributes:
      learnable: False gives SPEC's "frozen" RMSNorm: no gain parameter at all.
      gain_init: initial value of every entry of the gain g ([features] float32).
      logical_axis: logical name of the gain's axis (for sharding).
      dtype: output dtype.
    """

    eps: float = 1e-5
    learnable: bool = True
    gain_init: float = 1.0
    logical_axis: str | None = "norm"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gain = None
        if self.learnable:
            gain = self.param(
                "scale",
                nn.with_logical_partitioning(
                    nn.initializers.constant(self.gain_init), (self.logical_axis,)
                ),
                (x.shape[-1],),
                jnp.float32,
            )
        return rms_norm(x, gain, self.eps, jnp.dtype(self.dtype))


@functools.partial(recompute_in_backward, static_argnums=(2, 3))
def rms_norm(x: Array, gain: Array | None, eps: float, dtype: Any) -> Array:
    """``(rms_normalize(x) * gain).astype(dtype)`` (no gain: ``gain=None``); the float32 arithmetic
    is recomputed in the backward, so only ``x`` (and ``gain``) are saved."""
    y = rms_normalize(x, eps)
    if gain is not None:
        y = y * gain
    return y.astype(dtype)


class LayerScale(nn.Module):
    """y = g * x with a per-channel gain g ([features] float32), as in OP's post-"norm"."""

    gain_init: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gain = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.gain_init), ("norm",)),
            (x.shape[-1],),
            jnp.float32,
        )
        return _layer_scale(x, gain, jnp.dtype(self.dtype))


@functools.partial(recompute_in_backward, static_argnums=(2,))
def _layer_scale(x: Array, gain: Array, dtype: Any) -> Array:
    return (x.astype(jnp.float32) * gain).astype(dtype)


def grad_arrives_whole(cfg: Any) -> bool:
    """Whether a block branch's out-projection gets its output gradient as a tensor of its own:
    the residual stream's gradient (pre-norm blocks) or an RMSNorm's VJP (post-norm), both
    written once per layer anyway; not through a LayerScale gain, an elementwise product that XLA
    fuses into the gradient's FP8 cast. Such a projection asks for ``grad_cast_transpose``."""
    return cfg.post_norm != "layerscale"


class Linear(nn.Module):
    """A bias-free linear map whose GEMM comes from the precision recipe.

    Contracts the last ``len(in_axes_names)`` axes of the input with the leading axes of a kernel of
    shape ``x.shape[-n_in:] + features``; the output is ``x.shape[:-n_in] + features``.

    Attributes:
      features: output shape appended after the batch axes, e.g. ``(G, R + 2, d_h)`` for fused QKV.
      kernel_axes: logical names of every kernel axis (input axes first, then ``features``).
      init_std: the kernel is initialised N(0, init_std^2).
      recipe: supplies the dot_general (bf16, FP8 with delayed scaling, ...).
    """

    features: Sequence[int]
    kernel_axes: Sequence[str | None]
    init_std: float
    recipe: Recipe

    @nn.compact
    def __call__(
        self,
        x: Array,
        row_scale: Array | None = None,
        x_amax: Array | None = None,
        observe_grad: bool = True,
        x_fp8: tuple[Array, Array] | None = None,
        grad_cast_transpose: bool = False,
    ) -> Array:
        """x [..., *in] -> [..., *features]; ``row_scale`` [*in] multiplies the kernel's rows.
        ``x_amax``: max|x| (float32 scalar) measured where x is made, for a recipe whose dot takes
        it (``recipe.takes_lhs_amax``; fused_amax.py); ignored otherwise. ``x_fp8``: an E4M3 copy
        of x and its float32 [1] scale_inv that the dot reads instead of casting x (the same
        recipes; fp8_dot.fp8_dot_general's ``lhs_fp8``); refused by any other recipe.
        ``grad_cast_transpose``: this Linear's output gradient arrives as a tensor of its own (a
        norm's VJP, the residual stream's gradient), so the same recipes make its E5M2 cast, its
        transposed copy and its amax in one pass (fp8_dot.fp8_dot_general's); ignored by others."""
        features = tuple(self.features)
        n_in = len(self.kernel_axes) - len(features)
        if n_in < 1:
            raise ValueError(f"Linear {self.name}: kernel_axes must name the input axes too.")
        kernel_shape = tuple(x.shape[-n_in:]) + features
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.init_std), tuple(self.kernel_axes)
            ),
            kernel_shape,
            jnp.float32,
        )
        if row_scale is not None:
            kernel = kernel * row_scale.reshape(row_scale.shape + (1,) * len(features))
        dtype = self.recipe.compute_dtype
        contract_x = tuple(range(x.ndim - n_in, x.ndim))
        contract_k = tuple(range(n_in))
        dot_general = self.recipe.linear_dot_general("dot")
        extra = {}
        if self.recipe.takes_lhs_amax:
            if x_amax is not None:
                extra["lhs_amax"] = x_amax
            if not observe_grad:
                extra["observe_grad"] = False
            if x_fp8 is not None:
                extra["lhs_fp8"] = x_fp8
            if grad_cast_transpose:
                extra["grad_cast_transpose"] = True
        elif x_fp8 is not None:
            raise ValueError(
                f"Linear {self.name}: recipe {self.recipe.name!r} cannot read an FP8 input "
                "(x_fp8); only the delayed-scaling FP8 recipes on XLA do (recipe.takes_lhs_amax)."
            )
        return dot_general(
            x.astype(dtype), kernel.astype(dtype), ((contract_x, contract_k), ((), ())), **extra
        )
