"""Autoregressive decoding with a KV cache: prefill the prompts, then one token per step.

    decoder = Decoder(model_cfg, recipe, variables, cache_length=T, mesh=mesh)
    out = decoder.generate(prompts, max_new_tokens=64, sampling=Sampling(temperature=0.8, top_k=40))

The cache is the Flax ``cache`` collection of a Transformer built with ``decode_length=T``
(fogjax/model/attention.py), stacked [L, B, T, G, d_h] under nn.scan like every per-layer
variable. Prompts are right-padded to a length bucket (a power of two), so the prefill compiles
once per bucket and the one-token step once per batch size (sampling settings are traced, so
changing them recompiles nothing); token i of row b sits at position i
and cache slot i, and a row's generated tokens continue at its own length, overwriting its padding.

FP8 recipes decode with the checkpoint's delayed scales as they are: the forward pass of the FP8
dot_generals reads the ``fp8`` collection and never writes it, and it is not mutable here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fogjax import sharding
from fogjax.model import Transformer
from fogjax.model.attention import CACHE_COLLECTION
from fogjax.precision.recipe import Recipe

Array = jax.Array

# Smallest prompt bucket: shorter prompts share one compilation.
MIN_BUCKET = 16


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens to generate) does not fit in the model's context."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits.

    Attributes:
      temperature: 0 = greedy (argmax); else logits / temperature are sampled.
      top_k: keep the k most likely tokens (0 = all).
      top_p: keep the smallest set of most likely tokens whose probability reaches p (1 = all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def as_arrays(self) -> tuple[Array, Array, Array]:
        """(temperature, top_k, top_p) as scalars for :func:`sample_tokens`."""
        return (
            jnp.float32(self.temperature),
            jnp.int32(self.top_k),
            jnp.float32(self.top_p),
        )

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter).")


GREEDY = Sampling()


def sample_tokens(
    logits: Array, rng: Array, temperature: Array, top_k: Array, top_p: Array
) -> Array:
    """Next tokens int32 [B] from float32 logits [B, V].

    ``temperature``, ``top_k`` and ``top_p`` (see :class:`Sampling`) are scalars that may be
    traced, so one compilation serves every setting; temperature 0 gives the argmax.
    """
    logits = logits.astype(jnp.float32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    descending = -jnp.sort(-scaled, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take(descending, k - 1, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    # The first sorted index where the cumulative probability reaches p is the last one kept.
    before = jnp.cumsum(probs, axis=-1) - probs
    last = jnp.sum(before < top_p, axis=-1) - 1
    nucleus = jnp.take_along_axis(descending, last[:, None], axis=-1)[:, 0]
    # top_p = 1 keeps everything exactly (a float32 cumsum may pass 1 before the tail).
    threshold = jnp.maximum(kth, jnp.where(top_p < 1, nucleus, -jnp.inf))
    sampled = jax.random.categorical(rng, jnp.where(scaled < threshold[:, None], -jnp.inf, scaled))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def bucket_length(n: int, limit: int) -> int:
    """The smallest power of two >= max(n, MIN_BUCKET), capped at ``limit``."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), limit)


def decoding_model(model_cfg: Any, recipe: Recipe, cache_length: int) -> Transformer:
    """The Transformer of ``model_cfg`` with a KV cache of ``cache_length`` slots."""
    return Transformer(
        ml_collections.FrozenConfigDict(model_cfg), recipe, decode_length=cache_length
    )


def init_cache(model: Transformer, batch: int) -> Any:
    """A zero KV cache for ``batch`` rows: {'layers': {'attn': {'key', 'value'}}} stacked [L, ...]
    under nn.scan (arrays [L, B, S, G, d_h] in the compute dtype)."""
    tokens = jnp.zeros((batch, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[CACHE_COLLECTION])


def cached_forward(
    model: Transformer, variables: dict, cache: Any, tokens: Array, positions: Array
) -> tuple[Array, Any]:
    """(logits [B, T, V] float32, updated cache) for ``tokens`` [B, T] at ``positions`` [B, T];
    only the cache is mutable, so the FP8 state in ``variables`` is read, never written."""
    logits, mutated = model.apply(
        {**variables, CACHE_COLLECTION: cache}, tokens, positions, mutable=[CACHE_COLLECTION]
    )
    return logits, mutated[CACHE_COLLECTION]


class Decoder:
    """Batched sampling from a model's variables with a KV cache.

    Args:
      model_cfg: the run's `model` config section.
      recipe: the precision recipe the variables belong to (``fp8`` state present iff FP8).
      variables: {'params': ..., 'fp8': ...} (unboxed, possibly sharded on ``mesh``).
      cache_length: KV-cache slots = the longest prompt + generation (the training context).
      mesh: the device mesh; batch rows are split over its ('data', 'fsdp') axes.
    """

    def __init__(
        self,
        model_cfg: Any,
        recipe: Recipe,
        variables: dict,
        cache_length: int,
        mesh: jax.sharding.Mesh,
    ):
        self.model = decoding_model(model_cfg, recipe, cache_length)
        self.variables = variables
        self.cache_length = cache_length
        self.mesh = mesh
        self._compiled: dict[str, Callable[..., Any]] = {}

    def _rows_sharding(self, batch: int) -> NamedSharding:
        return NamedSharding(self.mesh, P(sharding.split_batch_axes(self.mesh, batch) or None))

    def _to_device(self, array: np.ndarray) -> Array:
        # Every process passes the same rows, so the host array is the global one.
        return jax.make_array_from_process_local_data(
            self._rows_sharding(array.shape[0]), array, array.shape
        )

    def _jit(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if name not in self._compiled:
            replicated = NamedSharding(self.mesh, P())
            # Tokens come back replicated so every process can read them; the cache stays put.
            # jit's own cache then holds one executable per batch size and prompt bucket.
            self._compiled[name] = jax.jit(
                fn, out_shardings=(replicated, None), donate_argnums=(1,)
            )
        return self._compiled[name]

    def _prefill(self, variables, cache, tokens, lengths, rng, sampling):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, cache = cached_forward(self.model, variables, cache, tokens, positions)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return sample_tokens(last, rng, *sampling), cache

    def _step(self, variables, cache, tokens, positions, rng, sampling):
        logits, cache = cached_forward(
            self.model, variables, cache, tokens[:, None], positions[:, None]
        )
        return sample_tokens(logits[:, 0], rng, *sampling), cache

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        seed: int = 0,
        stop: Callable[[int, list[int]], bool] | None = None,
    ) -> list[list[int]]:
        """Generated token ids per prompt (at most ``max_new_tokens`` each).

        Args:
          prompts: token ids per row (each non-empty).
          max_new_tokens: tokens to generate per row (>= 1).
          sampling: greedy by default.
          seed: the same seed, prompts and settings give the same tokens.
          stop: ``stop(row, generated_so_far) -> True`` ends that row (its last token is kept;
            the caller trims); all rows stopped ends the loop early.
        Raises:
          PromptTooLongError: a prompt plus ``max_new_tokens`` exceeds the cache length.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if not len(prompts) or lengths.min() < 1:
            raise ValueError("Every prompt must have at least one token.")
        if lengths.max() + max_new_tokens > self.cache_length:
            raise PromptTooLongError(
                f"A prompt of {lengths.max()} tokens plus {max_new_tokens} new tokens exceeds the "
                f"model's context of {self.cache_length} tokens (train.seq_len); shorten the "
                "prompt or ask for fewer new tokens."
            )
        # Whole rows per data-parallel device: padding rows (one token, never read) cost nothing
        # there, since a smaller batch would be replicated on every device anyway.
        real = len(prompts)
        rows = math.prod(self.mesh.shape[a] for a in sharding.BATCH_MESH_AXES)
        batch = -(-real // rows) * rows
        lengths = np.concatenate([lengths, np.ones(batch - real, np.int32)])
        width = bucket_length(int(lengths.max()), self.cache_length)
        tokens = np.zeros((batch, width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        key = jax.random.key(seed)
        with sharding.sharding_context(self.mesh):
            cache = init_cache(self.model, batch)
            prefill = self._jit("prefill", self._prefill)
            step = self._jit("step", self._step)
            settings = sampling.as_arrays()
            new, cache = prefill(
                self.variables,
                cache,
                self._to_device(tokens),
                self._to_device(lengths),
                jax.random.fold_in(key, 0),
                settings,
            )
            out = [[] for _ in range(batch)]
            done = np.arange(batch) >= real
            for i in range(max_new_tokens):
                host = np.asarray(jax.device_get(new))
                for row in np.flatnonzero(~done):
                    out[row].append(int(host[row]))
                    done[row] = stop is not None and stop(int(row), out[row])
                if done.all() or i == max_new_tokens - 1:
                    break
                new, cache = step(
                    self.variables,
                    cache,
                    self._to_device(host),
                    self._to_device(lengths + i),
                    jax.random.fold_in(key, i + 1),
                    settings,
                )
        return out[:real]
