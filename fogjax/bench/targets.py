"""GPUs fogjax compiles for without having one: target configs, compile-only devices, rates.

XLA's GPU compiler needs only a description of the GPU (``GpuTargetConfigProto``: core count,
clocks, memory size and bandwidth, shared memory, compute capability, CUDA runtime and cuDNN
versions) to run its whole pipeline: GemmRewriter, fusion, scheduling, buffer assignment, PTX.
``jax.experimental.topologies.get_topology_desc(platform='cuda', ...)`` turns such a description
into compile-only devices; a ``jax.jit`` traced with shardings on them compiles for that GPU on any
machine (the ``jax-cuda13-plugin`` and ``-pjrt`` wheels must be installed, at jaxlib's version;
requirements-aot.txt). ``JAX_PLATFORMS=cpu`` keeps the plugin from looking for a driver.

The protos ship in ``fogjax/bench/targets/<name>.txtpb``. Each :class:`Target` also carries the
rates the step-time estimate uses (estimate.py); they are fogjax's assumptions, stated in
benchmarks/README.md, not something XLA reports.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jaxlib

_TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
GPUS_PER_NODE = 8
AOT_REQUIREMENTS = "requirements-aot.txt"


@dataclasses.dataclass(frozen=True)
class Rates:
    """Peak rates of one GPU and the fraction of each that a step reaches (the estimate's model).

    Attributes:
      bf16_flops, fp8_flops, tf32_flops: dense tensor-core peaks, FLOP/s (datasheet).
      memory_bytes_per_s: HBM bandwidth (datasheet).
      nvlink_bytes_per_s: one direction, per GPU, inside a node.
      network_bytes_per_s: per GPU between nodes (one 400 Gb/s NIC per GPU, 200 Gb/s on GH200).
      gemm_efficiency: achieved / peak for large GEMMs (per dtype family).
      attention_efficiency: achieved / peak of fused (flash) attention kernels.
      memory_efficiency, link_efficiency: achieved / peak bandwidth.
      kernel_overhead_s: launch and tail cost added to every kernel.
    """

    bf16_flops: float
    fp8_flops: float
    tf32_flops: float
    memory_bytes_per_s: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float
    gemm_efficiency: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"fp8": 0.65, "bf16": 0.75, "tf32": 0.7}
    )
    attention_efficiency: float = 0.55
    memory_efficiency: float = 0.8
    link_efficiency: float = 0.75
    kernel_overhead_s: float = 3e-6


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU kind fogjax can compile for: its proto file, what it holds, its rates."""

    name: str
    proto_file: str
    rates: Rates
    usable_memory_fraction: float = 0.95  # what XLA_PYTHON_CLIENT_MEM_FRACTION=.95 lets a run use
    proto: str | None = None  # the proto's text itself, instead of proto_file (edited copies)

    @functools.cached_property
    def proto_text(self) -> str:
        if self.proto is not None:
            return self.proto
        with open(os.path.join(_TARGET_DIR, self.proto_file)) as f:
            return f.read()

    def _field(self, name: str) -> str | None:
        match = re.search(rf"^\s*{name}:\s*\"?([^\"\n]+)\"?", self.proto_text, re.MULTILINE)
        return match.group(1) if match else None

    @property
    def device_name(self) -> str:
        return self._field("name") or self.name

    @property
    def memory_bytes(self) -> int:
        return int(self._field("device_memory_size") or 0)

    @property
    def usable_memory_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_memory_fraction)

    @property
    def runtime_version(self) -> str | None:
        return self._field("runtime_version")

    @property
    def compute_capability(self) -> tuple[int, int]:
        match = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", self.proto_text)
        parts = dict(re.findall(r"(major|minor):\s*(\d+)", match.group(1))) if match else {}
        return int(parts.get("major", 0)), int(parts.get("minor", 0))

    @property
    def cudnn_version(self) -> tuple[int, int, int]:
        match = re.search(r"dnn_version_info\s*\{([^}]*)\}", self.proto_text)
        parts = dict(re.findall(r"(major|minor|patch):\s*(\d+)", match.group(1))) if match else {}
        return tuple(int(parts.get(k, 0)) for k in ("major", "minor", "patch"))


_H100_RATES = dict(bf16_flops=989e12, fp8_flops=1979e12, tf32_flops=495e12)
TARGETS: dict[str, Target] = {
    "h100": Target(
        "h100",
        "h100.txtpb",
        Rates(
            **_H100_RATES,
            memory_bytes_per_s=3.35e12,
            nvlink_bytes_per_s=450e9,
            network_bytes_per_s=50e9,
        ),
    ),
    "h200": Target(
        "h200",
        "h200.txtpb",
        Rates(
            **_H100_RATES,
            memory_bytes_per_s=4.8e12,
            nvlink_bytes_per_s=450e9,
            network_bytes_per_s=50e9,
        ),
    ),
    "gh200": Target(
        "gh200",
        "gh200.txtpb",
        Rates(
            **_H100_RATES,
            memory_bytes_per_s=4.0e12,
            nvlink_bytes_per_s=450e9,
            network_bytes_per_s=25e9,
        ),
    ),
}


class TargetUnavailable(RuntimeError):
    """Compiling for a GPU target is not possible in this environment; the message says why."""


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"Unknown --target={name!r}; choose one of {sorted(TARGETS)}.")
    return TARGETS[name]


def topology_name(gpus: int) -> str:
    """'1x<hosts>x<gpus per host>': full nodes of :data:`GPUS_PER_NODE`, or one partial node."""
    if gpus < 1:
        raise ValueError(f"--gpus={gpus} must be >= 1.")
    if gpus <= GPUS_PER_NODE:
        return f"1x1x{gpus}"
    if gpus % GPUS_PER_NODE:
        raise ValueError(
            f"--gpus={gpus}: more than one node must be whole nodes of {GPUS_PER_NODE} GPUs "
            f"(e.g. --gpus={math.ceil(gpus / GPUS_PER_NODE) * GPUS_PER_NODE})."
        )
    return f"1x{gpus // GPUS_PER_NODE}x{GPUS_PER_NODE}"


def _topology_desc(proto_text: str, topology: str) -> Any:
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        platform="cuda", topology=topology, target_config=proto_text
    )


@functools.cache
def _devices(proto_text: str, topology: str) -> tuple[Any, ...]:
    try:
        return tuple(_topology_desc(proto_text, topology).devices)
    except Exception as e:  # the plugin is missing, or too old/new for this jaxlib
        raise TargetUnavailable(
            f"Cannot make compile-only CUDA devices ({type(e).__name__}: {e}). Install the CUDA "
            f"plugin at jaxlib's version: `pip install -r {AOT_REQUIREMENTS}` (jaxlib "
            f"{jaxlib.__version__}), and run with JAX_PLATFORMS=cpu on a machine without a GPU."
        ) from e


def target_devices(target: Target, gpus: int = 1) -> Sequence[Any]:
    """``gpus`` compile-only devices of ``target`` (several nodes of 8 for more than 8)."""
    return _devices(target.proto_text, topology_name(gpus))
