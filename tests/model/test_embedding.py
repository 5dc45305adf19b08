"""The vocab-parallel embedding lookup: equal to jnp.take on every mesh, gradients included, and
free of XLA's involuntary rematerialization when the train step compiles on a (2, 2, 2) mesh."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO_ROOT
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fogjax import sharding
from fogjax.model import embedding

ROOT = REPO_ROOT


def reference(table: jax.Array, tokens: jax.Array, cotangent: jax.Array, dtype=jnp.float32):
    """(rows, d loss / d table) of loss = sum(rows * cotangent), from one-device jnp.take."""

    def loss(table):
        rows = jnp.take(table.astype(dtype), tokens, axis=0)
        return jnp.sum(rows.astype(jnp.float32) * cotangent), rows

    (_, rows), grad = jax.value_and_grad(loss, has_aux=True)(table)
    return rows, grad


def sharded(mesh, table, tokens, cotangent, dtype=jnp.float32):
    """embed_lookup's (rows, table gradient) under ``mesh``, with the table and ids placed as the
    trainer places the parameter (logical rules, divisibility fallback) and the batch."""
    box = nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(table.shape, table.dtype), ("vocab", "embed")
    )
    table_sharding = sharding.logical_shardings(box, mesh)
    rows_total = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = (
        sharding.batch_sharding(mesh)
        if tokens.shape[0] % rows_total == 0
        else NamedSharding(mesh, P())
    )
    table = jax.device_put(table, table_sharding)
    tokens = jax.device_put(tokens, batch)

    def loss(table, tokens):
        rows = embedding.embed_lookup(table, tokens, dtype)
        return jnp.sum(rows.astype(jnp.float32) * cotangent), rows

    with sharding.sharding_context(mesh):
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, rows), grad = step(table, tokens)
    return rows, grad


def inputs(vocab: int, d_model: int, batch: int, seq: int = 5):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((vocab, d_model)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    cotangent = jnp.asarray(rng.standard_normal((batch, seq, d_model)), jnp.float32)
    return table, tokens, cotangent


def test_axes_match_the_logical_rules():
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    assert rules["vocab"] == embedding.VOCAB_AXIS
    assert rules["embed"] == embedding.EMBED_AXIS


def test_two_by_two_by_two_mesh_matches_take_and_keeps_the_batch_split():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    table, tokens, cotangent = inputs(vocab=64, d_model=16, batch=8)
    tokens = tokens.at[0, :4].set(jnp.array([0, 31, 32, 63]))  # Both edges of both vocab slices.
    want_rows, want_grad = reference(table, tokens, cotangent)
    rows, grad = sharded(mesh, table, tokens, cotangent)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)
    assert rows.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), rows.ndim)


@pytest.mark.parametrize(
    "mesh_shape, vocab, d_model, batch",
    [
        ((1, 1, 8), 64, 16, 8),  # Vocab over 8, nothing else split.
        ((8, 1, 1), 64, 16, 8),  # Pure data parallel: table replicated, gradient summed.
        ((1, 8, 1), 64, 16, 8),  # Pure FSDP: gather D, reduce-scatter its gradient.
        ((1, 2, 4), 64, 16, 8),
        ((2, 2, 2), 63, 16, 8),  # Vocab not divisible by tensor: replicated over 'tensor'.
        ((2, 2, 2), 64, 15, 8),  # D not divisible by fsdp: the table is whole on 'fsdp'.
        ((2, 2, 2), 64, 16, 2),  # Batch not divisible by data x fsdp (model.init's case).
    ],
)
def test_meshes_and_fallbacks_match_take(mesh_shape, vocab, d_model, batch):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)))
    table, tokens, cotangent = inputs(vocab, d_model, batch)
    want_rows, want_grad = reference(table, tokens, cotangent)
    rows, grad = sharded(mesh, table, tokens, cotangent)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)


def test_bf16_rows_are_exact():
    """The psum over 'tensor' adds zeros to one row, so even bf16 rows come out bit-equal."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    table, tokens, cotangent = inputs(vocab=64, d_model=16, batch=8)
    want_rows, _ = reference(table, tokens, cotangent, jnp.bfloat16)
    rows, _ = sharded(mesh, table, tokens, cotangent, jnp.bfloat16)
    assert rows.dtype == jnp.bfloat16
    np.testing.assert_array_equal(rows, want_rows)


def test_without_a_mesh_is_take():
    table, tokens, _ = inputs(vocab=64, d_model=16, batch=2)
    rows = embedding.embed_lookup(table, tokens, jnp.bfloat16)
    np.testing.assert_array_equal(rows, jnp.take(table.astype(jnp.bfloat16), tokens, axis=0))


COMPILE_TINY = textwrap.dedent(
    """
    from fogjax import config_lib
    from fogjax.bench import measure as bench

    c = config_lib.get_config("fog_flash", "tiny")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.train.batch_size = 8
    bench.compile_train_step(c)
    """
)


@pytest.mark.slow
def test_train_step_compiles_without_involuntary_rematerialization():
    """XLA's SPMD partitioner logs "Involuntary full rematerialization" (on stderr, from C++, so
    only a subprocess sees it) when it must replicate a tensor to reshard it; the plain
    jnp.take embedding did so 4 times on this mesh (gather, and its transpose)."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    remat = [line for line in proc.stderr.splitlines() if "Involuntary" in line]
    assert not remat, "\n".join(line[:600] for line in remat)
