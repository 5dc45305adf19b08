"""The scanned block saves its small float32 residuals for the backward as ONE array per layer.

Under ``nn.scan`` every residual the backward needs becomes a stacked [L, ...] output of the
forward loop, written by its own dynamic-update-slice kernel once per layer and micro-batch. A
delayed-scaled FP8 block saves several tiny ones: a float32 [5] per FP8 Linear (the scales its
GEMMs used and the amaxes its operands had, fp8_dot.py) and a float32 [15] from cuDNN FP8 attention
(cudnn_attention.py), i.e. five 20-byte writes per layer. The backward reads each of them through
its own tiny fusion (slice, multiply, convert) before handing the scalars to cuBLAS; XLA merges
such sibling fusions only when they read the same operand.

:class:`PackedResidualBlock` is :class:`~fogjax.model.blocks.Block` with a custom VJP whose
forward runs the block's own VJP (``nn.vjp``) and concatenates every float32 residual of at most
:data:`MAX_PACKED_SIZE` elements into one vector; its backward splits that vector back and calls
the same VJP. Under FSDP the per-device amaxes ([D, k] float32, split over the devices;
scaling.amax_partials) go into a second array, [D, n], instead. The backward computes exactly
what it computed before, from the same bits (a concatenation and its slices move values, they
never round), so gradients and the amaxes the step observes are unchanged bit for bit
(tests/model/test_packed_residuals.py); only the kernel count of the compiled step moves
(docs/speed.md).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fogjax.model.blocks import Block
from fogjax.precision import scaling

# The largest residual (in elements) that goes into the packed vector. Per-tensor scales and amaxes
# are [1]-[15]; activations are thousands of elements and stay separate arrays.
MAX_PACKED_SIZE = 64

Array = jax.Array


def _small_float32(leaf: Any, size: int) -> bool:
    return (
        isinstance(leaf, jax.Array | jax.core.Tracer)
        and leaf.dtype == jnp.float32
        and math.prod(leaf.shape) <= size
    )


def _per_device(leaf: Any, devices: int) -> bool:
    """A [D, k] float32 of per-device amaxes (scaling.amax_partials), split over the devices: it
    joins the [D, n] matrix, not the replicated vector (a concatenation with replicated values
    would gather it onto every device)."""
    return (
        devices > 1
        and _small_float32(leaf, devices * MAX_PACKED_SIZE)
        and leaf.ndim == 2
        and leaf.shape[0] == devices
    )


def pack(
    leaves: list[Any], devices: int = 1
) -> tuple[Array | None, Array | None, list[Any], tuple[tuple[str, tuple[int, ...]] | None, ...]]:
    """Splits residual ``leaves`` into (the small float32 ones concatenated as one vector, or
    None; the [D, k] per-device ones, ``devices`` = D > 1, concatenated as one [D, n] matrix, or
    None; the others, in order; per leaf where it went and its shape, or None for the others)."""
    packed, per_device, rest, shapes = [], [], [], []
    for leaf in leaves:
        if _per_device(leaf, devices):
            per_device.append(leaf)
            shapes.append(("per_device", tuple(leaf.shape)))
        elif _small_float32(leaf, MAX_PACKED_SIZE):
            packed.append(jnp.ravel(leaf))
            shapes.append(("vector", tuple(leaf.shape)))
        else:
            rest.append(leaf)
            shapes.append(None)
    vector = jnp.concatenate(packed) if packed else None
    matrix = jnp.concatenate(per_device, axis=1) if per_device else None
    return vector, matrix, rest, tuple(shapes)


def unpack(
    vector: Array | None,
    matrix: Array | None,
    rest: list[Any],
    shapes: tuple[tuple[str, tuple[int, ...]] | None, ...],
) -> list[Any]:
    """The inverse of :func:`pack`: the leaves in their original order and shapes."""
    leaves, others, offset, column = [], iter(rest), 0, 0
    for where in shapes:
        if where is None:
            leaves.append(next(others))
            continue
        kind, shape = where
        if kind == "per_device":
            leaves.append(matrix[:, column : column + shape[1]])
            column += shape[1]
            continue
        size = math.prod(shape)
        leaves.append(vector[offset : offset + size].reshape(shape))
        offset += size
    return leaves


class PackedResidualBlock(Block):
    """:class:`Block` whose backward reads its small float32 residuals from one packed vector.

    Same variables, names, outputs and gradients as :class:`Block`; only how the residuals are
    stored differs. Every collection is differentiated inside (the outer gradient keeps what it
    asks for): a custom VJP may not close over the traced variables of the layer scan, which a
    non-differentiated collection (the once-per-step FP8 weights) would be. For the same reason
    the block must not draw random numbers (``Recipe.packs_block_residuals``).
    """

    def __call__(
        self, x: Array, positions: Array, segments: Array | None = None
    ) -> tuple[Array, None]:
        # The treedef and packing layout found by the forward, for the backward of the same trace.
        layout: dict[str, Any] = {}

        def block(mdl: Block, x: Array, positions: Array, segments: Array | None) -> Any:
            return Block.__call__(mdl, x, positions, segments)

        def forward(mdl: Block, x: Array, positions: Array, segments: Array | None) -> Any:
            y, vjp_fn = nn.vjp(block, mdl, x, positions, segments, vjp_variables=True)
            # The backward as a jaxpr whose constants are every value it reads: the residuals. (The
            # vjp function itself also closes over values, e.g. the variables it does not
            # differentiate, that its pytree leaves do not hold.)
            y_t = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), y)
            closed, out_shape = jax.make_jaxpr(vjp_fn, return_shape=True)(y_t)
            layout["jaxpr"], layout["out_tree"] = closed.jaxpr, jax.tree.structure(out_shape)
            devices = scaling.partial_devices()
            vector, matrix, rest, layout["shapes"] = pack(list(closed.consts), devices)
            return y, (vector, matrix, rest)

        def backward(residuals: Any, y_t: Any) -> Any:
            consts = unpack(*residuals, layout["shapes"])
            out = jax.core.eval_jaxpr(layout["jaxpr"], consts, *jax.tree.leaves(y_t))
            return jax.tree.unflatten(layout["out_tree"], out)

        call = nn.custom_vjp(block, forward, backward, grad_vars=True)
        return call(self, x, positions, segments)
