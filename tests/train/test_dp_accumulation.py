"""Data-parallel gradient accumulation: each 'data' replica accumulates its micro-batches locally
and the replicas reduce once per step (fogjax.train.step._accumulate_per_replica).

Every case compares the new path with the partitioned accumulation loop it replaces
(``compute_grads(..., local_accumulation=False)``) on the same mesh, same state, same batch.
Both compute every row on the same device with the same FP8 scales, so they differ only in where
the per-row gradients are summed:

- The FP8 state after the step must be bit-identical: it is updated from amaxes, and a max over
  micro-batches and replicas is exact in any order.
- Gradients and loss, in float32 compute (as tests/train/test_scale_out.py, for the same reason:
  bf16 GEMMs would add rounding at different places), differ by the order of float32 sums over
  k micro-batches and the replicas: a few ulp of the largest summand. Measured on these cases
  <= 2e-7 of each leaf's largest magnitude; the tolerance is 2e-6 of it, while a missing or
  doubled reduction (a factor of 2 on these meshes) misses by far.
- In bf16 compute (the FP8 cuDNN case) the partitioned loop adds the replicas' bf16 weight-gradient
  GEMM outputs and rounds the sum to bf16, the new path adds them in float32: measured 2.8e-3 of
  each leaf's largest magnitude (under one bf16 step, 2^-8 = 3.9e-3); tolerance 1e-2.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cudnn_fp8_emulation as emulation
from helpers.steps import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fogjax import config_lib, optim, sharding
from fogjax.bench import hlo_module
from fogjax.model import attention, build_model
from fogjax.precision import cudnn_attention, registry
from fogjax.train import run as state_lib
from fogjax.train import step as step_lib

BATCH, SEQ_LEN = 8, 32
F32_TOLERANCE = 2e-6  # of a leaf's largest magnitude (module docstring)
BF16_TOLERANCE = 1e-2


def small_config(recipe: str, micro_batches: int) -> Any:
    """tests/train/test_scale_out.py's 2-layer tiny FOG-flash in float32 compute."""
    cfg = config_lib.get_config("fog_flash", "tiny")
    cfg.model.num_layers = 2
    cfg.model.num_kv_heads = 2  # tensor=2 splits the key/value groups
    cfg.precision.recipe = recipe
    cfg.precision.compute_dtype = "float32"
    cfg.train.batch_size = BATCH
    cfg.train.seq_len = SEQ_LEN
    cfg.train.micro_batches = micro_batches
    return cfg


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    devices = jax.devices()[: math.prod(shape)]
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)), devices)


@dataclasses.dataclass
class Grads:
    """compute_grads' (loss, grads, new fp8 state, aux) on host, and its compiled HLO text."""

    loss: Any
    grads: Any
    fp8: Any
    aux: Any
    hlo: str


def compiled_grads(
    model: nn.Module,
    state: Any,
    tokens: np.ndarray,
    mesh: jax.sharding.Mesh,
    micro_batches: int,
    local: bool,
    with_stats: bool = False,
    grad_dtype: Any = None,
) -> Grads:
    """compute_grads jitted on ``mesh`` (the state as placed, the batch over data x fsdp)."""

    def grads(state: Any, tokens: jax.Array) -> Any:
        return step_lib.compute_grads(
            model,
            state["params"],
            state["fp8"],
            tokens,
            micro_batches,
            with_stats,
            grad_dtype,
            jax.random.key(0),
            local_accumulation=local,
        )

    with sharding.sharding_context(mesh):
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
        compiled = jax.jit(grads).lower(state, batch).compile()
        loss, g, fp8, aux = jax.device_get(compiled(state, batch))
    return Grads(loss, g, fp8, aux, compiled.as_text())


def both_paths(
    recipe: str, shape: tuple[int, int, int], micro_batches: int, with_stats: bool = False
) -> tuple[Grads, Grads]:
    """(partitioned loop, per-replica accumulation) on ``shape`` from one created state."""
    cfg = small_config(recipe, micro_batches)
    mesh = mesh_of(shape)
    run = state_lib.build_run(cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, 4096, (BATCH, SEQ_LEN + 1), dtype=np.int32)
    with sharding.sharding_context(mesh):
        state = state_lib.create_state(run.init, run.shardings, cfg.seed)
    state = {"params": state["params"], "fp8": state["fp8"]}
    grad_dtype = optim.grad_dtype(cfg.optim)
    return tuple(
        compiled_grads(run.model, state, tokens, mesh, micro_batches, local, with_stats, grad_dtype)
        for local in (False, True)
    )


def leaves(tree: Any) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def assert_same(old: Grads, new: Grads, tolerance: float) -> None:
    """FP8 state bit-identical; loss, gradients and statistics within ``tolerance`` of each
    leaf's largest magnitude."""
    fp8_old, fp8_new = leaves(old.fp8), leaves(new.fp8)
    assert fp8_old.keys() == fp8_new.keys()
    for path, x in fp8_old.items():
        np.testing.assert_array_equal(fp8_new[path], x, err_msg=path)
    np.testing.assert_allclose(new.loss, old.loss, rtol=tolerance)
    for name in ("grads", "aux"):
        a, b = leaves(getattr(old, name)), leaves(getattr(new, name))
        assert a.keys() == b.keys(), name
        for path, x in a.items():
            x, y = x.astype(np.float64), b[path].astype(np.float64)
            scale = max(np.abs(x).max(), 1e-30)
            np.testing.assert_allclose(y, x, rtol=0, atol=tolerance * scale, err_msg=name + path)


def all_reduces(hlo_text: str) -> list[tuple[int, float]]:
    """(times it runs per step, bytes) of every all-reduce in a compiled module."""
    module = hlo_module.parse_module(hlo_text)
    runs = hlo_module.executions(module).runs
    return [
        (runs.get(name, 0), hlo_module.array_bytes(inst.shapes))
        for name, insts in module.computations.items()
        for inst in insts
        if inst.opcode.startswith("all-reduce")
    ]


def per_step_bytes(reduces: list[tuple[int, float]]) -> float:
    return sum(runs * size for runs, size in reduces)


def assert_reduced_once(old: Grads, new: Grads, micro_batches: int) -> None:
    """Pure data parallelism: the new program's all-reduces run once per step (none inside the
    micro-batch or layer loops), the old one's run inside them, k - 1 times and more."""
    new_reduces, old_reduces = all_reduces(new.hlo), all_reduces(old.hlo)
    assert new_reduces and all(runs == 1 for runs, _ in new_reduces), new_reduces
    grads_bytes = sum(x.size * 4 for x in jax.tree.leaves(new.grads))
    assert per_step_bytes(new_reduces) >= grads_bytes  # the gradients are all in there
    assert max(runs for runs, _ in old_reduces) >= micro_batches - 1
    assert per_step_bytes(old_reduces) > 1.5 * per_step_bytes(new_reduces)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "micro_batches"), [("bf16", 2), ("fp8dpa", 4)])
def test_data_parallel_accumulation_matches_the_partitioned_loop(recipe, micro_batches):
    old, new = both_paths(recipe, (2, 1, 1), micro_batches)
    assert_same(old, new, F32_TOLERANCE)
    assert_reduced_once(old, new, micro_batches)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "shape", "with_stats"),
    [("fp8dpa", (2, 2, 1), True), ("bf16", (2, 1, 2), False), ("fp8", (2, 2, 2), False)],
)
def test_data_parallel_accumulation_with_fsdp_and_tensor(recipe, shape, with_stats):
    """'fsdp' and 'tensor' stay with XLA inside the shard_map over 'data'; the statistics of a
    statistics step combine over the replicas as over micro-batches."""
    old, new = both_paths(recipe, shape, 2, with_stats)
    if with_stats:
        assert new.aux["probes"] and new.aux["fp8_stats"]
    assert_same(old, new, F32_TOLERANCE)


def cudnn_model_and_state(
    recipe: str, mesh: jax.sharding.Mesh, compute_dtype: str = "bfloat16"
) -> tuple[nn.Module, Any]:
    """tests/helpers/steps.py's tiny model with model.attention_impl='cudnn' (head dim 128, as
    cuDNN's kernels require; 2 key/value groups, so that tensor=2 splits them), and its initial
    state replicated on ``mesh``."""
    cfg = tiny_config(recipe)
    cfg.precision.compute_dtype = compute_dtype
    cfg.model.attention_impl = "cudnn"
    cfg.model.num_kv_heads = 2
    model = build_model(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))
    state = {"params": nn.unbox(variables["params"]), "fp8": variables.get("fp8", {})}
    return model, jax.device_put(state, NamedSharding(mesh, P()))


@pytest.mark.slow
def test_data_parallel_accumulation_runs_fp8_cudnn_attention(monkeypatch):
    """fp8dpa's fused cuDNN attention (emulated kernels) in bf16 compute: its own shard_maps and
    custom VJP run inside the shard_map over 'data', and its amaxes are reduced over 'data' once
    per step with every other observation, not in every layer of every micro-batch."""
    monkeypatch.setattr(
        cudnn_attention, "KERNEL", cudnn_attention.Kernel(emulation.forward, emulation.backward)
    )
    mesh = mesh_of((2, 1, 1))
    model, state = cudnn_model_and_state("fp8dpa", mesh)
    tokens = np.random.default_rng(0).integers(0, 4096, (BATCH, 129), dtype=np.int32)
    old, new = (compiled_grads(model, state, tokens, mesh, 2, local) for local in (False, True))
    assert_same(old, new, BF16_TOLERANCE)
    assert all(runs == 1 for runs, _ in all_reduces(new.hlo)), all_reduces(new.hlo)


def _xla_fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """jax's XLA attention for the cuDNN call, which CPU cannot run; same shapes and semantics."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")


@pytest.mark.slow
def test_data_parallel_accumulation_runs_bf16_cudnn_attention(monkeypatch):
    """BF16 attention_impl='cudnn' (jax's cuDNN call, here its XLA stand-in) inside the shard_map
    over 'data' runs in a nested shard_map over the other axes (fogjax/model/attention.py), here
    with the key/value groups split over tensor=2."""
    monkeypatch.setattr(attention, "_fused_attention", _xla_fused_attention)
    mesh = mesh_of((2, 1, 2))
    model, state = cudnn_model_and_state("bf16", mesh, "float32")
    tokens = np.random.default_rng(0).integers(0, 4096, (BATCH, 129), dtype=np.int32)
    old, new = (compiled_grads(model, state, tokens, mesh, 2, local) for local in (False, True))
    assert_same(old, new, F32_TOLERANCE)


def _model_with(recipe: str) -> Any:
    cfg = config_lib.get_config("fog_flash", "tiny")
    cfg.precision.recipe = recipe
    return types.SimpleNamespace(recipe=registry.make_recipe(cfg.precision))


@pytest.mark.parametrize(
    ("recipe", "shape", "batch", "replicas"),
    [
        ("bf16", (2, 2, 2), 8, 2),
        ("fp8dpa", (4, 1, 1), 16, 4),
        ("fp8", (1, 8, 1), 8, 1),  # no data parallelism
        ("bf16", (4, 1, 1), 8, 1),  # 8 rows on 4 replicas do not make 4 micro-batches each
        ("fp8_current", (2, 1, 1), 8, 1),  # each cast's scale would become a replica's amax
        ("nvfp4", (2, 1, 1), 8, 1),  # stochastic rounding would draw per replica
    ],
)
def test_which_steps_accumulate_per_replica(recipe, shape, batch, replicas):
    with jax.set_mesh(mesh_of(shape)):
        assert step_lib._replicas(_model_with(recipe), batch, 4) == replicas
    assert step_lib._replicas(_model_with(recipe), batch, 4) == 1  # no mesh


def test_without_mesh_axis():
    rules = sharding.without_mesh_axis(sharding.LOGICAL_AXIS_RULES, "data")
    assert dict(rules)["batch"] == ("fsdp",)
    assert dict(rules)["embed"] == "fsdp"
    assert dict(sharding.without_mesh_axis(rules, "fsdp"))["batch"] is None


def test_batch_axes_skip_manual_axes():
    """Inside a shard_map over 'data' the abstract mesh holds 'data' Manual: nested shard_map
    code splits a replica's rows over the remaining axes only."""
    mesh = mesh_of((2, 2, 2))
    seen = {}

    def body(x: jax.Array) -> jax.Array:
        inner = jax.sharding.get_abstract_mesh()
        seen["batch"] = sharding.split_batch_axes(inner, x.shape[0])
        seen["data"] = sharding.split_axis(inner, "data", x.shape[0])
        seen["partitioned"] = sharding.is_partitioned(inner)
        return x

    with jax.set_mesh(mesh):
        assert sharding.split_batch_axes(mesh, 8) == ("data", "fsdp")
        jax.jit(jax.shard_map(body, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}))(
            jnp.zeros((8, 4))
        )
    assert seen == {"batch": ("fsdp",), "data": None, "partitioned": True}
    only_data = mesh_of((2, 1, 1))
    with jax.set_mesh(only_data):
        jax.jit(jax.shard_map(body, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}))(
            jnp.zeros((8, 4))
        )
    assert seen == {"batch": (), "data": None, "partitioned": False}
