"""Low-precision AdamW state as optax transformations: quantised moments and 16-bit master weights.

- :func:`scale_by_adam_lowp` replaces ``optax.scale_by_adam``: the moments are stored in any of
  :data:`fogjax.optim.moment_formats.MOMENT_FORMATS` and the update math runs in float32
  (dequantise, update, requantise). The step's update uses the float32 moments *before*
  requantisation; only the stored copy is rounded. With float32 moments it is
  ``optax.scale_by_adam`` bit for bit.
- :func:`master_weights` wraps the rest of the chain (Adam, weight decay, learning rate) so that
  it runs on a float32 view of the parameters and rounds the new master once per step, to
  bfloat16 or float16: round to nearest, stochastic rounding (from the step, so a resumed run
  draws the same bits), or a 16-bit remainder kept in the optimizer state that makes bfloat16 +
  remainder exactly the float32 master.

Both accept boxed (``nn.LogicallyPartitioned``) parameters at ``init``, as fogjax.train.run builds
the state abstract-first: every new state leaf shaped like a parameter (stored moments, block
scales, remainders) carries that parameter's logical names, so it is sharded like it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from fogjax.optim import moment_formats as fmts
from fogjax.optim.moment_formats import MomentFormat, Quantized, stochastic_round

MASTER_ROUNDINGS = ("nearest", "stochastic", "remainder")

# Stochastic rounding draws its bits from fold_in(fold_in(key(_SR_SEED), step), leaf index).
_SR_SEED = 0x5EED


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _rebox(box: Any, value: Any) -> Any:
    """``value`` (array or Quantized) boxed with ``box``'s names where its rank matches."""
    if isinstance(value, Quantized):
        return Quantized(_rebox(box, value.values), _rebox(box, value.scale))
    return box.replace_boxed(value) if value.ndim == box.value.ndim else value


def map_like_params(fn: Callable[[Any], Any], params: Any) -> Any:
    """``fn(leaf)`` over ``params``; boxed leaves get their results boxed with the same names."""

    def one(leaf: Any) -> Any:
        return _rebox(leaf, fn(leaf.value)) if _is_box(leaf) else fn(leaf)

    return jax.tree.map(one, params, is_leaf=_is_box)


class ScaleByAdamLowpState(NamedTuple):
    """count: int32 steps; mu, nu: per parameter, a plain array (float32, bfloat16) or a
    :class:`Quantized` (values in the format's dtype + float32 scales)."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_lowp(
    b1: float,
    b2: float,
    eps: float,
    mu_format: MomentFormat,
    nu_format: MomentFormat,
    block_size: int,
    eps_root: float = 0.0,
    stochastic: bool = False,
) -> optax.GradientTransformation:
    """Adam's scaling with moments stored in ``mu_format`` / ``nu_format``, math in float32.

    Gradients of any float dtype are cast to float32 first. Per step and leaf:
    mu = (1-b1) g + b1 decode(mu_stored); nu = (1-b2) g^2 + b2 decode(nu_stored);
    update = mu_hat / (sqrt(nu_hat + eps_root) + eps) with the bias corrections of optax, from these
    float32 moments; then mu_stored, nu_stored = encode(mu), encode(nu). Rounding happens only in
    encode (fogjax.optim.moment_formats). ``block_size``: scale block along the last axis, 0 = one
    scale per tensor. ``stochastic``: requantise with unbiased stochastic rounding (bits from the
    step count, leaf and moment, so a resumed run draws the same and every step draws new ones)
    instead of to nearest: with 3 mantissa bits, a moment whose EMA moves it by less than half a
    grid step per step is otherwise rounded back where it was (the stored sqrt(nu) shrinks by
    2.5% per zero-gradient step at b2 = 0.95; half the E4M3 step below a value is 3.1% to 5.6%
    of it, so an FP8 nu rounded to nearest never decays: fogjax.optim.state_precision refuses
    that configuration).
    """

    def init(params: Any) -> ScaleByAdamLowpState:
        return ScaleByAdamLowpState(
            count=jnp.zeros([], jnp.int32),
            mu=map_like_params(lambda p: fmts.zeros(p.shape, mu_format, block_size, False), params),
            nu=map_like_params(lambda p: fmts.zeros(p.shape, nu_format, block_size, True), params),
        )

    def update(
        updates: Any, state: ScaleByAdamLowpState, params: Any = None
    ) -> tuple[Any, ScaleByAdamLowpState]:
        del params
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda _, m: fmts.decode(m, block_size, False), grads, state.mu)
        nu = jax.tree.map(lambda _, v: fmts.decode(v, block_size, True), grads, state.nu)
        # optax's own moment and bias-correction code, so float32 storage is optax bit for bit.
        mu = optax.tree.update_moment(grads, mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, nu, b2, 2)
        count_inc = numerics.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        leaves_mu, treedef = jax.tree.flatten(mu)
        leaves_nu = treedef.flatten_up_to(nu)
        step_key = jax.random.fold_in(jax.random.key(_SR_SEED + 1), count_inc)

        def key(i: int) -> Any:
            return jax.random.fold_in(step_key, i) if stochastic else None

        n = len(leaves_mu)
        new_mu = [
            fmts.encode(m, mu_format, block_size, False, key(i)) for i, m in enumerate(leaves_mu)
        ]
        new_nu = [
            fmts.encode(v, nu_format, block_size, True, key(n + i)) for i, v in enumerate(leaves_nu)
        ]
        return out, ScaleByAdamLowpState(
            count=count_inc,
            mu=jax.tree.unflatten(treedef, new_mu),
            nu=jax.tree.unflatten(treedef, new_nu),
        )

    return optax.GradientTransformation(init, update)


# --- rounding the master weights ------------------------------------------------------------


def split_bfloat16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 ``x`` -> (bfloat16 hi, int16 remainder) with ``join_bfloat16(hi, rem) == x``
    bit for bit. hi is x rounded to nearest, ties away from zero (the top 16 bits of x's pattern
    after adding half a bfloat16 ulp); rem = bits(x) - bits(hi) << 16, in [-2^15, 2^15)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    hi = (bits + jnp.uint32(0x8000)) >> 16
    rem = jax.lax.bitcast_convert_type(bits - (hi << 16), jnp.int32).astype(jnp.int16)
    return jax.lax.bitcast_convert_type(hi.astype(jnp.uint16), jnp.bfloat16), rem


def join_bfloat16(hi: jax.Array, rem: jax.Array) -> jax.Array:
    """The float32 master held by a bfloat16 ``hi`` and its int16 remainder ``rem``."""
    top = jax.lax.bitcast_convert_type(hi, jnp.uint16).astype(jnp.uint32) << 16
    low = jax.lax.bitcast_convert_type(rem.astype(jnp.int32), jnp.uint32)
    return jax.lax.bitcast_convert_type(top + low, jnp.float32)


class MasterWeightsState(NamedTuple):
    """count: int32 steps (seeds stochastic rounding); remainder: int16 per parameter in
    'remainder' mode, else (); inner: the wrapped chain's state."""

    count: jax.Array
    remainder: Any
    inner: Any


def master_cast(dtype: Any, rounding: str) -> Callable[[Any], Any]:
    """float32 params -> the stored master (boxed trees too): round to nearest even, or ties
    away from zero in 'remainder' mode (so the init state's remainder describes it)."""
    if rounding == "remainder":
        return lambda params: jax.tree.map(lambda p: split_bfloat16(p)[0], params)
    return lambda params: jax.tree.map(lambda p: p.astype(dtype), params)


def master_weights(
    inner: optax.GradientTransformation, dtype: Any, rounding: str
) -> optax.GradientTransformation:
    """Runs ``inner`` on the float32 master and rounds the new master to ``dtype`` once per step.

    The parameters are stored in ``dtype`` (bfloat16 or float16). Per step: p32 = the float32
    master (the stored value, or in 'remainder' mode the stored bfloat16 joined with its int16
    remainder: exactly the float32 master); ``inner`` (Adam, weight decay on p32, learning rate)
    gives u; new32 = p32 + u in float32; the new master is new32 rounded ('nearest': to nearest
    even; 'stochastic': :func:`stochastic_round`; 'remainder': :func:`split_bfloat16`). The
    returned updates are ``new - p`` in float32, which ``optax.apply_updates`` turns back into
    exactly ``new``: the difference of two 16-bit floats is exact in float32 whenever their
    exponents differ by less than 13 (float16) / 16 (bfloat16), i.e. unless one step moves a
    parameter by a factor of thousands.
    """
    if rounding not in MASTER_ROUNDINGS:
        raise ValueError(f"Unknown master rounding {rounding!r}; choose one of {MASTER_ROUNDINGS}.")

    def init(params: Any) -> MasterWeightsState:
        remainder: Any = ()
        if rounding == "remainder":
            remainder = map_like_params(lambda p: split_bfloat16(p)[1], params)
        return MasterWeightsState(jnp.zeros([], jnp.int32), remainder, inner.init(params))

    def update(
        updates: Any, state: MasterWeightsState, params: Any = None
    ) -> tuple[Any, MasterWeightsState]:
        if params is None:
            raise ValueError(
                "master_weights needs the params: call tx.update(grads, state, params)."
            )
        if rounding == "remainder":
            p32 = jax.tree.map(join_bfloat16, params, state.remainder)
        else:
            p32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        inner_updates, inner_state = inner.update(updates, state.inner, p32)
        new32 = jax.tree.map(lambda p, u: p + u.astype(jnp.float32), p32, inner_updates)
        remainder: Any = ()
        if rounding == "nearest":
            new = jax.tree.map(lambda x: x.astype(dtype), new32)
        elif rounding == "stochastic":
            key = jax.random.fold_in(jax.random.key(_SR_SEED), state.count)
            leaves, treedef = jax.tree.flatten(new32)
            new = jax.tree.unflatten(
                treedef,
                [
                    stochastic_round(x, dtype, jax.random.fold_in(key, i))
                    for i, x in enumerate(leaves)
                ],
            )
        else:
            pairs = jax.tree.map(split_bfloat16, new32)
            new = jax.tree.map(lambda _, pr: pr[0], new32, pairs)
            remainder = jax.tree.map(lambda _, pr: pr[1], new32, pairs)
        out = jax.tree.map(lambda n, p: n.astype(jnp.float32) - p.astype(jnp.float32), new, params)
        count = numerics.safe_increment(state.count)
        return out, MasterWeightsState(count, remainder, inner_state)

    return optax.GradientTransformation(init, update)
