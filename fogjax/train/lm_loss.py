"""The training loss from the final hidden states: LM head and cross-entropy in chunks of tokens.

The plain path (``Transformer.__call__`` then optax's cross-entropy) materialises the float32 logits
[B, T, V] and, in the backward, their gradient of the same size: at the paper's micro-batch (4 x
4,096 tokens, V = 131,072) 8.6 GB each, written and read several times (max, logsumexp, the
take_along_axis backward as a scatter-add into zeros [B, T, V], the softmax gradient, the two
backward GEMMs). :func:`chunked_cross_entropy` computes the same loss and gradients from the
hidden states [B, T, D] and the head [D, V] a chunk of positions at a time, so that only one
chunk's [b, t_c, V] float32 logits exist at any moment (b = the rows on one device).

Gradients are computed in the forward pass (as Liger Kernel's fused linear cross-entropy does): the
loss is a scalar at the end of the graph, so its cotangent g is a scalar, and the gradients for
g = 1 are saved as the residuals (dhidden [B, T, D] and dhead [D, V], both in the compute dtype) and
scaled by g in the backward (in the train step g = 1 / train.micro_batches: exact for a power of
two, else one more rounding of each gradient element). Each chunk's logits are thus computed once,
not recomputed in the backward: the head costs its three GEMMs, as in the plain path. Evaluated
without differentiation the function computes the loss alone. The first chunk runs outside the
``lax.scan`` over the others, so its float32 dhead starts the sum (no zero [D, V] is written).

Numerics match the plain path's: per chunk, logits = the BF16 GEMM with float32 output of
``fogjax.precision.bf16_dot.bf16_dot_general``; the loss per token is optax's
``logsumexp(logits) - logits[target]`` (jax.nn.logsumexp's formula); dlogits is what autodiff
computes for it, ``exp(logits - max) * (c / sumexp) - onehot * c`` with c = 1 / tokens, the one-hot
built per chunk from an iota (no scatter-add), rounded once to the compute dtype as bf16_dot's
backward does; dhidden = dlogits . head^T is a GEMM in the compute dtype (float32 accumulation
inside), and dhead = hidden^T . dlogits accumulates over the chunks in float32 and is rounded once.
The remaining differences are float32 summation order (the loss, and dhead's accumulation across
chunks) and an occasional last-bit flip of a bf16-rounded dlogit; tests/train/test_lm_loss.py
bounds them.

Sharding: under a mesh (``fogjax.sharding.sharding_context``) the hidden states are split over the
batch axes ('data', 'fsdp') and the head [D, V] like the parameter (D over 'fsdp', V over
'tensor'). The loss runs in ``shard_map``: every device chunks its own rows along the sequence (no
gather of the batch), gathers the head's D over 'fsdp' once (FSDP), and with V split over 'tensor'
computes the vocab-parallel (Megatron) cross-entropy: max, sum of exponentials and target logit
reduced over 'tensor', dhidden summed over 'tensor'. dhead is accumulated locally over all chunks,
rounded to the compute dtype, then summed over the batch axes once (reduce-scattered over 'fsdp'
into the parameter's sharding), not once per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fogjax.sharding import is_partitioned, mesh_axis_of, split_axis, split_batch_axes

# The mesh axes fogjax.sharding.LOGICAL_AXIS_RULES maps the head's 'embed' and 'vocab' onto.
EMBED_AXIS = mesh_axis_of("embed")
VOCAB_AXIS = mesh_axis_of("vocab")


def check_chunk_tokens(chunk_tokens: object) -> None:
    """ValueError naming ``train.loss_chunk_tokens`` and the fix unless it is an int >= 0."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(
            f"train.loss_chunk_tokens={chunk_tokens!r} must be a non-negative integer: the tokens "
            "per device in one chunk of the LM head and loss (0 = the whole float32 logits at "
            "once), e.g. --config.train.loss_chunk_tokens=8192."
        )


def chunk_plan(rows: int, length: int, chunk_tokens: int) -> tuple[int, int]:
    """(positions per chunk, chunks) for ``rows`` x ``length`` tokens on one device.

    A chunk takes the same positions of every row, about ``chunk_tokens`` tokens in all (at least
    one position); the chunks are balanced, so the last one is padded by fewer than ``chunks``
    positions (none when the chunk length divides ``length``).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1.")
    per_chunk = max(1, min(length, chunk_tokens // rows))
    chunks = -(-length // per_chunk)
    return -(-length // chunks), chunks


def chunked_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int
) -> jax.Array:
    """Mean token cross-entropy of ``hidden @ head`` against ``targets``, a chunk at a time.

    Args:
      hidden: the final hidden states [B, T, D] in the compute dtype (after the final norm).
      head: the LM head [D, V] in the same dtype (the tied embedding transposed, or ``lm_head``).
      targets: int32 [B, T] in [0, V).
      chunk_tokens: tokens per chunk on one device (>= 1; :func:`chunk_plan`).
    Returns:
      float32 scalar, equal (to float32 summation order) to
      ``optax.softmax_cross_entropy_with_integer_labels(bf16_dot_general(hidden, head), targets)
      .mean()``; its gradients with respect to ``hidden`` and ``head`` are in their dtypes.
    """
    check_chunk_tokens(chunk_tokens)
    if chunk_tokens == 0:
        raise ValueError(
            "chunked_cross_entropy needs chunk_tokens >= 1 (0 is the full-logits path)."
        )
    if hidden.dtype != head.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and head ({head.dtype}) must share a dtype.")
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or head.shape[0] != hidden.shape[2]:
        raise ValueError(
            f"shapes hidden {hidden.shape}, head {head.shape}, targets {targets.shape}: expected "
            "[B, T, D], [D, V], [B, T]."
        )
    return _cross_entropy(hidden, head, targets, chunk_tokens)


@dataclasses.dataclass(frozen=True)
class _Axes:
    """The mesh axes one device's part of the loss reduces over (empty / None: none)."""

    batch: tuple[str, ...] = ()  # the hidden states' rows are split over these
    embed: str | None = None  # the head's D is split over this one (and gathered inside)
    vocab: str | None = None  # the head's V is split over this one (vocab-parallel loss)

    @property
    def head_replicas(self) -> tuple[str, ...]:
        """Batch axes the head is whole on: its gradient's partial sums add up over them."""
        return tuple(a for a in self.batch if a != self.embed)


def _split(x: jax.Array, per_chunk: int, chunks: int) -> jax.Array:
    """[b, t, ...] -> [chunks, b, per_chunk, ...], zero-padded along t."""
    b, t = x.shape[:2]
    pad = chunks * per_chunk - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, chunks, per_chunk, *x.shape[2:]), 1, 0)


def _merge(x: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`_split`: [chunks, b, per_chunk, ...] -> [b, length, ...]."""
    chunks, b, per_chunk = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, chunks * per_chunk, *x.shape[3:])[:, :length]


def _local(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    chunk_tokens: int,
    count: int,
    axes: _Axes,
    grads: bool,
) -> tuple[jax.Array, ...]:
    """One device's part: (loss, and with ``grads`` dhidden and dhead for a cotangent of 1).

    ``hidden`` [b, T, D] are this device's rows; ``head`` [D or D / fsdp, V or V / tensor];
    ``count`` the global number of tokens (the mean's divisor).
    """
    if axes.embed is not None:
        head = lax.all_gather(head, axes.embed, axis=0, tiled=True)
    rows, length, _ = hidden.shape
    per_chunk, chunks = chunk_plan(rows, length, chunk_tokens)
    valid = jnp.ones((rows, length), jnp.bool_)
    xs = tuple(_split(x, per_chunk, chunks) for x in (hidden, targets, valid))
    offset = 0 if axes.vocab is None else lax.axis_index(axes.vocab) * head.shape[1]

    def over_vocab(x: jax.Array, reduce: Any) -> jax.Array:
        return x if axes.vocab is None else reduce(x, axes.vocab)

    def chunk(h: jax.Array, y: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        """(loss sum, and with ``grads`` dhidden [b, t_c, D] and dhead [D, V] float32)."""
        # bf16_dot_general's forward: low-precision operands, float32 output.
        logits = lax.dot_general(
            h, head, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        m = over_vocab(jnp.max(logits, axis=-1), lax.pmax)
        e = jnp.exp(logits - m[..., None])
        s = over_vocab(jnp.sum(e, axis=-1), lax.psum)
        hit = lax.broadcasted_iota(jnp.int32, logits.shape, 2) + offset == y[..., None]
        target_logit = over_vocab(jnp.sum(jnp.where(hit, logits, 0.0), axis=-1), lax.psum)
        # jax.nn.logsumexp's formula, as optax's loss computes it.
        loss = (jnp.log(s) + m) - target_logit
        total = jnp.sum(jnp.where(v, loss, 0.0))
        if not grads:
            return (total,)
        # What autodiff of that loss (times 1 / count, the mean) gives, rounded to the compute
        # dtype once, as bf16_dot_general's backward rounds its float32 cotangent.
        c = jnp.where(v, jnp.float32(1.0) / count, 0.0)
        dlogits = e * (c / s)[..., None]
        dlogits = jnp.where(hit, dlogits - c[..., None], dlogits).astype(h.dtype)
        dh = lax.dot_general(
            dlogits, head, (((2,), (1,)), ((), ())), preferred_element_type=h.dtype
        )
        dw = lax.dot_general(
            h, dlogits, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32
        )
        return total, over_vocab(dh, lax.psum), dw

    # The first chunk outside the loop: its dhead starts the float32 sum (no zero [D, V] to write).
    first = chunk(*(x[0] for x in xs))
    if chunks == 1:
        total, dh, dw = first if grads else (first[0], None, None)
        dh = None if dh is None else dh[None]
    else:

        def body(carry: tuple[jax.Array, ...], x: tuple[jax.Array, ...]) -> tuple[tuple, Any]:
            out = chunk(*x)
            if not grads:
                return (carry[0] + out[0],), None
            return (carry[0] + out[0], carry[1] + out[2]), out[1]

        init = (first[0], first[2]) if grads else (first[0],)
        carry, rest = lax.scan(body, init, tuple(x[1:] for x in xs))
        total, dw = carry if grads else (carry[0], None)
        dh = None if rest is None else jnp.concatenate([first[1][None], rest])
    if axes.batch:
        total = lax.psum(total, axes.batch)
    loss = total / count
    if not grads:
        return (loss,)
    dw = dw.astype(head.dtype)
    if axes.head_replicas:
        dw = lax.psum(dw, axes.head_replicas)
    if axes.embed is not None:
        dw = lax.psum_scatter(dw, axes.embed, scatter_dimension=0, tiled=True)
    return loss, _merge(dh, length), dw


def _run(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int, grads: bool
) -> tuple[jax.Array, ...]:
    """:func:`_local` on one device, or in ``shard_map`` over the active mesh; its ops are named
    ``chunked_cross_entropy/...`` in profiles and HLO (autodiff would name them ``jvp()``)."""
    with jax.named_scope("chunked_cross_entropy"):
        return _run_in_scope(hidden, head, targets, chunk_tokens, grads)


def _run_in_scope(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int, grads: bool
) -> tuple[jax.Array, ...]:
    count = math.prod(targets.shape)
    mesh = jax.sharding.get_abstract_mesh()
    if not is_partitioned(mesh):  # one device, or every multi-device axis already manual
        return _local(
            hidden, head, targets, chunk_tokens=chunk_tokens, count=count, axes=_Axes(), grads=grads
        )
    batch = split_batch_axes(mesh, hidden.shape[0])
    embed = split_axis(mesh, EMBED_AXIS, head.shape[0])
    axes = _Axes(
        batch=batch,
        # Gathered inside and reduce-scattered back; only where the rows are split over it too
        # (else the head is gathered on entry and its gradient summed whole).
        embed=embed if embed in batch else None,
        vocab=split_axis(mesh, VOCAB_AXIS, head.shape[1]),
    )
    rows = P(batch or None, None, None)
    head_spec = P(axes.embed, axes.vocab)
    local = functools.partial(
        _local, chunk_tokens=chunk_tokens, count=count, axes=axes, grads=grads
    )
    out_specs = (P(), rows, head_spec) if grads else (P(),)
    # check_vma=False: never differentiated (the VJP below is written out), and the collectives
    # above make every output what its spec says.
    return jax.shard_map(
        local,
        in_specs=(rows, head_spec, P(batch or None, None)),
        out_specs=out_specs,
        check_vma=False,
    )(hidden, head, targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int
) -> jax.Array:
    return _run(hidden, head, targets, chunk_tokens, grads=False)[0]


def _fwd(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    loss, dhidden, dhead = _run(hidden, head, targets, chunk_tokens, grads=True)
    return loss, (dhidden, dhead)


def _bwd(
    chunk_tokens: int, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array, None]:
    del chunk_tokens

    def scaled(x: jax.Array) -> jax.Array:  # exact when g is a power of two (1 / batch parts)
        return (x.astype(jnp.float32) * g).astype(x.dtype)

    dhidden, dhead = residuals
    return scaled(dhidden), scaled(dhead), None


_cross_entropy.defvjp(_fwd, _bwd)
