"""Storage formats of the AdamW moments: float32, bfloat16, float16, FP8 E4M3 and 8-bit blockwise.

A moment is held in one of :data:`MOMENT_FORMATS` and always *computed* in float32: each step
dequantises it (:func:`decode`), updates it in float32 and requantises it (:func:`encode`).

What is rounded where:

- ``float32``: nothing (a plain float32 array; today's numerics).
- ``bfloat16``: one round-to-nearest-even cast per step (float32's exponent range, so no scale).
- ``float16``, ``float8_e4m3fn``: ``stored = cast(x * scale)`` with one float32 ``scale`` per block
  (or per tensor), a power of two recomputed from the block's current amax so that the amax lands in
  (max/2, max] of the format. Multiplying by a power of two is exact, so the only rounding is the
  cast (round to nearest even, saturating at the format's max); decoding (``stored / scale``) is
  exact.
- ``int8``: linear 8-bit codes ``round(x * scale)`` with ``scale = 127 / amax`` per block (255 for
  the non-negative second moment, stored as uint8): one rounding of ``x * scale`` to float32 and
  one to the integer grid; decoding divides in float32. Always blockwise (an "8-bit blockwise"
  state in the sense of bitsandbytes, with a linear code).

With stochastic moment rounding (``optim.moment_rounding``, fogjax.optim.state_precision) the
cast (or the rounding to integer codes) is an unbiased stochastic rounding instead of round to
nearest; nothing else changes. For sqrt(nu) it is unbiased for nu itself (E[stored^2] = nu, see
:func:`stochastic_round`), so the EMA of nu follows float32's in expectation.

Why the rounding matters (:func:`nearest_min_shrink`): with no gradient a moment shrinks by a fixed
factor per step (mu by b1, nu by b2, the stored sqrt(nu) by sqrt(b2)). Round to nearest puts a
value back on its grid point whenever that shrink is under half a grid step: E4M3's sqrt(nu) at
b2 = 0.95 shrinks by 2.5% a step, under half of any E4M3 step (3.1% to 5.6% of the value), so an
FP8 nu rounded to nearest never decays at all.

Blocks: ``block_size`` consecutive elements along a tensor's last axis; when the last axis is not a
multiple of ``block_size``, the whole last axis is one block. So a block never straddles rows, and
the scales form a ``[..., last // block]`` tensor that is sharded with the parameter's own logical
names (see :func:`block_count`). ``block_size = 0`` means one scale per tensor (a scalar).

The second moment nu >= 0 is stored as sqrt(nu) in the scaled formats (halving its dynamic range
in log terms: E4M3 spans 2^17.8 between its smallest subnormal and its max, so sqrt storage keeps
coordinates whose RMS gradient is 2^17.8 below the block's largest, where nu itself would flush
any coordinate 2^8.9 below). A non-zero sqrt(nu) that would round to 0 is stored as the smallest
positive code instead: a second moment that flushed to zero would turn mu / (sqrt(nu) + eps) into
mu / eps, a step of up to 1e8 x lr. Rounding such a value *up* only shortens that coordinate's step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class MomentFormat:
    """How one moment is stored.

    Attributes:
      name: the config spelling (``optim.mu_dtype`` / ``optim.nu_dtype``).
      storage: the stored array's dtype (for ``int8``: int8 signed, uint8 for nu).
      scaled: whether the stored values carry a per-block (or per-tensor) float32 scale.
      max_value: the largest stored magnitude a scaled format maps the block amax to.
      min_positive: the smallest positive stored value (subnormals included).
      integer: linear integer codes (``int8``) rather than a float format.
    """

    name: str
    storage: Any
    scaled: bool
    max_value: float = 0.0
    min_positive: float = 0.0
    integer: bool = False

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.storage).itemsize)


def _float_format(name: str, dtype: Any, scaled: bool) -> MomentFormat:
    info = ml_dtypes.finfo(dtype)
    return MomentFormat(name, dtype, scaled, float(info.max), float(info.smallest_subnormal))


MOMENT_FORMATS: dict[str, MomentFormat] = {
    "float32": MomentFormat("float32", jnp.float32, scaled=False),
    "bfloat16": MomentFormat("bfloat16", jnp.bfloat16, scaled=False),
    "float16": _float_format("float16", jnp.float16, scaled=True),
    "float8_e4m3fn": _float_format("float8_e4m3fn", jnp.float8_e4m3fn, scaled=True),
    "int8": MomentFormat("int8", jnp.int8, True, 127.0, 1.0, integer=True),
}

# int8's code range when the stored quantity is non-negative (sqrt(nu)): all 8 bits.
_UINT8 = MomentFormat("int8", jnp.uint8, True, 255.0, 1.0, integer=True)


def moment_format(name: str, field: str) -> MomentFormat:
    """The :class:`MomentFormat` named ``name``; ValueError naming ``field`` otherwise."""
    if name not in MOMENT_FORMATS:
        raise ValueError(
            f"Unknown {field}={name!r}; choose one of {list(MOMENT_FORMATS)} "
            f"(e.g. --config.{field}=float16)."
        )
    return MOMENT_FORMATS[name]


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array, square: bool = False) -> jax.Array:
    """float32 ``x`` rounded to ``dtype`` (bfloat16, float16, float8_e4m3fn) up or down at
    random, so that E[result] = x: the neighbour above is taken with probability
    (x - lo) / (hi - lo), from one float32 uniform per element. Values already representable are
    returned unchanged; beyond the largest finite value it saturates.

    ``square`` (for x = sqrt(nu) >= 0): unbiased for x^2 instead, E[result^2] = x^2, taking the
    neighbour above with probability (x^2 - lo^2) / (hi^2 - lo^2). Unbiased in x would inflate nu
    by Var(result) per step, and nu's EMA compounds that (+21% after 20 random-gradient then 100
    zero-gradient steps in E4M3)."""
    x = x.astype(jnp.float32)
    nearest = x.astype(dtype)
    n32 = nearest.astype(jnp.float32)
    top = float(ml_dtypes.finfo(dtype).max)  # Not inf: E4M3 has none (it would cast to NaN).
    other = jnp.nextafter(nearest, jnp.where(n32 > x, -top, top).astype(dtype))
    lo = jnp.minimum(nearest, other)
    hi = jnp.maximum(nearest, other)
    lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
    p_hi = (x - lo32) / (hi32 - lo32)
    if square:  # (x^2 - lo^2) / (hi^2 - lo^2), factored so it keeps float32's precision.
        p_hi = p_hi * (x + lo32) / (hi32 + lo32)
    u = jax.random.uniform(key, x.shape, jnp.float32)
    return jnp.where(n32 == x, nearest, jnp.where(u < p_hi, hi, lo))


class Quantized(NamedTuple):
    """A scaled moment: ``values`` (the parameter's shape, the format's storage dtype) and
    ``scale`` (float32, ``[..., blocks]`` per block or ``[]`` per tensor); x = values / scale."""

    values: jax.Array
    scale: jax.Array


def block_count(shape: tuple[int, ...], block_size: int) -> int:
    """How many blocks the last axis of ``shape`` is cut into (0 for a per-tensor scale)."""
    if block_size == 0 or not shape:
        return 0
    last = shape[-1]
    return last // block_size if last % block_size == 0 else 1


def scale_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Shape of the float32 scale of a tensor of ``shape``: ``[..., blocks]``, or ``[]``."""
    n = block_count(shape, block_size)
    return (*shape[:-1], n) if n else ()


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` [..., last] viewed as [..., blocks, last // blocks] (or [1, size] per tensor)."""
    n = block_count(x.shape, block_size)
    if not n:
        return x.reshape(1, -1)
    return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)


def _scale(amax: jax.Array, fmt: MomentFormat) -> jax.Array:
    """float32 scale per block from its amax (1 where the block is all zeros)."""
    safe = jnp.where(amax > 0, amax, 1.0)
    if fmt.integer:
        return jnp.where(amax > 0, fmt.max_value / safe, 1.0)
    # Power of two 2^e with amax * 2^e in (max/2, max]: frexp is exact, the fix-up covers the
    # rounding of max / amax; e is bounded so the scale stays a finite normal float32.
    _, e = jnp.frexp(fmt.max_value / safe)
    e = jnp.clip(e - 1, -126, 126)
    s = jnp.ldexp(jnp.ones_like(amax), e)
    s = jnp.where(amax * s > fmt.max_value, s * 0.5, s)
    return jnp.where(amax > 0, s, 1.0)


def _quantize_blocks(xb: jax.Array, fmt: MomentFormat, guard: bool, key: Any) -> Quantized:
    amax = jnp.max(jnp.abs(xb), axis=-1)
    scale = _scale(amax, fmt)
    y = jnp.clip(xb * scale[..., None], -fmt.max_value, fmt.max_value)
    if key is None:
        q = (jnp.round(y) if fmt.integer else y).astype(fmt.storage)
    elif fmt.integer:
        u = jax.random.uniform(key, y.shape, jnp.float32)
        if guard:  # y = sqrt(nu) * scale >= 0: up with probability (y^2 - lo^2) / (2 lo + 1).
            lo = jnp.floor(y)
            up = u < (y - lo) * (y + lo) / (2.0 * lo + 1.0)
            q = jnp.minimum(lo + up, fmt.max_value).astype(fmt.storage)
        else:
            q = jnp.clip(jnp.floor(y + u), -fmt.max_value, fmt.max_value).astype(fmt.storage)
    else:
        q = stochastic_round(y, fmt.storage, key, square=guard)
    if guard:  # Non-negative input (sqrt(nu)): never store a non-zero value as 0.
        q = jnp.where((xb > 0) & (q == 0), jnp.asarray(fmt.min_positive, fmt.storage), q)
    return Quantized(q, scale)


def encode(
    x: jax.Array, fmt: MomentFormat, block_size: int, second_moment: bool, key: Any = None
) -> Any:
    """Stores float32 ``x`` in ``fmt``: a plain array (unscaled formats) or a :class:`Quantized`.

    ``second_moment``: ``x`` is nu >= 0; scaled formats then store sqrt(nu) with the zero guard
    (module docstring). ``key``: round stochastically with these random bits instead of to
    nearest, unbiased for ``x`` (for nu too where sqrt(nu) is stored).
    """
    if not fmt.scaled:
        exact = key is None or fmt.name == "float32"
        return x.astype(fmt.storage) if exact else stochastic_round(x, fmt.storage, key)
    if fmt.integer and block_size == 0:
        raise ValueError("int8 moments are blockwise: set optim.state_block_size > 0 (e.g. 128).")
    if second_moment:
        x = jnp.sqrt(x)
        fmt = _UINT8 if fmt.integer else fmt
    q = _quantize_blocks(_blocks(x, block_size), fmt, second_moment, key)
    return Quantized(q.values.reshape(x.shape), q.scale.reshape(scale_shape(x.shape, block_size)))


def decode(stored: Any, block_size: int, second_moment: bool) -> jax.Array:
    """The float32 moment held by ``stored`` (inverse of :func:`encode` up to its rounding)."""
    if not isinstance(stored, Quantized):
        return stored.astype(jnp.float32)
    values = _blocks(stored.values.astype(jnp.float32), block_size)
    scale = stored.scale.reshape(values.shape[:-1])
    x = (values / scale[..., None]).reshape(stored.values.shape)
    return jnp.square(x) if second_moment else x


def stored_shrink(fmt: MomentFormat, factor: float, second_moment: bool) -> float:
    """The relative amount a stored moment shrinks by in one zero-gradient step: 1 - factor
    (mu: b1; nu: b2), or 1 - sqrt(factor) where nu is stored as sqrt(nu) (scaled formats)."""
    kept = math.sqrt(factor) if second_moment and fmt.scaled else factor
    return 1.0 - kept


def nearest_min_shrink(fmt: MomentFormat) -> float:
    """The smallest per-step relative shrink that round-to-nearest never undoes in ``fmt``.

    A float format with p mantissa bits holds x = m 2^e, m = 1 + k 2^-p; the grid step below x is
    2^(e-p) (2^(e-p-1) at k = 0). x (1 - d) rounds back to x while x d is under half that step,
    i.e. d < 2^-(p+1) / m for k >= 1 (ties at k = 1 go down, to the even neighbour) and
    d <= 2^-(p+2) at k = 0. The largest of these bounds is at k = 1:
    d < 2^-(p+1) / (1 + 2^-p) = 1 / (2^(p+1) + 2). Below it some normal grid points are fixed
    points of a zero-gradient step, so a moment reaching one stops decaying; at or below 2^-(p+2)
    every normal value is. E4M3 (p = 3): 1/18 = 5.56% and 3.1%; bfloat16: 0.39%; float16: 0.049%.
    (Subnormals and the smallest normal, in E4M3 values ~2^14 below their block's amax, stall
    at larger shrinks too.)

    0 for float32 (never rounded) and for int8: its codes are relative to a scale that follows the
    block's amax every step, so a block that decays as a whole keeps its codes and decays exactly;
    within a block, codes under 1 / (2 d) stall next to a larger coordinate that does not decay.
    """
    if fmt.name == "float32" or fmt.integer:
        return 0.0
    p = int(ml_dtypes.finfo(fmt.storage).nmant)
    return 1.0 / (2.0 ** (p + 1) + 2.0)


def zeros(shape: tuple[int, ...], fmt: MomentFormat, block_size: int, second_moment: bool) -> Any:
    """The stored form of a zero moment of ``shape`` (what ``optimizer.init`` starts from)."""
    if not fmt.scaled:
        return jnp.zeros(shape, fmt.storage)
    if fmt.integer and block_size == 0:
        raise ValueError("int8 moments are blockwise: set optim.state_block_size > 0 (e.g. 128).")
    storage = jnp.uint8 if (fmt.integer and second_moment) else fmt.storage
    return Quantized(jnp.zeros(shape, storage), jnp.ones(scale_shape(shape, block_size)))
