"""A step-time ESTIMATE from the optimized GPU HLO: a roofline per kernel, summed.

XLA's own GPU cost models (GpuPerformanceModel, the latency-hiding scheduler's estimator) are not
reachable from JAX without a device (``compiled.cost_analysis()`` returns None for a deviceless
compile), so this is a roofline over the program XLA produced. Every kernel of every control-flow
computation, times the computation's executions per step (a scanned layer body runs L times):

- GEMM (cuBLASLt call, Triton GEMM fusion, plain dot): max(FLOPs / (peak of its operand dtype x
  GEMM efficiency), bytes / (HBM bandwidth x memory efficiency)). FP8 operands run at the FP8
  peak, BF16/F16 at the BF16 peak, F32 at the TF32 peak (JAX's default precision on GPU).
- cuDNN fused attention: model FLOPs (causal) / (peak of its dtype x attention efficiency).
- Collective: bytes x ring factor / (link bandwidth x link efficiency); NVLink inside a node,
  the network when the group spans nodes. All-reduce moves 2(n-1)/n of its bytes, all-gather
  and reduce-scatter (n-1)/n.
- Every other kernel (fusions, copies, reductions): bytes read + written / (HBM bandwidth x
  memory efficiency). A fusion that dynamic-slices a stacked [L, ...] operand reads one slice;
  one that updates a slice in place writes one slice.
- Each kernel also pays ``kernel_overhead_s`` (launch and tail).

Nothing overlaps in this model (compute, memory and communication add up), which makes it
pessimistic where XLA overlaps collectives with compute, and it knows nothing of cache reuse
between kernels. It is an estimate, labelled so wherever it is shown; benchmarks/README.md lists
its assumptions and, once a GPU has run the same step, its measured error.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from fogjax.bench import gemms as gemm_lib
from fogjax.bench.hlo_module import CONTROL_FLOW, HloModule, array_bytes, executions, op_name
from fogjax.bench.hlo_stats import HloInstruction, is_fp8_hlo_type
from fogjax.bench.targets import GPUS_PER_NODE, Rates

# Instructions that launch no kernel of their own.
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "domain",
    "add-dependency",
    *CONTROL_FLOW,
}
_SLICING = ("dynamic-slice", "slice", "gather")


def _gemm_family(lhs_dtype: str, rhs_dtype: str) -> str:
    """The rate a GEMM runs at: FP8 needs both operands FP8; F32 operands run as TF32."""
    if is_fp8_hlo_type(lhs_dtype) and is_fp8_hlo_type(rhs_dtype):
        return "fp8"
    return "tf32" if "f32" in (lhs_dtype, rhs_dtype) or "f64" in (lhs_dtype, rhs_dtype) else "bf16"


def _peak(rates: Rates, family: str) -> float:
    return {"fp8": rates.fp8_flops, "bf16": rates.bf16_flops, "tf32": rates.tf32_flops}[family]


_PASS_THROUGH = ("bitcast", "reshape", "get-tuple-element")


def _read_bytes(module: HloModule, inst: HloInstruction) -> float:
    """Bytes a kernel reads: its operands, except that an operand the fusion only slices counts
    as the slices it reads (a layer's weights out of the stacked [L, ...] parameters), and the
    buffer a fusion updates in place (a dynamic-update-slice root's operand 0) is not read."""
    if inst.opcode == "dynamic-slice":
        return array_bytes(inst.shapes)
    if inst.opcode == "dynamic-update-slice":
        return sum(array_bytes(s) for s in inst.operand_shapes[1:])
    if inst.opcode != "fusion":
        return sum(array_bytes(s) for s in inst.operand_shapes)
    inner = module.fused(inst)
    by_name = {i.name: i for i in inner}
    users = collections.defaultdict(list)
    for i in inner:
        for operand in i.operands:
            if operand in by_name:
                users[operand].append(i)
    in_place = set()
    root = inner[-1] if inner else None
    if root is not None and root.opcode == "dynamic-update-slice" and root.operands:
        in_place.add(root.operands[0])

    def read(name: str, full: float) -> float:
        """What reading ``name`` costs: the slices taken of it if every use slices it."""
        if name in in_place:
            return 0.0
        total = 0.0
        for user in users.get(name, []):
            if user.opcode in _SLICING:
                total += array_bytes(user.shapes)
            elif user.opcode in _PASS_THROUGH:
                total += read(user.name, full)
            elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
                continue
            else:
                return full
        return min(total, full)

    total = 0.0
    for i in inner:
        if i.opcode == "parameter":
            k = int(i.arguments)
            full = array_bytes(inst.operand_shapes[k]) if k < len(inst.operand_shapes) else 0.0
            total += read(i.name, full)
    return total


def _written_bytes(module: HloModule, inst: HloInstruction) -> float:
    """Bytes a kernel writes: its result, or only the update of an in-place slice update."""
    if inst.opcode == "dynamic-update-slice" and len(inst.operand_shapes) > 1:
        return array_bytes(inst.operand_shapes[1])
    if inst.opcode == "fusion":
        inner = module.fused(inst)
        root = inner[-1] if inner else None
        if root is not None and root.opcode == "dynamic-update-slice" and root.operand_shapes[1:]:
            return array_bytes(root.operand_shapes[1])
    # A cuBLAS call's result tuple carries its workspace (s8[...]): not written to HBM.
    shapes = tuple(s for s in inst.shapes if s[0] != "s8") if inst.opcode == "custom-call" else ()
    return array_bytes(shapes or inst.shapes)


@dataclasses.dataclass
class StepEstimate:
    """An estimated step time and where it goes, in seconds per step."""

    total_s: float = 0.0
    by_category: dict[str, float] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(float)
    )
    kernels_per_step: int = 0
    gemm_flops: dict[str, float] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(float)
    )
    unknown_trip_counts: tuple[str, ...] = ()
    # (seconds per step, category, instruction, JAX op path) of the costliest kernels.
    top_kernels: list[tuple[float, str, str, str]] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "is_estimate": True,
            "step_s": self.total_s,
            "by_category_s": dict(self.by_category),
            "kernels_per_step": self.kernels_per_step,
            "gemm_flops_per_step": dict(self.gemm_flops),
            "unknown_trip_counts": list(self.unknown_trip_counts),
            "top_kernels": [
                {"step_s": t, "category": c, "instruction": n, "op_name": o}
                for t, c, n, o in self.top_kernels
            ],
        }


def _collective_seconds(kind: str, nbytes: float, group_size: int, rates: Rates) -> float:
    n = max(group_size, 1)
    if n == 1:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all-reduce" else (n - 1) / n
    link = rates.network_bytes_per_s if n > GPUS_PER_NODE else rates.nvlink_bytes_per_s
    return nbytes * factor / (link * rates.link_efficiency)


def kernel_seconds(module: HloModule, inst: HloInstruction, rates: Rates) -> tuple[str, float, int]:
    """(category, seconds, GEMM FLOPs) of one execution of a top-level instruction; ('free', 0,
    0) for those that launch no kernel. FLOPs are 0 for everything but GEMMs."""
    if inst.opcode in _FREE or inst.opcode.endswith("-done"):
        return "free", 0.0, 0
    memory_rate = rates.memory_bytes_per_s * rates.memory_efficiency
    moved = _read_bytes(module, inst) + _written_bytes(module, inst)
    gemm = gemm_lib.gemm_of(module, inst)
    if gemm is not None:
        _, lhs_dtype, rhs_dtype, *_, flops = gemm
        family = _gemm_family(lhs_dtype, rhs_dtype)
        compute = flops / (_peak(rates, family) * rates.gemm_efficiency[family])
        seconds = max(compute, moved / memory_rate) + rates.kernel_overhead_s
        return f"gemm_{family}", seconds, flops
    target = inst.target or ""
    if inst.opcode == "custom-call" and target.startswith(gemm_lib.CUDNN_ATTENTION_PREFIX):
        fp8 = target.endswith("F8") or any(map(is_fp8_hlo_type, inst.operand_dtypes))
        peak = rates.fp8_flops if fp8 else rates.bf16_flops
        compute = gemm_lib.attention_flops(inst) / (peak * rates.attention_efficiency)
        category = "attention_fp8" if fp8 else "attention_bf16"
        return category, max(compute, moved / memory_rate) + rates.kernel_overhead_s, 0
    kind = gemm_lib.collective_kind(inst)
    if kind is not None:
        nbytes, n = gemm_lib.collective_bytes(inst), gemm_lib.group_size(inst)
        return (
            "collective",
            _collective_seconds(kind, nbytes, n, rates) + rates.kernel_overhead_s,
            0,
        )
    return "memory", moved / memory_rate + rates.kernel_overhead_s, 0


def estimate_step(module: HloModule, rates: Rates, top: int = 12) -> StepEstimate:
    """Sums :func:`kernel_seconds` over every kernel of one step (see the module docstring);
    keeps the ``top`` costliest kernels (time per step) to show where the time goes."""
    ex = executions(module)
    est = StepEstimate(unknown_trip_counts=ex.unknown_trip_counts)
    kernels = []
    for computation, runs in ex.runs.items():
        for inst in module.computations.get(computation, ()):
            category, seconds, flops = kernel_seconds(module, inst, rates)
            if category == "free":
                continue
            est.by_category[category] += seconds * runs
            est.total_s += seconds * runs
            est.kernels_per_step += runs
            kernels.append((seconds * runs, category, inst.name, op_name(inst)))
            if flops:
                est.gemm_flops[category.removeprefix("gemm_")] += flops * runs
    est.top_kernels = sorted(kernels, reverse=True)[:top]
    return est
