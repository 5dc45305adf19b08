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
    inputs so that XLA fuses it with whatever else consumes ``fn(*inputs)`` (the FP8 cast).

    ``fn`` must be elementwise-deterministic (the same inputs give the same bits); an activation
    with parameters is fine (call the same module again).
    """
    twins = [exact_twin(x) for x in inputs]
    return lax.stop_gradient(scaling.amax(fn(*twins)))
