"""Joining JAX's multi-controller runtime: under SLURM's srun, from explicit settings, or not.

Where the settings come from, highest priority first:

1. Arguments of :func:`initialize` (the trainer's CLI flags).
2. ``FOGJAX_COORDINATOR_ADDRESS`` (host:port), ``FOGJAX_NUM_PROCESSES``, ``FOGJAX_PROCESS_ID`` and
   optionally ``FOGJAX_LOCAL_DEVICE_IDS`` (comma-separated), for clusters without SLURM.
3. Inside an ``srun`` step: the SLURM_* variables. The coordinator is the first host of the step's
   node list on port ``FOGJAX_COORDINATOR_PORT`` (default 12355). One process per GPU is the default
   (each process drives GPU ``SLURM_LOCALID``); with one task per node, the process drives every GPU
   of its node.
4. Nothing: a single-process run, and ``jax.distributed.initialize`` is never called.

Under SLURM, settings from 1 or 2 override single fields (e.g. a coordinator address on a faster
interface); without SLURM, an explicit setting must be complete. All parsing is pure
(:func:`resolve`), so tests exercise it with a fake environment; only :func:`_join_runtime` calls
into jax.distributed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_COORDINATOR_PORT = 12355
_EXPLICIT_VARS = ("FOGJAX_COORDINATOR_ADDRESS", "FOGJAX_NUM_PROCESSES", "FOGJAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """How this process joins the run.

    Attributes:
      coordinator_address: 'host:port' of process 0's coordination service; None single-process.
      num_processes: processes in the run (1 = single-process).
      process_id: this process's index in [0, num_processes).
      local_device_ids: the accelerator ids this process drives, None = all it can see.
      source: where the settings came from: 'slurm', 'explicit' or 'single'.
    """

    coordinator_address: str | None
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    source: str

    @property
    def is_multiprocess(self) -> bool:
        return self.num_processes > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist syntax -> host names, in order.

    'node[001-003,007],gpu-a1' -> ['node001', 'node002', 'node003', 'node007', 'gpu-a1'].
    Ranges keep the zero padding of their lower bound; several bracket groups in one name
    ('r[1-2]n[01-02]') expand as their product, as SLURM does.
    """
    hosts: list[str] = []
    for expr in _split_top_level(nodelist):
        hosts.extend(_expand_host(expr, nodelist))
    if not hosts:
        raise ValueError(f"Empty SLURM node list {nodelist!r}.")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Splits on the commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"Unbalanced brackets in SLURM node list {nodelist!r}.")
    if depth:
        raise ValueError(f"Unbalanced brackets in SLURM node list {nodelist!r}.")
    parts.append(nodelist[start:])
    return [p.strip() for p in parts if p.strip()]


_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_host(expr: str, nodelist: str) -> list[str]:
    """One host expression (no top-level commas) -> host names; the first bracket group first."""
    match = _BRACKET.search(expr)
    if match is None:
        return [expr]
    prefix, suffix = expr[: match.start()], expr[match.end() :]
    names = []
    for item in match.group(1).split(","):
        r = _RANGE.match(item.strip())
        if r is None:
            raise ValueError(f"Cannot parse range {item!r} in SLURM node list {nodelist!r}.")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"Descending range {item!r} in SLURM node list {nodelist!r}.")
        names.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return [h for n in names for h in _expand_host(prefix + n + suffix, nodelist)]


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE syntax -> tasks on each node: '4(x2),1' -> [4, 4, 1]."""
    counts = []
    for item in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise ValueError(f"Cannot parse SLURM tasks-per-node list {value!r}.")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer.") from None


def _override_int(env: Mapping[str, str], name: str, override: int | None) -> int | None:
    """``override`` if given, else the integer in ``env[name]``, else None."""
    if override is not None:
        return override
    return _int_var(env, name) if env.get(name, "").strip() else None


def _device_ids(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} must be comma-separated integers, e.g. '0,1'.") from None


def in_srun_step(env: Mapping[str, str]) -> bool:
    """True inside an srun job step (not merely inside an allocation or a batch script).

    A batch script or salloc shell also carries SLURM_JOB_ID and SLURM_NTASKS (the allocation's
    task count) but runs as one process; joining then would wait forever for the missing ones.
    """
    step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    return step and "SLURM_JOB_ID" in env and "SLURM_PROCID" in env


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node (0 if SLURM does not say). The per-node lists describe the
    step itself, so they win over SLURM_NTASKS_PER_NODE, which may echo the sbatch request."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env:
            counts = expand_tasks_per_node(env[name])
            node = _int_var(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
            if node >= len(counts):
                raise ValueError(
                    f"SLURM_NODEID={node} but {name}={env[name]!r} lists {len(counts)} nodes."
                )
            return counts[node]
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int_var(env, "SLURM_NTASKS_PER_NODE")
    return 1 if _int_var(env, "SLURM_NTASKS") == 1 else 0


def _gpus_visible(env: Mapping[str, str]) -> int | None:
    """How many GPUs this process can see: CUDA_VISIBLE_DEVICES if set, else SLURM_GPUS_ON_NODE."""
    if env.get("CUDA_VISIBLE_DEVICES", "").strip():
        return len(_device_ids(env["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES"))
    if "SLURM_GPUS_ON_NODE" in env:
        return _int_var(env, "SLURM_GPUS_ON_NODE")
    return None


def _from_slurm(env: Mapping[str, str]) -> DistributedInfo:
    nodelist_var = next(
        (v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if v in env),
        None,
    )
    if nodelist_var is None:
        raise ValueError("Inside srun but none of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set.")
    port = env.get("FOGJAX_COORDINATOR_PORT", str(DEFAULT_COORDINATOR_PORT))
    if not port.isdigit():
        raise ValueError(f"FOGJAX_COORDINATOR_PORT={port!r} is not a port number.")
    # Process 0 hosts the coordination service; SLURM places task 0 on the step's first node.
    host = expand_nodelist(env[nodelist_var])[0]
    ntasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    num_processes = _int_var(env, ntasks_var)
    visible = _gpus_visible(env)
    if _tasks_on_this_node(env) == 1:
        # One process per node drives all its GPUs.
        local = tuple(range(visible)) if visible else None
    elif visible == 1:
        # srun already bound one GPU to this task (--gpus-per-task=1): it is device 0 here.
        local = (0,)
    else:
        local = (_int_var(env, "SLURM_LOCALID"),)
    return DistributedInfo(
        coordinator_address=f"{host}:{port}",
        num_processes=num_processes,
        process_id=_int_var(env, "SLURM_PROCID"),
        local_device_ids=local,
        source="slurm",
    )


def resolve(
    env: Mapping[str, str],
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> DistributedInfo:
    """The settings this process should join with; pure (reads only ``env`` and the arguments).

    Arguments override FOGJAX_* variables, which override (field by field) what SLURM implies.

    Raises:
      ValueError: naming the variables, for partial explicit settings outside SLURM, unparsable
        values, or a process id outside [0, num_processes).
    """
    explicit = {
        "FOGJAX_COORDINATOR_ADDRESS": coordinator_address
        or env.get("FOGJAX_COORDINATOR_ADDRESS", "").strip()
        or None,
        "FOGJAX_NUM_PROCESSES": _override_int(env, "FOGJAX_NUM_PROCESSES", num_processes),
        "FOGJAX_PROCESS_ID": _override_int(env, "FOGJAX_PROCESS_ID", process_id),
    }
    devices = tuple(local_device_ids) if local_device_ids is not None else None
    if devices is None and env.get("FOGJAX_LOCAL_DEVICE_IDS", "").strip():
        devices = _device_ids(env["FOGJAX_LOCAL_DEVICE_IDS"], "FOGJAX_LOCAL_DEVICE_IDS")
    given = {k: v for k, v in explicit.items() if v is not None}

    if in_srun_step(env):
        base = _from_slurm(env)
        info = DistributedInfo(
            coordinator_address=given.get("FOGJAX_COORDINATOR_ADDRESS", base.coordinator_address),
            num_processes=given.get("FOGJAX_NUM_PROCESSES", base.num_processes),
            process_id=given.get("FOGJAX_PROCESS_ID", base.process_id),
            local_device_ids=devices if devices is not None else base.local_device_ids,
            source="slurm",
        )
    elif given:
        missing = [k for k in _EXPLICIT_VARS if k not in given]
        if missing:
            raise ValueError(
                f"Incomplete multi-process settings: {', '.join(sorted(given))} set but "
                f"{', '.join(missing)} missing (flags or environment). Set all three of "
                f"{', '.join(_EXPLICIT_VARS)}, or none for a single-process run."
            )
        info = DistributedInfo(
            coordinator_address=given["FOGJAX_COORDINATOR_ADDRESS"],
            num_processes=given["FOGJAX_NUM_PROCESSES"],
            process_id=given["FOGJAX_PROCESS_ID"],
            local_device_ids=devices,
            source="explicit",
        )
    else:
        if "SLURM_JOB_ID" in env and env.get("SLURM_NTASKS", "1") != "1":
            log.warning(
                "SLURM job with SLURM_NTASKS=%s, but this process is not in an srun step: running "
                "single-process. Launch with `srun python -m fogjax.train ...` to use all tasks.",
                env["SLURM_NTASKS"],
            )
        return DistributedInfo(None, 1, 0, devices, "single")

    if info.num_processes < 1:
        raise ValueError(f"num_processes={info.num_processes} must be >= 1 (FOGJAX_NUM_PROCESSES).")
    if not 0 <= info.process_id < info.num_processes:
        raise ValueError(
            f"process_id={info.process_id} is outside [0, num_processes={info.num_processes}) "
            f"(FOGJAX_PROCESS_ID / SLURM_PROCID vs FOGJAX_NUM_PROCESSES / SLURM_NTASKS)."
        )
    if info.is_multiprocess and ":" not in (info.coordinator_address or ""):
        raise ValueError(
            f"coordinator address {info.coordinator_address!r} must be host:port "
            "(FOGJAX_COORDINATOR_ADDRESS)."
        )
    return info


def _join_runtime(info: DistributedInfo) -> None:
    """The one call into jax.distributed (tests replace this function)."""
    jax.distributed.initialize(
        coordinator_address=info.coordinator_address,
        num_processes=info.num_processes,
        process_id=info.process_id,
        local_device_ids=None if info.local_device_ids is None else list(info.local_device_ids),
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedInfo:
    """Joins the multi-process runtime if this run has several processes; else does nothing.

    Call before anything else touches JAX devices. Arguments (CLI flags) override the environment
    (``os.environ`` unless ``env`` is given); see the module docstring for the order.

    Returns:
      The resolved settings, also logged with JAX's view of the process index, count and devices.
    """
    info = resolve(
        os.environ if env is None else env,
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids,
    )
    if info.is_multiprocess:
        log.info(
            "Joining %d processes as process %d via %s (%s), local devices %s.",
            info.num_processes,
            info.process_id,
            info.coordinator_address,
            info.source,
            "all visible" if info.local_device_ids is None else list(info.local_device_ids),
        )
        _join_runtime(info)
    log.info(
        "Process %d of %d; local devices: %s.",
        jax.process_index(),
        jax.process_count(),
        ", ".join(str(d) for d in jax.local_devices()),
    )
    return info


def all_processes(flag: bool) -> bool:
    """True iff ``flag`` is true on every process: the one place processes agree on a decision
    (a host collective when multi-process, so every process must call it at the same point)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.array(bool(flag))).all())


def any_process(flag: bool) -> bool:
    """True iff ``flag`` is true on at least one process (see :func:`all_processes`)."""
    return not all_processes(not flag)
