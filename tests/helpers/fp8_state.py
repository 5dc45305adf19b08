"""``jax.value_and_grad`` for tests of FP8 ops: the ``fp8`` argument's "gradient" is its new state.

The FP8 ops report each tensor's amax as the gradient of its ``scale_inv`` and the train step
updates the states once (fogjax/precision/bulk_scaling.py). These wrappers do the same around one
loss, so a test can step a module and read back updated states, as the train step would produce
them for one micro-batch.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax

from fogjax.precision import bulk_scaling


def value_and_grad(
    loss: Callable[..., Any],
    argnums: Sequence[int],
    fp8_argnum: int,
    has_aux: bool = False,
    reduction: str = "max",
    margin: float = 0,
) -> Callable[..., Any]:
    """Like ``jax.value_and_grad(loss, argnums, has_aux)``, but the gradient of argument
    ``fp8_argnum`` (an ``fp8`` collection, which must be in ``argnums``) is the updated collection.
    """
    argnums = tuple(argnums)
    at = argnums.index(fp8_argnum)

    def wrapped(*args: Any) -> Any:
        observed, fixed = bulk_scaling.split(args[fp8_argnum])

        def inner(*a: Any) -> Any:
            a = list(a)
            a[fp8_argnum] = bulk_scaling.merge(a[fp8_argnum], fixed)
            return loss(*a)

        args = list(args)
        args[fp8_argnum] = observed
        value, grads = jax.value_and_grad(inner, argnums, has_aux=has_aux)(*args)
        grads = list(grads)
        grads[at] = bulk_scaling.apply(observed, fixed, grads[at], reduction, margin)
        return value, tuple(grads)

    return wrapped


def grad(
    loss: Callable[..., Any], argnums: Sequence[int], fp8_argnum: int, has_aux: bool = False
) -> Callable[..., Any]:
    """Like ``jax.grad``; see :func:`value_and_grad`."""
    vg = value_and_grad(loss, argnums, fp8_argnum, has_aux)

    def wrapped(*args: Any) -> Any:
        (value, grads) = vg(*args)
        return (grads, value[1]) if has_aux else grads

    return wrapped
