"""Joining the multi-process runtime: SLURM and explicit settings, the sbatch script, two real
processes on 127.0.0.1."""

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import jax
import pytest
from helpers import REPO_ROOT

from fogjax import distributed

ROOT = REPO_ROOT
SBATCH = ROOT / "launch" / "fogjax.sbatch"


@pytest.fixture
def join_calls(monkeypatch):
    """A clean environment (no SLURM_*, FOGJAX_*, CUDA_VISIBLE_DEVICES) and a recording
    jax.distributed.initialize in place of the real one."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "FOGJAX_")) or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def set_env(monkeypatch, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def slurm_2x4(monkeypatch, procid: int, localid: int, nodeid: int, **extra) -> None:
    """srun's variables for 2 nodes x 4 GPUs, one task per GPU; ``extra`` adds or replaces."""
    env = dict(
        SLURM_JOB_ID="4242",
        SLURM_STEP_ID="0",
        SLURM_JOB_NODELIST="node[001-002]",
        SLURM_STEP_NODELIST="node[001-002]",
        SLURM_NTASKS="8",
        SLURM_TASKS_PER_NODE="4(x2)",
        SLURM_PROCID=str(procid),
        SLURM_LOCALID=str(localid),
        SLURM_NODEID=str(nodeid),
        SLURM_GPUS_ON_NODE="4",
        CUDA_VISIBLE_DEVICES="0,1,2,3",
    )
    set_env(monkeypatch, **(env | extra))


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("a,b", ["a", "b"]),
        ("node[001-003,007]", ["node001", "node002", "node003", "node007"]),
        ("gpu[1-2],cpu5", ["gpu1", "gpu2", "cpu5"]),
        ("node[001-003,007],gpu-a1", ["node001", "node002", "node003", "node007", "gpu-a1"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("gpu-[3],x[7]-ib", ["gpu-3", "x7-ib"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[1-", "node[a-b]", "node[3-1]", "n]1[", ""])
def test_bad_nodelist_is_an_error(nodelist):
    with pytest.raises(ValueError, match="node list"):
        distributed.expand_nodelist(nodelist)


def test_expand_tasks_per_node():
    assert distributed.expand_tasks_per_node("4(x2)") == [4, 4]
    with pytest.raises(ValueError, match="tasks-per-node"):
        distributed.expand_tasks_per_node("4(2)")
    assert distributed.expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert distributed.expand_tasks_per_node("2,1") == [2, 1]


def test_slurm_one_process_per_gpu(monkeypatch, join_calls):
    slurm_2x4(monkeypatch, procid=6, localid=2, nodeid=1)
    info = distributed.initialize()
    assert join_calls == [
        dict(
            coordinator_address="node001:12355",
            num_processes=8,
            process_id=6,
            local_device_ids=[2],
        )
    ]
    assert info.source == "slurm" and info.is_multiprocess


def test_slurm_one_process_per_node_drives_all_gpus(monkeypatch, join_calls):
    slurm_2x4(monkeypatch, procid=1, localid=0, nodeid=1)
    set_env(monkeypatch, SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="1(x2)")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # SLURM_GPUS_ON_NODE=4 alone
    distributed.initialize()
    assert join_calls[-1]["local_device_ids"] == [0, 1, 2, 3]
    assert join_calls[-1]["num_processes"] == 2 and join_calls[-1]["process_id"] == 1

    # No per-node list: SLURM_NTASKS_PER_NODE decides; CUDA_VISIBLE_DEVICES counts the GPUs.
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.delenv("SLURM_TASKS_PER_NODE")
    set_env(monkeypatch, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_NTASKS_PER_NODE="1")
    distributed.initialize()
    assert join_calls[-1]["local_device_ids"] == list(range(8))


def test_slurm_task_bound_to_one_gpu_uses_device_zero(monkeypatch, join_calls):
    # srun --gpus-per-task=1 leaves each task exactly one visible GPU, which JAX calls device 0.
    slurm_2x4(monkeypatch, procid=3, localid=3, nodeid=0, CUDA_VISIBLE_DEVICES="3")
    distributed.initialize()
    assert join_calls[-1]["local_device_ids"] == [0]


def test_slurm_port_and_address_overrides(monkeypatch, join_calls):
    slurm_2x4(monkeypatch, procid=0, localid=0, nodeid=0, FOGJAX_COORDINATOR_PORT="23456")
    distributed.initialize()
    assert join_calls[-1]["coordinator_address"] == "node001:23456"
    set_env(monkeypatch, FOGJAX_COORDINATOR_ADDRESS="node001-ib:7000")
    distributed.initialize()
    assert join_calls[-1]["coordinator_address"] == "node001-ib:7000"


def test_explicit_environment(monkeypatch, join_calls):
    set_env(
        monkeypatch,
        FOGJAX_COORDINATOR_ADDRESS="10.0.0.1:1234",
        FOGJAX_NUM_PROCESSES="4",
        FOGJAX_PROCESS_ID="2",
    )
    info = distributed.initialize()
    assert join_calls == [
        dict(
            coordinator_address="10.0.0.1:1234",
            num_processes=4,
            process_id=2,
            local_device_ids=None,
        )
    ]
    assert info.source == "explicit"
    set_env(monkeypatch, FOGJAX_LOCAL_DEVICE_IDS="0,1")
    distributed.initialize(process_id=3)  # a CLI flag overrides the environment
    assert join_calls[-1]["process_id"] == 3 and join_calls[-1]["local_device_ids"] == [0, 1]


def test_arguments_alone_are_enough(join_calls):
    distributed.initialize(coordinator_address="h:1", num_processes=2, process_id=0)
    assert join_calls == [
        dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids=None)
    ]


def test_no_settings_is_a_single_process_run(join_calls):
    info = distributed.initialize()
    assert join_calls == []
    assert (info.num_processes, info.process_id, info.source) == (1, 0, "single")


def test_single_task_srun_step_does_not_join(monkeypatch, join_calls):
    slurm_2x4(monkeypatch, procid=0, localid=0, nodeid=0)
    set_env(monkeypatch, SLURM_NTASKS="1", SLURM_TASKS_PER_NODE="1")
    assert distributed.initialize().num_processes == 1
    # The step's own count wins over the allocation's (srun -n1 inside an 8-task job).
    set_env(monkeypatch, SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="1")
    assert distributed.initialize().num_processes == 1
    assert join_calls == []


def test_batch_script_outside_srun_runs_single_process(monkeypatch, join_calls, caplog):
    slurm_2x4(monkeypatch, procid=0, localid=0, nodeid=0)
    monkeypatch.delenv("SLURM_STEP_ID")  # the batch script itself, not an srun step
    with caplog.at_level(logging.WARNING, logger="fogjax.distributed"):
        info = distributed.initialize()
    assert join_calls == [] and info.source == "single"
    assert "srun" in caplog.text


@pytest.mark.parametrize(
    "env, words",
    [
        (
            {"FOGJAX_NUM_PROCESSES": "2"},
            ["FOGJAX_NUM_PROCESSES set", "FOGJAX_COORDINATOR_ADDRESS", "FOGJAX_PROCESS_ID"],
        ),
        (
            {"FOGJAX_COORDINATOR_ADDRESS": "h:1", "FOGJAX_PROCESS_ID": "0"},
            ["FOGJAX_NUM_PROCESSES missing"],
        ),
        (
            {"FOGJAX_COORDINATOR_ADDRESS": "h:1", "FOGJAX_NUM_PROCESSES": "2"}
            | {"FOGJAX_PROCESS_ID": "2"},
            ["process_id=2", "num_processes=2", "FOGJAX_PROCESS_ID"],
        ),
        (
            {"FOGJAX_COORDINATOR_ADDRESS": "h", "FOGJAX_NUM_PROCESSES": "2"}
            | {"FOGJAX_PROCESS_ID": "1"},
            ["host:port", "FOGJAX_COORDINATOR_ADDRESS"],
        ),
        ({"FOGJAX_NUM_PROCESSES": "two"}, ["FOGJAX_NUM_PROCESSES='two'", "not an integer"]),
        ({"FOGJAX_LOCAL_DEVICE_IDS": "0;1"}, ["FOGJAX_LOCAL_DEVICE_IDS", "comma-separated"]),
    ],
)
def test_inconsistent_explicit_settings(env, words):
    with pytest.raises(ValueError) as err:
        distributed.resolve(env)
    for word in words:
        assert word in str(err.value)


def test_inconsistent_slurm_settings(monkeypatch, join_calls):
    slurm_2x4(monkeypatch, procid=8, localid=0, nodeid=1)
    with pytest.raises(ValueError, match="process_id=8 is outside"):
        distributed.initialize()
    slurm_2x4(monkeypatch, procid="x", localid=0, nodeid=1)
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        distributed.initialize()
    assert join_calls == []


# --- the sbatch script --------------------------------------------------------------------------


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_sbatch_script_asks_for_the_documented_resources():
    text = SBATCH.read_text()
    for line in (
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=TERM@120",
        "#SBATCH --requeue",
    ):
        assert line in text
    assert re.search(r"srun .*-m fogjax\.train --config=\"\$\{CONFIG\}\" --workdir=", text)


def _sbatch_xla_flags() -> str:
    """XLA_FLAGS as the sbatch script sets it, evaluated by bash with none set before."""
    block = re.search(r"# >>> xla-flags\n(.*)# <<< xla-flags", SBATCH.read_text(), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        ["bash", "-c", block + 'printf %s "$XLA_FLAGS"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_sbatch_xla_flags_are_known_to_the_installed_xla():
    flags = _sbatch_xla_flags()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    # XLA parses every flag (GPU ones included) on any backend and aborts on an unknown one.
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    code = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)).sum())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "4.0", out.stderr[-2000:]


# --- two real processes -------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from fogjax import distributed, sharding

    info = distributed.initialize()
    assert (jax.process_count(), jax.process_index()) == (2, info.process_id)
    assert len(jax.devices()) == 8 and len(jax.local_devices()) == 4

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    index, count = sharding.process_batch_shard(mesh)
    assert (index, count) == (info.process_id, 2), (index, count)
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)  # the global batch
    local = rows[index * 4 : (index + 1) * 4]
    batch = sharding.global_batch_from_local(local, mesh)
    assert batch.shape == (8, 3)
    total = jax.jit(lambda b: jnp.sum(b * jnp.arange(1, 9)[:, None]))(batch)
    assert int(total) == int((rows * np.arange(1, 9)[:, None]).sum()), int(total)

    # Tensor groups spanning both processes: both must load the same (only) batch shard.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    assert sharding.process_batch_shard(mesh) == (0, 1)
    print("worker ok", info.process_id)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# In two of four full-suite runs on 2 busy cores (stop 7), this test timed out with process 0
# having printed "worker ok" but not exited; the cause is not established (it never reproduced
# alone, even beside CPU hogs). It was meant to never overlap test_scale_out's two-process test
# (an xdist_group), but pytest 9.2 ignores the node-id rewrite xdist 3.8's loadgroup relies on, so
# the two have run side by side in every CI run since, without a hang; each uses its own port.
def test_two_processes_join_on_localhost(tmp_path):
    port = _free_port()
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "FOGJAX_")) and k != "XLA_FLAGS"
    }
    base.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        FOGJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        FOGJAX_NUM_PROCESSES="2",
        PYTHONPATH=str(ROOT),
    )
    # Output to files, not pipes: an undrained pipe of one process can never block the other.
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", _WORKER],
                        env=dict(base, FOGJAX_PROCESS_ID=str(i)),
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 180
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below, with both logs
                p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # Both logs in any failure: a hang in one process usually shows in the other's output.
    outputs = [log.read_text() for log in logs]
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{out[-2000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
    )
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0 and f"worker ok {i}" in out, report
