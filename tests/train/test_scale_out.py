"""Scale-out on CPU: one train step agrees across meshes, two processes train like one, and a
checkpoint moves between meshes.

The equality tests run in float32 compute (``precision.compute_dtype='float32'``). In bf16 every
GEMM rounds its output to 8 mantissa bits, and a mesh that splits a contraction (fsdp, tensor)
rounds partial sums that one device never forms; those 2^-8-relative differences compound through
the layers (measured on this model: one step's gradients differ across the meshes by 1.4e-2 in
relative L2 norm under bf16, and by 0.27 under fp8dpa, whose FP8 casts then flip far more often),
so a bf16 tolerance would hide real sharding bugs. In float32 the meshes differ only in the order
of float32 sums (~1e-7 relative), and the tolerances below can be tight.

FP8 adds one effect no mesh can avoid: an FP8 cast is a step function, so a float32 difference in
the last bit occasionally moves one element across an E4M3/E5M2 rounding boundary (one E5M2 step
is up to 25% of the value). On this model and batch one such flip in the backward pass changes one
column of a weight gradient and, through it, the layers below, by up to ~1e-2 in relative L2 norm,
while the loss and the gradient norm stay within ~1e-5. The FP8 gradient checks are therefore on
relative norms, which a missing reduction or a wrongly sharded tensor (errors of order 1) still
fails by far.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import pytest
from helpers import REPO_ROOT
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fogjax import checkpoint, config_lib, sharding
from fogjax.train import run as state_lib

pytestmark = pytest.mark.slow  # module fixtures train or run commands

ROOT = REPO_ROOT

MESHES = {  # (data, fsdp, tensor)
    "one_device": (1, 1, 1),
    "data8": (8, 1, 1),
    "fsdp8": (1, 8, 1),
    "data2_fsdp2_tensor2": (2, 2, 2),
}
BATCH, SEQ_LEN = 8, 32
TOKENS = np.random.default_rng(0).integers(0, 4096, size=(BATCH, SEQ_LEN + 1), dtype=np.int32)


def small_config(recipe: str) -> ml_collections.ConfigDict:
    """The embedded default's tiny FOG-flash, cut to 2 layers with 2 key/value groups (so that
    tensor=2 divides the heads) and trained in float32 compute (module docstring)."""
    cfg = config_lib.get_config("fog_flash", "tiny")
    cfg.model.num_layers = 2
    cfg.model.num_kv_heads = 2
    cfg.precision.recipe = recipe
    cfg.precision.compute_dtype = "float32"
    cfg.train.batch_size = BATCH
    cfg.train.seq_len = SEQ_LEN
    cfg.optim.warmup_steps = 0  # the first step already moves the parameters by the peak lr
    return cfg


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    devices = jax.devices()[: math.prod(shape)]
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)), devices)


def leaves(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@dataclasses.dataclass
class StepResult:
    init: Any  # the created state, on host
    state: Any  # the state after one step, on host
    metrics: dict[str, Any]
    shardings: Any  # of the created state (and, by out_shardings, of the stepped one)
    lr: float


def one_step(recipe: str, shape: tuple[int, int, int]) -> StepResult:
    """create_state and one jitted train step on ``shape``, as fogjax.train.loop does them."""
    cfg = small_config(recipe)
    mesh = mesh_of(shape)
    run = state_lib.build_run(cfg, mesh)
    step_fn = run.train_steps[False]
    with sharding.sharding_context(mesh):
        state = state_lib.create_state(run.init, run.shardings, cfg.seed)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        init = jax.device_get(state)
        new_state, metrics = step_fn(state, sharding.global_batch_from_local(TOKENS, mesh))
    for path, s in leaves(jax.tree.map(lambda x: x.sharding, new_state)).items():
        assert s == leaves(run.shardings)[path], path
    return StepResult(
        init, jax.device_get(new_state), jax.device_get(metrics), shardings, float(run.schedule(0))
    )


def adam_state(opt_state: Any) -> optax.ScaleByAdamState:
    """The one ScaleByAdamState inside the optimizer chain's state."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (found,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return found


def clipped_grads(result: StepResult, b1: float) -> Any:
    """The clipped gradients of the step: AdamW's first moment after one step is (1 - b1) g."""
    mu = adam_state(result.state["opt_state"]).mu
    return jax.tree.map(lambda m: np.asarray(m) / (1.0 - b1), mu)


def adam_first_direction(g: np.ndarray, eps: float) -> np.ndarray:
    """AdamW's bias-corrected direction after one step: m / (sqrt(v) + eps) = g / (|g| + eps)."""
    g = np.asarray(g, np.float64)
    return g / (np.abs(g) + eps)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def assert_parameters_follow_the_rules(result: StepResult) -> None:
    """On data=2, fsdp=2, tensor=2: the shardings LOGICAL_AXIS_RULES prescribe."""
    params = result.shardings["params"]
    assert params["embedding"].spec == P("tensor", "fsdp")  # (vocab, embed)
    assert params["lm_head"].spec == P("fsdp", "tensor")  # (embed, vocab)
    # (layers, embed, mlp): nn.scan's stacking axis stays whole on every device.
    assert params["layers"]["mlp"]["wi"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert params["layers"]["mlp"]["wo"]["kernel"].spec == P(None, "tensor", "fsdp")
    # (layers, embed, kv groups, q/k/v, head dim): the 2 groups split over tensor=2.
    assert params["layers"]["attn"]["wqkv"]["kernel"].spec == P(None, "fsdp", "tensor", None, None)
    # The optimizer moments are sharded like their parameters.
    assert adam_state(result.shardings["opt_state"]).mu["embedding"].spec == P("tensor", "fsdp")
    for path, s in leaves(result.shardings["fp8"]).items():
        assert s.spec == P() and s.is_fully_replicated, path
    assert result.shardings["step"].is_fully_replicated


@pytest.fixture(scope="module", params=["bf16", "fp8dpa"])
def steps_on_every_mesh(request) -> tuple[str, dict[str, StepResult]]:
    return request.param, {name: one_step(request.param, shape) for name, shape in MESHES.items()}


def test_meshes_create_the_same_state(steps_on_every_mesh):
    _, results = steps_on_every_mesh
    ref = leaves(results["one_device"].init)
    for name, result in results.items():
        for path, x in leaves(result.init).items():
            np.testing.assert_array_equal(x, ref[path], err_msg=f"{name} {path}")


def test_parameters_are_sharded_as_the_rules_say(steps_on_every_mesh):
    _, results = steps_on_every_mesh
    assert_parameters_follow_the_rules(results["data2_fsdp2_tensor2"])
    embedding = results["fsdp8"].shardings["params"]["embedding"]
    assert embedding.shard_shape((4096, 256)) == (4096, 32)  # embed / fsdp=8; vocab whole
    for path, s in leaves(results["data8"].shardings).items():
        assert s.is_fully_replicated, path  # pure data parallelism replicates the whole state


def test_one_step_is_the_same_on_every_mesh(steps_on_every_mesh):
    recipe, results = steps_on_every_mesh
    fp8 = recipe != "bf16"
    cfg = small_config(recipe)
    ref = results["one_device"]
    ref_grads = leaves(clipped_grads(ref, cfg.optim.b1))
    ref_params, ref_init = leaves(ref.state["params"]), leaves(ref.init["params"])
    moved = np.abs(ref_params["['lm_head']"] - ref_init["['lm_head']"]).max()
    assert moved == pytest.approx(ref.lr, rel=0.1)  # the step moved the parameters by ~lr
    for name, result in results.items():
        np.testing.assert_allclose(result.metrics["loss"], ref.metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(
            result.metrics["grad_norm"], ref.metrics["grad_norm"], rtol=1e-4 if fp8 else 1e-5
        )
        grads = leaves(clipped_grads(result, cfg.optim.b1))
        for path, g in grads.items():
            if fp8:  # a flipped FP8 rounding moves a whole column (module docstring)
                assert rel_l2(ref_grads[path], g) < 3e-2, (name, path)
            else:
                scale = np.abs(ref_grads[path]).max()
                np.testing.assert_allclose(g, ref_grads[path], rtol=0, atol=1e-5 * scale)
        for path, p in leaves(result.state["params"]).items():
            # AdamW's first step moves p by -lr (g / (|g| + eps) + wd p), nearly lr sign(g): an
            # element whose gradient is within rounding of 0 may legitimately move by 2 lr on
            # one mesh and not another. So the parameters must differ by exactly what their
            # (checked) gradients imply, plus float32 rounding, and not by more.
            implied = ref.lr * np.abs(
                adam_first_direction(grads[path], cfg.optim.eps)
                - adam_first_direction(ref_grads[path], cfg.optim.eps)
            )
            slack = 1e-5 * ref.lr + 2 * np.spacing(np.abs(ref_params[path]))
            excess = np.abs(p - ref_params[path]) - implied - slack
            assert excess.max() <= 0, (name, path, excess.max())
        assert int(result.state["step"]) == 1


def test_fp8_state_after_the_step_is_the_same_on_every_mesh(steps_on_every_mesh):
    recipe, results = steps_on_every_mesh
    if recipe == "bf16":
        assert not results["one_device"].state["fp8"]
        return
    ref = leaves(results["one_device"].state["fp8"])
    amaxes = [x[..., 0] for path, x in ref.items() if path.endswith("amax_history']")]
    assert amaxes and all(np.all(a > 0) for a in amaxes)  # every tensor recorded its amax
    for name, result in results.items():
        for path, x in leaves(result.state["fp8"]).items():
            if "['dot']['rhs_" in path:
                # A linear's rhs is its kernel: identical on every mesh, so its amax, a global
                # max over the kernel's shards, must be identical to the bit.
                np.testing.assert_array_equal(x, ref[path], err_msg=f"{name} {path}")
            else:
                # Activations and gradients: equal up to float32 summation order (measured
                # <= 1.3e-7 relative), unless an FP8 rounding flip upstream (module docstring)
                # happens to touch the largest element. A per-shard instead of a global max
                # would be off by several percent.
                np.testing.assert_allclose(x, ref[path], rtol=1e-3, err_msg=f"{name} {path}")


# --- checkpoints move between meshes --------------------------------------------------------


def test_checkpoint_saved_on_fsdp8_restores_on_data2_fsdp4(tmp_path):
    cfg = small_config("fp8dpa")
    run8 = state_lib.build_run(cfg, mesh_of((1, 8, 1)))
    with sharding.sharding_context(run8.mesh):
        state = state_lib.create_state(run8.init, run8.shardings, cfg.seed)
    # Distinct values in every leaf, so that the FP8 state and the optimizer moments (zeros and
    # ones at init) cannot compare equal by accident.
    rng = np.random.default_rng(1)
    state = jax.tree.map(
        lambda x: (
            jax.device_put(
                (np.asarray(x) + rng.standard_normal(x.shape)).astype(x.dtype), x.sharding
            )
            if x.dtype == np.float32
            else x
        ),
        state,
    )
    state["step"] = jax.device_put(np.int32(7), state["step"].sharding)
    expected = jax.device_get(state)
    assert {s.data.shape for s in state["params"]["embedding"].addressable_shards} == {(4096, 32)}
    with checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1) as ckpt:
        assert ckpt.save(7, state, {"position": 3}, {"note": "fsdp8"}, force=True)

    run = state_lib.build_run(cfg, mesh_of((2, 4, 1)))
    with checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1) as ckpt:
        restored, data_state, meta = ckpt.restore(run.abstract)
    assert data_state == {"position": 3} and meta["note"] == "fsdp8"
    restored_leaves, new_shardings = leaves(restored), leaves(run.shardings)
    assert restored_leaves.keys() == leaves(expected).keys()
    for path, x in leaves(expected).items():
        got = restored_leaves[path]
        assert got.sharding == new_shardings[path], path
        assert got.dtype == x.dtype, path
        np.testing.assert_array_equal(np.asarray(got), x, err_msg=path)
    embedding = restored["params"]["embedding"]
    assert embedding.sharding == NamedSharding(run.mesh, P("tensor", "fsdp"))
    assert {s.data.shape for s in embedding.addressable_shards} == {(4096, 64)}  # 256 / fsdp=4
    assert len(embedding.addressable_shards) == 8  # each fsdp shard on both data replicas


# --- two processes train like one -----------------------------------------------------------

CLI_FLAGS = [
    "--config=configs/default.py",
    "--config.model.num_layers=2",  # half the default's compile, three processes on 2 cores
    "--config.train.steps=4",
    f"--config.train.batch_size={BATCH}",
    f"--config.train.seq_len={SEQ_LEN}",
    "--config.train.eval_every=0",
    "--config.train.log_every=1",
    "--config.train.stats_every=1",  # every step a statistics step: one compilation, not two
    "--config.train.ckpt_every=100",  # the last step is saved anyway
    "--config.optim.warmup_steps=1",  # lr(0) = 0: steps 1 and 2 both see the initial params
    "--config.optim.cooldown_steps=1",
]
CLI_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


# May run beside test_distributed's two-process join test (see the comment there).
def test_two_processes_train_like_one(tmp_path):
    """The embedded default (cut to 2 layers) on 2 processes x 1 CPU device (data=2, gloo
    collectives) logs the losses of the same run on 1 process x 1 device: the global batches are
    the same."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "FOGJAX_")) and k != "XLA_FLAGS"
    }
    env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    multi = dict(env, FOGJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}")
    multi.update(FOGJAX_NUM_PROCESSES="2")
    runs = {
        "process0": (tmp_path / "multi", dict(multi, FOGJAX_PROCESS_ID="0")),
        "process1": (tmp_path / "multi", dict(multi, FOGJAX_PROCESS_ID="1")),
        "single": (tmp_path / "single", env),
    }
    procs, logs = {}, {}
    try:
        for name, (workdir, run_env) in runs.items():  # all three at once: their wall times overlap
            logs[name] = open(tmp_path / f"{name}.log", "w+")  # noqa: SIM115 (closed in finally)
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fogjax.train", f"--workdir={workdir}", *CLI_FLAGS],
                cwd=ROOT,
                env=run_env,
                stdout=logs[name],
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + CLI_TIMEOUT_S
        for proc in procs.values():
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        outputs = {}
        for name, log in logs.items():
            log.seek(0)
            outputs[name] = log.read()
            log.close()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{outputs[name][-3000:]}"
        assert "Done: step 4" in outputs[name], outputs[name][-3000:]

    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
    assert len(list((multi_dir / "tb").iterdir())) == 1  # events from process 0 only
    data_dir = multi_dir / "checkpoints" / "4" / "data"
    assert {p.name for p in data_dir.glob("process_*.json")} == {
        "process_0-of-2.json",
        "process_1-of-2.json",
    }
    together, alone = _losses(multi_dir), _losses(single_dir)
    assert sorted(together) == sorted(alone) == [1, 2, 3, 4]
    # Steps 1 and 2 evaluate the initial parameters (lr(0) = 0): only the order of float sums
    # differs. Later steps follow FP8 rounding flips through Adam's near-sign(g) first updates
    # (module docstring), which grow to ~3e-3 relative by step 4.
    for step in (1, 2):
        np.testing.assert_allclose(together[step], alone[step], rtol=1e-5, err_msg=f"step {step}")
    for step in (3, 4):
        np.testing.assert_allclose(together[step], alone[step], rtol=1e-2, err_msg=f"step {step}")
