"""Activation probes: kurtosis, RMS and amax of named tensors, sown per layer (docs/spec.md §4).

Kurtosis here is uncentred, as FP8 casts do not centre either:

- ``token`` (the paper's, default): per token t, k_t = mean_j(x_tj^4) / mean_j(x_tj^2)^2 over the
  hidden dimension, averaged over all tokens of the batch.
- ``sequence`` (the released code's): per sequence, the same ratio over all tokens x channels of the
  sequence flattened, averaged over sequences.

A Gaussian gives 3; a tensor whose mass sits in a few outlier channels gives much more.

Probes are computed only when the ``probes`` collection is mutable, which is decided when the step
is traced, so a step that does not ask for them compiles without them and pays nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

PROBES_COLLECTION = "probes"
KURTOSIS_FORMS = ("token", "sequence")

# Metric group -> how it is read off the sown probe statistics (the train step's ``kurtosis``,
# ``act_rms`` and ``act_amax`` metrics, {tensor: [L]}).
ACTIVATION_GROUPS = {
    "kurtosis": lambda stats: stats["kurtosis"],
    "act_rms": lambda stats: jnp.sqrt(stats["mean_square"]),
    "act_amax": lambda stats: stats["amax"],
}

# Tensors the model probes, in the order they occur in a block.
PROBE_TENSORS = (
    "qkv_in",  # input of the fused QKV projection
    "qkv",  # output of the fused QKV projection (paper)
    "q_reg",  # Q after the QK regulariser
    "k_reg",  # K after the QK regulariser
    "ffn_pre",  # FFN pre-activation (first projection's output)
    "ffn_act",  # input of the second FFN projection, after the activation (paper)
    "ffn_out",  # FFN output
    "block_out",  # the block's output, i.e. the residual stream (paper)
)

_TINY = 1e-30


def kurtosis(x: jax.Array, form: str = "token") -> jax.Array:
    """Uncentred kurtosis of ``x`` [B, T, *hidden] as a float32 scalar (see module docstring)."""
    if form not in KURTOSIS_FORMS:
        raise ValueError(f"log.kurtosis_form={form!r}; choose one of {KURTOSIS_FORMS}.")
    x = x.astype(jnp.float32).reshape(x.shape[0], x.shape[1], -1)
    axes = -1 if form == "token" else (1, 2)
    m2 = jnp.mean(jnp.square(x), axis=axes)
    m4 = jnp.mean(jnp.square(jnp.square(x)), axis=axes)
    return jnp.mean(m4 / jnp.maximum(jnp.square(m2), _TINY))


def tensor_stats(x: jax.Array, form: str) -> dict[str, jax.Array]:
    """{'kurtosis', 'mean_square', 'amax'} of ``x`` as float32 scalars.

    The mean square (not the RMS) is sown so that equal micro-batches combine it exactly by
    averaging; amax combines by max.
    """
    x32 = x.astype(jnp.float32)
    return {
        "kurtosis": kurtosis(x32, form),
        "mean_square": jnp.mean(jnp.square(x32)),
        "amax": jnp.max(jnp.abs(x32)),
    }


def probe(module: nn.Module, name: str, x: jax.Array, form: str) -> None:
    """Sows the statistics of ``x`` under ``probes/<module path>/<name>`` if probes are on."""
    if not module.is_mutable_collection(PROBES_COLLECTION):
        return
    if name not in PROBE_TENSORS:
        raise ValueError(f"Unknown probe {name!r}; add it to PROBE_TENSORS.")
    module.sow(
        PROBES_COLLECTION,
        name,
        tensor_stats(x, form),
        init_fn=lambda: {},
        reduce_fn=lambda _, new: new,
    )
