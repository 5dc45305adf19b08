"""An optimized HLO module as computations and a call graph: how often each computation runs.

A compiled train step is a handful of computations: ENTRY, the ``while`` bodies of ``nn.scan``
over layers (and of ``lax.scan`` over micro-batches), their conditions, and many fused
computations. What one step costs is the sum over the computations that run as control flow
(ENTRY, loop bodies, ``call`` targets, conditional branches), each weighted by how many times it
runs: a ``while`` body runs its ``known_trip_count`` times (XLA records it in the while's
backend_config). Fused computations are not control flow: their parent instruction is the unit of
work (one kernel), and they are only looked into to find what the kernel computes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Iterator

from fogjax.bench.hlo_stats import ArrayType, HloInstruction, instructions

_ENTRY = re.compile(r"^\s*ENTRY\s+%?(?P<name>[\w.\-]+)", re.MULTILINE)
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_CALLED = re.compile(
    r"\b(?P<kind>body|condition|to_apply|calls|true_computation|false_computation)=%?"
    r"(?P<name>[\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')

# Opcodes that run other computations as control flow (their callees are costed themselves).
CONTROL_FLOW = ("while", "call", "conditional")

DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "f16": 2,
    "bf16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}


def element_bytes(dtype: str) -> float:
    """Bytes per element of an HLO element type (FP8 kinds 1, FP4 kinds 0.5; tokens 0)."""
    if dtype.startswith("f8"):
        return 1
    if dtype.startswith("f4"):
        return 0.5
    return DTYPE_BYTES.get(dtype, 0)


def array_bytes(types: tuple[ArrayType, ...]) -> float:
    """Total bytes of the arrays ``types`` (one result, or every element of a tuple)."""
    return sum(element_bytes(dtype) * math.prod(dims) for dtype, dims in types)


def op_name(inst: HloInstruction) -> str:
    """The JAX source op path of an instruction (``jit(f)/jvp(Transformer)/.../dot_general``)."""
    match = _OP_NAME.search(inst.attributes)
    return match["op_name"] if match else ""


def trip_count(inst: HloInstruction) -> int | None:
    """A ``while``'s known trip count, or None when XLA did not record one."""
    match = _TRIP_COUNT.search(inst.attributes)
    return int(match["n"]) if match else None


def backend_config(inst: HloInstruction) -> dict:
    """The instruction's ``backend_config`` JSON ({} when absent or not JSON)."""
    start = inst.attributes.find("backend_config=")
    if start < 0:
        return {}
    text = inst.attributes[start + len("backend_config=") :]
    try:
        config, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


@dataclasses.dataclass
class HloModule:
    """The computations of an HLO module's text, by name, and the name of its ENTRY."""

    computations: dict[str, list[HloInstruction]]
    entry: str

    def fused(self, inst: HloInstruction) -> list[HloInstruction]:
        """The instructions of the computation a ``fusion`` (or ``async-start``) calls."""
        match = re.search(r"\bcalls=%?(?P<name>[\w.\-]+)", inst.attributes)
        return self.computations.get(match["name"], []) if match else []

    def fused_deep(self, inst: HloInstruction) -> Iterator[HloInstruction]:
        """Every instruction inside a fusion, through nested fusions (Triton GEMM fusions nest
        their operand computations)."""
        seen = set()
        stack = list(self.fused(inst))
        while stack:
            inner = stack.pop()
            if (inner.computation, inner.name) in seen:
                continue
            seen.add((inner.computation, inner.name))
            yield inner
            if inner.opcode == "fusion":
                stack.extend(self.fused(inner))


def parse_module(hlo_text: str) -> HloModule:
    """Splits an HLO module's text into its computations (see hlo_stats.instructions)."""
    computations: dict[str, list[HloInstruction]] = collections.defaultdict(list)
    for inst in instructions(hlo_text):
        computations[inst.computation].append(inst)
    entry = _ENTRY.search(hlo_text)
    if entry is None:
        raise ValueError("The HLO text has no ENTRY computation.")
    return HloModule(dict(computations), entry["name"])


def _callees(inst: HloInstruction) -> list[tuple[str, int | None]]:
    """(computation, runs per execution of ``inst``) for a control-flow instruction; None runs
    means a while without a known trip count."""
    if inst.opcode == "while":
        n = trip_count(inst)
        callees = []
        for m in _CALLED.finditer(inst.attributes):
            if m["kind"] == "body":
                callees.append((m["name"], n))
            elif m["kind"] == "condition":
                callees.append((m["name"], None if n is None else n + 1))
        return callees
    if inst.opcode == "call":
        return [
            (m["name"], 1) for m in _CALLED.finditer(inst.attributes) if m["kind"] == "to_apply"
        ]
    if inst.opcode == "conditional":
        # Each branch counted as if it ran: an upper bound (the step has no data-dependent ones).
        names = [m["name"] for m in _CALLED.finditer(inst.attributes) if "computation" in m["kind"]]
        branches = _BRANCHES.search(inst.attributes)
        if branches:
            names += [n.strip().lstrip("%") for n in branches["names"].split(",") if n.strip()]
        return [(n, 1) for n in names]
    return []


@dataclasses.dataclass(frozen=True)
class Executions:
    """How often each control-flow computation runs in one execution of the module.

    Attributes:
      runs: {computation name: times it runs}.
      unknown_trip_counts: while loops (by instruction name) without a known trip count, counted
        as running once: an estimate that includes them is a lower bound.
    """

    runs: dict[str, int]
    unknown_trip_counts: tuple[str, ...]


def executions(module: HloModule) -> Executions:
    """Walks the call graph from ENTRY, multiplying trip counts down nested loops."""
    runs: collections.Counter[str] = collections.Counter()
    unknown: list[str] = []

    def visit(name: str, times: int) -> None:
        runs[name] += times
        for inst in module.computations.get(name, ()):
            if inst.opcode not in CONTROL_FLOW:
                continue
            for callee, n in _callees(inst):
                if n is None:
                    unknown.append(inst.name)
                    n = 1
                visit(callee, times * n)

    visit(module.entry, 1)
    return Executions(dict(runs), tuple(unknown))


def loop_trip_counts(module: HloModule) -> dict[str, tuple[int, ...]]:
    """{computation: the trip counts of the while loops enclosing it, outermost first}."""
    chains: dict[str, tuple[int, ...]] = {}

    def visit(name: str, chain: tuple[int, ...]) -> None:
        if name in chains:
            return
        chains[name] = chain
        for inst in module.computations.get(name, ()):
            if inst.opcode not in CONTROL_FLOW:
                continue
            n = trip_count(inst) if inst.opcode == "while" else None
            for callee, _ in _callees(inst):
                visit(callee, chain + (n,) if n is not None else chain)

    visit(module.entry, ())
    return chains
