"""Does a run fit in this machine's memory? On CPU, a step that cannot is refused before it runs.

On a GPU, XLA refuses a step that does not fit in device memory when it compiles it
(RESOURCE_EXHAUSTED, which :class:`fogjax.train.control.CompiledSteps` turns into a clean error).
On CPU the devices' memory is the host's, and nothing refuses: the 8B config on a CPU machine
printed nothing for minutes while the host paged, holding ``trainer.lock``, and in a memory
cgroup it was OOM-killed without a word. Two checks refuse such a run first, on CPU only:

- :func:`check_state_fits`, before anything is written: the train state as it will lie on this
  host (every local device's shard of the parameters, optimizer state and FP8 state, from the
  Run's abstract state) plus one gradient tree, which every step holds at once;
- :func:`check_step_fits`, once the step is compiled and before it first runs: what XLA's memory
  analysis of the compiled step needs beyond its inputs (activations and temporaries), per
  device, times the local devices.

Both compare with the memory available now (:func:`available_memory`): ``MemAvailable`` of
``/proc/meminfo``, or less when this process's memory cgroup (v1 or v2) has a limit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np

from fogjax import optim

# The share of the available memory a run may plan for: the runtime, the data pipeline, the
# checkpoint's host copy and Python need the rest.
HEADROOM = 0.9
# cgroup v1 reports "no limit" as a huge number (2**63 rounded down to pages).
_NO_LIMIT = 2**60


@dataclasses.dataclass(frozen=True)
class Available:
    """Bytes of memory this process can still use, and where that number comes from."""

    bytes: int
    source: str


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _read_int(path: str) -> int | None:
    """The integer in ``path``; None if it is missing, unreadable or 'max' (no limit)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: str, key: str) -> int:
    """One counter of a cgroup's ``memory.stat`` (0 if absent)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs(proc: str, cgroup_root: str) -> list[tuple[str, str, str, str]]:
    """(directory, limit file, usage file, inactive-file counter) of this process's memory
    cgroup: its own path first, then the mount's root (inside a container, its cgroup is the
    root of what is mounted)."""
    try:
        with open(os.path.join(proc, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: one unified hierarchy.
            bases = [os.path.join(cgroup_root, path.lstrip("/")), cgroup_root]
            files = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1: the memory controller's own.
            root = os.path.join(cgroup_root, "memory")
            bases = [os.path.join(root, path.lstrip("/")), root]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        found += [(base, *files) for base in dict.fromkeys(bases)]
    return found


def _cgroup_free(proc: str, cgroup_root: str) -> Available | None:
    for base, limit_file, usage_file, inactive in _cgroup_dirs(proc, cgroup_root):
        limit = _read_int(os.path.join(base, limit_file))
        usage = _read_int(os.path.join(base, usage_file))
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        # Usage counts the page cache; its inactive part is reclaimed before the OOM killer runs.
        used = max(0, usage - _stat(os.path.join(base, "memory.stat"), inactive))
        return Available(
            max(0, limit - used),
            f"the memory cgroup's limit of {gib(limit)} less {gib(used)} in use, "
            f"{os.path.join(base, limit_file)}",
        )
    return None


def available_memory(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> Available:
    """The memory this process can still use: MemAvailable, or a memory cgroup's remaining
    allowance when that is smaller. ``proc`` and ``cgroup_root`` are where those are mounted."""
    meminfo = os.path.join(proc, "meminfo")
    best = Available(_NO_LIMIT, "no limit found")
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    best = Available(int(line.split()[1]) * 1024, f"MemAvailable in {meminfo}")
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_free(proc, cgroup_root)
    return cgroup if cgroup is not None and cgroup.bytes < best.bytes else best


def _on_cpu(mesh: Any) -> bool:
    return mesh.devices.flat[0].platform == "cpu"


def _local_elements(leaf: Any) -> int:
    """Elements of ``leaf`` held by this process's devices (each replica counts)."""
    sharding = leaf.sharding
    return math.prod(sharding.shard_shape(leaf.shape)) * len(sharding.addressable_devices)


def state_bytes(run: Any) -> tuple[int, int]:
    """(train state, one gradient tree): bytes on this host's devices for ``run``'s layout."""
    state = sum(
        _local_elements(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(run.abstract)
    )
    grad_size = np.dtype(optim.grad_dtype(run.config.optim)).itemsize
    grads = sum(_local_elements(x) * grad_size for x in jax.tree.leaves(run.abstract["params"]))
    return state, grads


def check_state_fits(run: Any, available: Available | None = None) -> None:
    """Raises ValueError naming what to reduce if ``run``'s train state and one gradient tree
    cannot fit in the host memory available (CPU runs only; None: :func:`available_memory`)."""
    if not _on_cpu(run.mesh):
        return
    state, grads = state_bytes(run)
    avail = available or available_memory()
    if state + grads <= HEADROOM * avail.bytes:
        return
    devices = len(run.mesh.local_devices)
    copies = (
        f" (each of the {devices} CPU devices holds its copy: --config.mesh.fsdp={devices} "
        "shards it instead)"
        if devices > 1
        else ""
    )
    raise ValueError(
        f"This run does not fit in host memory: its train state needs {gib(state)} and one "
        f"gradient tree {gib(grads)} on this machine{copies}, but {gib(avail.bytes)} is "
        f"available ({avail.source}); it would stall or be killed. Train a smaller model (a "
        "smaller SIZE in --config=configs/ARCH.py:SIZE, or fewer model.num_layers / "
        "model.d_model), keep the optimizer state in fewer bits "
        "(--config.optim.state_precision=fog_fp16, docs/optimizer_state.md), or train on GPUs. "
        "python -m fogjax.info --config=... shows the memory of each part. Nothing was written."
    )


def check_step_fits(compiled: Any, run: Any, available: Available | None = None) -> None:
    """Raises ValueError naming what to reduce if the compiled train step needs more host memory
    beyond its inputs (the train state, already allocated) than is available (CPU runs only)."""
    if not _on_cpu(run.mesh):
        return
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # Not every backend and version has one: then only the state is checked.
        return
    if analysis is None:
        return
    outputs = max(0, analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    devices = len(run.mesh.local_devices)
    need = (analysis.temp_size_in_bytes + outputs) * devices
    avail = available or available_memory()
    if need <= HEADROOM * avail.bytes:
        return
    t = run.config.train
    raise ValueError(
        f"The train step does not fit in host memory: beyond the train state it needs "
        f"{gib(need)} for activations and temporaries (XLA's memory analysis of the compiled "
        f"step, {gib(need / devices)} per device x {devices} CPU device(s)), but "
        f"{gib(avail.bytes)} is available ({avail.source}); it would stall or be killed. Lower "
        f"train.batch_size (now {t.batch_size}) or train.seq_len (now {t.seq_len}), raise "
        f"train.micro_batches (now {t.micro_batches}), or set --config.model.remat=full. No "
        "step ran and no checkpoint was written."
    )
