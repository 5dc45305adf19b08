"""The amax of an activation, measured in the same pass as its FP8 cast.

An FP8 GEMM whose input is an elementwise function of a stored tensor (the FFN's down projection:
``h = act(pre)``) needs two things of ``h``: its E4M3 cast and its amax. Written as
``cast(act(pre))`` and ``amax(act(pre))`` with one shared ``act(pre)``, XLA sees an expensive
producer with two consumers; it will not compute GeLU/SiLU twice, so it writes ``h`` in bf16 and
reads it back for a cast+amax kernel: three passes over an [tokens, F] tensor (write h, read h,
write the FP8 copy) where one read of ``pre`` and one FP8 write would do.

:func:`recomputed_amax` measures the amax on a twin of the inputs that XLA's CSE cannot merge with
the originals (:func:`exact_twin`, a ``reduce_precision`` that is the identity on these values).
Each consumer then owns its own ``act``; both read ``pre`` and XLA's multi-output fusion puts
the cast, the activation and the amax in one kernel. The compiled 1.5B FOG-flash step on a GH200
drops its FFN cast from two kernels over [16384, 12288] (0.54 ms) to one (0.23 ms) per layer and
micro-batch (docs/speed.md). The value is exact: the twin equals its input bit for bit, so the
amax is ``max|act(pre)|`` of the very values the cast quantises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from fogjax.precision import scaling


def exact_twin(x: jax.Array) -> jax.Array:
    """``x`` unchanged (same dtype, same bits), through a ``reduce_precision`` to ``x``'s own
    format in float32 that XLA does not fold away: an expression of the twin is not CSE'd with the
    same expression of ``x``. For float32 ``x`` it is a no-op that XLA may remove (no twin)."""
    info = jnp.finfo(x.dtype)
    wide = x.astype(jnp.float32)
    return lax.reduce_precision(wide, exponent_bits=info.nexp, mantissa_bits=info.nmant).astype(
        x.dtype
    )


def recomputed_amax(fn: Callable[..., jax.Array], *inputs: jax.Array) -> jax.Array:
    """``scaling.amax(fn(*inputs))`` (float32 scalar, no gradient), computed from twins of the
    inputs so that XLA fuses it with whatever else consumes ``fn(*inputs)`` (the FP8 cast). Where
    the batch is split over D > 1 devices, the per-device form [D, 1] (scaling.amax_partials).

    ``fn`` must be elementwise-deterministic (the same inputs give the same bits); an activation
    with parameters is fine (call the same module again).
    """
    twins = [exact_twin(x) for x in inputs]
    devices = scaling.partial_devices()
    if devices > 1:
        # Under FSDP, per device (scaling.amax_partials): the op reports it as such, no all-reduce.
        return lax.stop_gradient(scaling.amax_partials(fn(*twins), devices))
    return lax.stop_gradient(scaling.amax(fn(*twins)))


def activation_observing_grad_amax(
    fn: Callable[[jax.Array], jax.Array], pre: jax.Array, grad_scale_inv: jax.Array
) -> jax.Array:
    """``fn(pre)``, whose backward also reports the amax of ``pre``'s gradient as the "gradient"
    of ``grad_scale_inv`` (scaling.observation): the amax an FP8 dot reports for its output
    gradient, when ``pre`` is that dot's output and the dot is told not to report it itself
    (``observe_grad=False``; the FFN's input projection under GeLU, mlp.py).

    Why: GeLU's backward (float32, erf and exp) is an expensive producer with two consumers, the
    dot's E5M2 cast and the amax; XLA will not compute it twice, so it wrote the gradient in bf16
    and read it back for a cast+amax kernel. Here the amax is measured on bit-identical twins of
    the backward's inputs, as :func:`recomputed_amax` does forward: the cast owns GeLU's backward
    and XLA fuses it, the cast and the amax into one kernel (the 8B FOG-flash step on a GH200:
    114 ms less memory-bound time, docs/speed.md).

    The numbers are unchanged: the gradient of ``pre`` is the VJP of ``fn``, rounded to ``pre``'s
    dtype, and the amax is max|gradient| of those values (bit for bit under the GPU step's
    compiler options, tests/model/test_mlp_grad_amax.py).

    Args:
      fn: elementwise and deterministic, NOT wrapped in ``jax.checkpoint`` (its backward inputs
        would pass an optimisation barrier and the twins could not fuse); e.g.
        ``mlp.gelu_float32``. Only ``pre`` is saved; its float32 math is recomputed backward.
      pre: its input, e.g. bf16 [B, T, F].
      grad_scale_inv: the float32 [1] ``scale_inv`` of the producing dot's gradient state, or
        its [D, 1] ``partials`` where it has them (then the amax is reported per device,
        scaling.amax_partials); only its cotangent is used.
    Returns:
      ``fn(pre)``.
    """
    # Static: how many per-device rows the amax is reported in (0: one [1] amax).
    devices = grad_scale_inv.shape[0] if grad_scale_inv.ndim == 2 else 0
    return _observing(fn, pre, grad_scale_inv, devices)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _observing(fn, pre, grad_scale_inv, devices):
    del grad_scale_inv, devices
    return fn(pre)


def _observing_fwd(fn, pre, grad_scale_inv, devices):
    del grad_scale_inv, devices
    return fn(pre), pre


def _observing_bwd(fn, devices, pre, d_out):
    # Each gradient rounded to pre's dtype by a reduce_precision: fused into the FP8 cast, the
    # convert alone would be dropped where XLA allows excess precision (CPU's default), and the
    # cast would quantise the unrounded float32 values (the GPU step forbids it:
    # train/compiler_options.py).
    d_pre = exact_twin(jax.vjp(fn, pre)[1](d_out)[0])
    # The twins: times a 1 that XLA cannot see through (behind a barrier), so that it neither
    # merges the twin computation with the real one nor writes the twins out. exact_twin would do
    # the first, but pre arrives as a slice of the layer scan's residual stack, and XLA wrote its
    # twin out in bf16 (a [tokens, F] write and read per layer; 88 ms of the 8B step).
    one = lax.optimization_barrier(jnp.ones((), pre.dtype))
    twin_pre, twin_d_out = pre * one, d_out * one.astype(d_out.dtype)
    d_twin = exact_twin(jax.vjp(fn, twin_pre)[1](twin_d_out)[0])
    if devices:
        return d_pre, scaling.amax_partials(d_twin, devices)
    return d_pre, jnp.reshape(scaling.amax(d_twin), (1,))


_observing.defvjp(_observing_fwd, _observing_bwd)
