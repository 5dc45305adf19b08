"""A run that cannot fit in host memory is refused before it starts (issue 21): the memory
available (MemAvailable, a cgroup v1 or v2 limit), the train-state check before anything is
written, the compiled step's check before it first runs, and the 8B config on this CPU machine."""

from __future__ import annotations

import os
import sys
import types

import jax
import numpy as np
import pytest
from helpers.cli import run

from fogjax import config_lib
from fogjax.train import host_memory
from fogjax.train.control import CompiledSteps, StopRequest
from fogjax.train.host_memory import Available, available_memory
from fogjax.train.run import build_run

GIB = 2**30


def fake_system(tmp_path, cgroup_line, files):
    """A /proc with MemAvailable = 8 GiB and the given /proc/self/cgroup line, and a cgroup mount
    holding ``files`` ({relative path: text})."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 16777216 kB\nMemAvailable: {8 * 2**20} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    for path, text in files.items():
        (cgroup / path).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / path).write_text(text)
    return str(proc), str(cgroup)


def test_available_memory_is_the_smaller_of_memavailable_and_the_cgroup_allowance(tmp_path):
    # cgroup v2, limit 4 GiB, 3 GiB used of which 1 GiB is reclaimable page cache: 2 GiB left.
    v2 = {"job/memory.max": str(4 * GIB), "job/memory.current": str(3 * GIB),
          "job/memory.stat": f"anon 1\ninactive_file {GIB}\n"}  # fmt: skip
    got = available_memory(*fake_system(tmp_path / "v2", "0::/job", v2))
    assert got.bytes == 2 * GIB and "memory cgroup's limit of 4.0 GiB" in got.source
    # cgroup v1 inside a container: its own path is not mounted, the mount's root is its cgroup.
    v1 = {"memory/memory.limit_in_bytes": str(6 * GIB), "memory/memory.usage_in_bytes": str(GIB)}
    got = available_memory(*fake_system(tmp_path / "v1", "4:memory:/docker/abc", v1))
    assert got.bytes == 5 * GIB and "memory.limit_in_bytes" in got.source
    # No limit ('max', or v1's huge number), or a limit above MemAvailable: MemAvailable.
    for name, files in {
        "max": {"memory.max": "max", "memory.current": str(GIB)},
        "huge": {"memory/memory.limit_in_bytes": str(2**63 - 4096),
                 "memory/memory.usage_in_bytes": str(GIB)},
        "roomy": {"memory.max": str(64 * GIB), "memory.current": str(GIB)},
    }.items():  # fmt: skip
        line = "4:memory:/" if name == "huge" else "0::/"
        got = available_memory(*fake_system(tmp_path / name, line, files))
        assert got == Available(8 * GIB, f"MemAvailable in {tmp_path / name / 'proc' / 'meminfo'}")
    # This machine: a positive number from somewhere.
    assert available_memory().bytes > 0


def tiny_run(data, fsdp):
    config = config_lib.get_config("fog_flash", "tiny")
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return build_run(config)


def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_state_check_counts_every_local_copy_and_names_what_to_reduce():
    # The tests' 8 CPU devices share this host's memory: replicated, each holds a copy.
    replicated = tiny_run(data=8, fsdp=1)
    state, grads = host_memory.state_bytes(replicated)
    assert state == 8 * nbytes(replicated.abstract)
    assert grads == 8 * nbytes(replicated.abstract["params"])  # float32 gradients
    sharded = tiny_run(data=1, fsdp=8)
    assert nbytes(sharded.abstract) <= host_memory.state_bytes(sharded)[0] < state / 4
    host_memory.check_state_fits(replicated, Available(2 * (state + grads), "test"))
    with pytest.raises(ValueError) as e:
        host_memory.check_state_fits(replicated, Available(state + grads, "a test's allowance"))
    message = str(e.value)
    for needle in ("does not fit in host memory", "a test's allowance", "configs/ARCH.py:SIZE",
                   "model.num_layers", "optim.state_precision=fog_fp16", "Nothing was written",
                   "each of the 8 CPU devices holds its copy: --config.mesh.fsdp=8"):  # fmt: skip
        assert needle in message, (needle, message)


class FakeCompiled:
    """A compiled step whose memory analysis says 3 GiB of temporaries, outputs donated."""

    def memory_analysis(self):
        return types.SimpleNamespace(
            temp_size_in_bytes=3 * GIB, output_size_in_bytes=GIB, alias_size_in_bytes=GIB
        )


def test_compiled_step_is_checked_before_it_first_runs(monkeypatch):
    """CompiledSteps refuses a step whose activations do not fit, naming the train.* fields;
    the same step passes when the memory is there."""
    config = config_lib.get_config("fog_flash", "tiny")
    config.train.batch_size, config.train.seq_len, config.train.micro_batches = 512, 4096, 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    jitted = types.SimpleNamespace(lower=lambda *a: types.SimpleNamespace(compile=FakeCompiled))
    fake_run = types.SimpleNamespace(config=config, mesh=mesh, train_steps={False: jitted})
    monkeypatch.setattr(host_memory, "available_memory", lambda: Available(2 * GIB, "2 GiB"))
    steps = CompiledSteps(fake_run, StopRequest(), lambda line: None)
    with pytest.raises(ValueError) as e:
        steps.at(1, False, None, None)
    message = str(e.value)
    for needle in ("does not fit in host memory", "3.0 GiB per device x 1 CPU device",
                   "train.batch_size (now 512)", "train.seq_len (now 4096)",
                   "train.micro_batches (now 2)", "remat=full", "No step ran"):  # fmt: skip
        assert needle in message, (needle, message)
    monkeypatch.setattr(host_memory, "available_memory", lambda: Available(8 * GIB, "8 GiB"))
    assert isinstance(steps.at(1, False, None, None), FakeCompiled)


@pytest.mark.slow
def test_8b_on_this_cpu_machine_is_refused_before_anything_is_written(tmp_path):
    run8b = build_run(config_lib.get_config("fog_flash", "8b"))
    state, grads = host_memory.state_bytes(run8b)
    if state + grads < available_memory().bytes:
        pytest.skip("this machine has the memory for 8B")
    workdir = tmp_path / "run8b"
    out = run([sys.executable, "-m", "fogjax.train", "--config=configs/fog_flash.py:8b",
               f"--workdir={workdir}"], timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "does not fit in host memory" in out.stderr and "Traceback" not in out.stderr
    assert "optim.state_precision=fog_fp16" in out.stderr
    assert not os.path.exists(workdir)  # No lock, no config, nothing.
