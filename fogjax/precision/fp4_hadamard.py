"""The 16x16 random Hadamard transform of NVIDIA's NVFP4 recipe (arXiv 2509.25149, §4.2).

Before the weight-gradient GEMM dW = X^T G both operands are multiplied, along the contraction
(token) axis, by the same orthogonal block-diagonal matrix M = diag(s) H_16 / 4 (H_16 the Sylvester
Hadamard matrix, s a random +-1 vector). In exact arithmetic X^T M M^T G = X^T G, so only the
quantisation sees the change: it spreads a block's outliers over all 16 entries, which makes the
block distribution closer to Gaussian and the block scale less dominated by one value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HADAMARD_SIZE = 16


def hadamard_matrix(n: int = HADAMARD_SIZE) -> np.ndarray:
    """The n x n Sylvester Hadamard matrix (entries +-1, n a power of two), float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} must be a power of two.")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_hadamard(key: jax.Array, n: int = HADAMARD_SIZE) -> jax.Array:
    """M = diag(s) H_n / sqrt(n), s in {-1, +1}^n from ``key``: float32 [n, n], orthogonal."""
    signs = jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)
    return signs[:, None] * jnp.asarray(hadamard_matrix(n)) / np.sqrt(n).astype(np.float32)


def transform_last_axis(x: jax.Array, m: jax.Array) -> jax.Array:
    """Applies M [n, n] to every block of n consecutive entries of ``x``'s last axis (float32).

    The last axis length must be a multiple of n: zero padding would not survive the transform.
    """
    n = m.shape[0]
    k = x.shape[-1]
    if k % n:
        raise ValueError(
            f"precision.fp4_hadamard_wgrad needs the weight-gradient contraction length (tokens "
            f"per micro-batch, here {k}) to be a multiple of {n}; change train.batch_size or "
            "train.seq_len, or turn the option off."
        )
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], k // n, n)
    return jnp.einsum("...i,ij->...j", blocks, m, precision=jax.lax.Precision.HIGHEST).reshape(
        x.shape
    )
