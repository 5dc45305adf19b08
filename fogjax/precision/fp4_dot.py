"""An FP4 ``dot_general`` for block linears: all three GEMMs on FP4-quantised operands (emulated).

With X [M, K] the activation (M = tokens, K = input features), W [K, N] the kernel and G [M, N]
the output gradient, and every operand quantised from its high-precision copy in its own
orientation, blocks along THAT GEMM's contraction axis (docs/spec.md §6, "FP4 All the Way" §4):

    forward      Y  = RtN(X; K) @ RtN(W; K)
    data grad    dX = SR(G; N)  @ RtN(W; N)^T
    weight grad  dW = SR(X^T; M) @ SR(G; M)        (RtN(X^T; M) with ``sr_activations=False``)

Options from NVIDIA's NVFP4 recipe (arXiv 2509.25149): ``weight_2d`` quantises W once in 16x16
tiles, so the forward and data-gradient GEMMs see the same quantised W; ``hadamard_wgrad`` applies
a 16x16 random Hadamard transform along M to both weight-gradient operands (fp4_hadamard.py).
``backward='bf16'`` is quantisation-aware finetuning (QAF): FP4 forward, plain backward.

Emulation: each operand becomes ``values * tensor_scale`` (fp4_quant.Quantized), ``values`` exact
in bfloat16, and each GEMM is a bfloat16 GEMM with float32 accumulation times the two tensor scales.
That is the arithmetic of an FP4 tensor core, on any device, and slower than a plain BF16 GEMM.

Stochastic rounding draws from a key the module takes from the ``fp4`` rng stream (train step:
fold_in(key(seed), step), split over nn.scan's layers, folded with the module path by Flax), then
folded with 0 (G in the data grad), 1 (G in the weight grad), 2 (X^T) and 3 (Hadamard signs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fogjax.precision import fp4_hadamard, fp4_quant
from fogjax.precision.fp4_quant import Fp4Format, Quantized

# The rng stream the train step provides for stochastic rounding.
FP4_RNG = "fp4"
# Forward-operand statistics are sown here on statistics steps (when the collection is mutable).
FP4_STATS_COLLECTION = "fp4_stats"
BACKWARDS = ("fp4", "bf16")
# The named scope of every emulated FP4 GEMM.
FP4_GEMM_SCOPE = "fp4_gemm"


@dataclasses.dataclass(frozen=True)
class Fp4GemmConfig:
    """Static choices of one FP4 dot (hashable: a nondiff argument of the custom VJP).

    Attributes:
      fmt: the FP4 format (fp4_quant.NVFP4 or MXFP4).
      backward: 'fp4' (all three GEMMs quantised) or 'bf16' (QAF: only the forward is).
      sr_activations: SR (True, the paper) or RtN on X^T in the weight gradient.
      weight_2d: 2D block scales for W.
      hadamard_wgrad: random Hadamard transform on the weight-gradient inputs.
      has_key: an ``fp4`` rng was given (needed by SR, i.e. by any FP4 backward).
    """

    fmt: Fp4Format
    backward: str = "fp4"
    sr_activations: bool = True
    weight_2d: bool = False
    hadamard_wgrad: bool = False
    has_key: bool = True


def _q(x: jax.Array, fmt: Fp4Format, rounding: str, key: jax.Array | None) -> Quantized:
    return fp4_quant.quantize(x, fmt, rounding, key)


def _gemm(a: Quantized, b_t: Quantized) -> jax.Array:
    """a [P, R] @ b_t [Q, R]^T -> float32 [P, Q]: bf16 GEMM (exact operands), f32 accumulation.

    Named ``fp4_gemm`` (jaxpr name stack, HLO op metadata): profiles and tests find FP4 GEMMs."""
    with jax.named_scope(FP4_GEMM_SCOPE):
        out = lax.dot_general(
            a.values.astype(jnp.bfloat16),
            b_t.values.astype(jnp.bfloat16),
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
    return out * (a.tensor_scale * b_t.tensor_scale)


def _weight_forward_and_dgrad(w: jax.Array, cfg: Fp4GemmConfig) -> tuple[Quantized, Quantized]:
    """(W^T quantised along K as [N, K], W quantised along N as [K, N]), both RtN."""
    if cfg.weight_2d:
        q = fp4_quant.quantize_2d(w, cfg.fmt)
        return Quantized(q.values.T, q.tensor_scale, q.block_scale), q
    return _q(w.T, cfg.fmt, "rtn", None), _q(w, cfg.fmt, "rtn", None)


def _forward(x, w, cfg: Fp4GemmConfig) -> jax.Array:
    w_t, _ = _weight_forward_and_dgrad(w, cfg)
    return _gemm(_q(x, cfg.fmt, "rtn", None), w_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp4_matmul(x: jax.Array, w: jax.Array, key_data: jax.Array, cfg: Fp4GemmConfig) -> jax.Array:
    """x [M, K] @ w [K, N] -> float32 [M, N] with FP4 GEMMs (module docstring).

    Args:
      x, w: float operands (bf16 or f32); quantised in float32.
      key_data: uint32 raw key data (``jax.random.key_data``) for stochastic rounding.
      cfg: the static choices.
    Under ``jax.grad`` x and w get gradients in their own dtypes; the key gets none.
    """
    return _forward(x, w, cfg)


def _fwd(x, w, key_data, cfg):
    return _forward(x, w, cfg), (x, w, key_data)


def _bwd(cfg: Fp4GemmConfig, residuals, g):
    x, w, key_data = residuals
    if cfg.backward == "bf16":
        g = g.astype(x.dtype)
        dx = jnp.matmul(g, w.T.astype(x.dtype), preferred_element_type=jnp.float32)
        dw = jnp.matmul(x.T, g, preferred_element_type=jnp.float32)
        return dx.astype(x.dtype), dw.astype(w.dtype), None
    if not cfg.has_key:
        raise ValueError(
            "An FP4 backward pass needs the 'fp4' rng for stochastic rounding: apply the model "
            "with rngs={'fp4': fold_in(key(seed), step)}, as fogjax.train.step does."
        )
    key = jax.random.wrap_key_data(key_data)
    k_dgrad, k_wgrad, k_act, k_hadamard = (jax.random.fold_in(key, i) for i in range(4))
    fmt = cfg.fmt
    _, w_n = _weight_forward_and_dgrad(w, cfg)
    dx = _gemm(_q(g, fmt, "sr", k_dgrad), w_n)  # [M, N] @ [K, N]^T
    x_t, g_t = x.T, g.T  # [K, M], [N, M]: the weight gradient contracts over M
    if cfg.hadamard_wgrad:
        m = fp4_hadamard.random_hadamard(k_hadamard)
        x_t = fp4_hadamard.transform_last_axis(x_t, m)
        g_t = fp4_hadamard.transform_last_axis(g_t, m)
    act_rounding = "sr" if cfg.sr_activations else "rtn"
    dw = _gemm(_q(x_t, fmt, act_rounding, k_act), _q(g_t, fmt, "sr", k_wgrad))  # [K, N]
    return dx.astype(x.dtype), dw.astype(w.dtype), None


fp4_matmul.defvjp(_fwd, _bwd)


def _linear_layout(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> int:
    """Number of contracted axes if the dims are a block linear's (lhs trailing axes with rhs
    leading axes, in order, no batch axes); raises ValueError otherwise."""
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    expected = (tuple(range(lhs.ndim - n, lhs.ndim)), tuple(range(n)))
    if lb or rb or (tuple(lc), tuple(rc)) != expected:
        raise ValueError(
            f"Fp4DotGeneral supports block linears only (lhs trailing axes contracted with rhs "
            f"leading axes, no batch axes); got dimension_numbers={dimension_numbers}. Attention "
            "products stay in BF16 or FP8 (precision.attention)."
        )
    return n


def _flat_stats(x: jax.Array, q: Quantized) -> dict[str, jax.Array]:
    """Fraction of nonzero entries flushed to zero, and the range of the nonzero block scales."""
    used = q.block_scale > 0
    big = jnp.finfo(jnp.float32).max
    return {
        "zero_fraction": jnp.mean((x != 0) & (q.values == 0), dtype=jnp.float32),
        "scale_min": jnp.min(jnp.where(used, q.block_scale, big), initial=big),
        "scale_max": jnp.max(jnp.where(used, q.block_scale, 0.0), initial=0.0),
    }


def operand_stats(x2: jax.Array, w2: jax.Array, cfg: Fp4GemmConfig) -> dict[str, Any]:
    """Forward-operand statistics {'lhs': ..., 'rhs': ...} (float32 scalars) of x [M, K], w [K, N].

    zero_fraction: nonzero entries whose FP4 value is 0; scale_min / scale_max: the smallest and
    largest stored block scale over blocks that are not all zero (E4M3 or E8M0 units).
    """
    w_t, _ = _weight_forward_and_dgrad(w2, cfg)
    return {
        "lhs": _flat_stats(x2.astype(jnp.float32), _q(x2, cfg.fmt, "rtn", None)),
        "rhs": _flat_stats(w2.T.astype(jnp.float32), w_t),
    }


class Fp4DotGeneral(nn.Module):
    """A drop-in ``dot_general`` for block linears whose three GEMMs run in (emulated) FP4.

    No variables. Draws one key per call from the ``fp4`` rng stream when it is present; without
    it (init, eval) the forward works and an FP4 backward raises. When the ``fp4_stats``
    collection is mutable (statistics steps, decided at trace time), sows ``lhs`` and ``rhs``
    dicts of :func:`operand_stats`.

    Attributes:
      fmt_name: 'nvfp4' or 'mxfp4'.
      backward, sr_activations, weight_2d, hadamard_wgrad: see Fp4GemmConfig.
    """

    fmt_name: str = "nvfp4"
    backward: str = "fp4"
    sr_activations: bool = True
    weight_2d: bool = False
    hadamard_wgrad: bool = False

    @nn.compact
    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Sequence[Any],
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
        """``lax.dot_general``'s contract for x [..., *in] and kernel [*in, *out]; the result has
        ``preferred_element_type`` if given, else the operands' common dtype. ``precision`` is
        ignored: the GEMM is fixed (bf16 operands, f32 accumulation)."""
        del precision
        n = _linear_layout(lhs, rhs, dimension_numbers)
        out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
        batch_shape, in_shape, out_shape = lhs.shape[: lhs.ndim - n], rhs.shape[:n], rhs.shape[n:]
        x2 = lhs.reshape(math.prod(batch_shape), math.prod(in_shape))
        w2 = rhs.reshape(math.prod(in_shape), math.prod(out_shape))
        has_key = self.has_rng(FP4_RNG)
        key = self.make_rng(FP4_RNG) if has_key else jax.random.key(0)
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        cfg = Fp4GemmConfig(
            fp4_quant.FORMATS[self.fmt_name],
            self.backward,
            self.sr_activations,
            self.weight_2d,
            self.hadamard_wgrad,
            has_key,
        )
        if self.is_mutable_collection(FP4_STATS_COLLECTION):
            for name, stats in operand_stats(x2, w2, cfg).items():
                self.sow(
                    FP4_STATS_COLLECTION,
                    name,
                    stats,
                    init_fn=lambda: {},
                    reduce_fn=lambda _, new: new,
                )
        out = fp4_matmul(x2, w2, key, cfg)
        return out.reshape(*batch_shape, *out_shape).astype(out_dtype)
