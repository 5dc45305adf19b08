"""Every GEMM, cuDNN attention call and collective of an optimized GPU HLO module.

A GEMM in XLA's optimized GPU program takes one of three forms:

- a cuBLASLt custom call: ``__cublas$lt$matmul$f8`` (FP8 operands) or ``__cublas$lt$matmul`` /
  ``__cublas$gemm`` (BF16, F32); the dot's dimension numbers are in its backend_config;
- a Triton GEMM fusion (``fusion`` with kind ``__triton_gemm`` / ``__triton_nested_gemm_fusion``),
  whose fused computation holds the ``dot`` and its operands' converts. Compiled without a GPU,
  XLA cannot autotune, so with ``xla_gpu_enable_triton_gemm`` on an FP8 dot lands here with f8
  operands instead of in cuBLASLt: it is still an FP8 GEMM;
- a plain ``dot`` that nothing rewrote.

Each is tagged with where it sits: inside the transformer block (its ``op_name`` metadata, JAX's
source path, runs through the ``layers`` module: ``.../layers/attn/wqkv/...`` under nn.scan,
``.../layers_3/mlp/wi/...`` unscanned) or outside it (embedding, LM head), and with how many times
it runs per step (the trip counts of the loops around it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from fogjax.bench.hlo_module import (
    HloModule,
    array_bytes,
    backend_config,
    executions,
    loop_trip_counts,
    op_name,
)
from fogjax.bench.hlo_stats import CUDNN_ATTENTION_PREFIX, HloInstruction, is_fp8_hlo_type

CUBLAS_TARGETS = ("__cublas$lt$matmul$f8", "__cublas$lt$matmul", "__cublas$gemm")
TRITON_GEMM_KINDS = ("__triton_gemm", "__triton_nested_gemm_fusion")
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
)
# The block's GEMM sites (model module paths under the layer stack).
ATTENTION_SITES = ("attn/qk", "attn/pv")

_LAYERS = re.compile(r"/layers(?:_\d+)?/(?P<site>[A-Za-z_]\w*/[A-Za-z_]\w*)")
_DOT_DIMS = re.compile(r"(?P<kind>lhs_contracting_dims|lhs_batch_dims)=\{(?P<dims>[\d,]*)\}")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<shape>[\d,]+)\]<=")
# XLA's mesh form: replica_groups=mesh['axis_0'=4,'axis_1'=2][, device_ids=(...)] {'axis_0'}: the
# group spans the named axes (a sub-axis 'axis_0':(1)2 spans its own size).
_GROUPS_MESH = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:, device_ids=[^{]*?)? \{(?P<over>[^}]*)\}"
)
_MESH_AXIS = re.compile(r"'(?P<name>[^']+)'=(?P<size>\d+)")
_MESH_OVER = re.compile(r"'(?P<name>[^']+)'(?::\(\d+\)(?P<sub>\d+))?")


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One GEMM of the optimized program.

    Attributes:
      name: HLO instruction name; computation: where it is.
      form: 'cublas' | 'triton' | 'dot'.
      lhs_dtype, rhs_dtype, out_dtype: HLO element types (``f8e4m3fn``, ``bf16``, ...).
      lhs_shape, rhs_shape, out_shape: dimensions.
      flops: 2 * output elements * contraction size, per execution.
      runs: executions per step (the product of enclosing loops' trip counts).
      site: the block's module path (``attn/wqkv``, ``mlp/wo``, ``attn/qk``...), '' outside.
      pass_: 'forward' or 'backward' (JAX's ``transpose(jvp(...))`` marks the backward pass).
      loops: trip counts of the enclosing while loops, outermost first.
    """

    name: str
    computation: str
    form: str
    lhs_dtype: str
    rhs_dtype: str
    out_dtype: str
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    flops: int
    runs: int
    site: str
    pass_: str
    loops: tuple[int, ...]

    @property
    def fp8(self) -> bool:
        return is_fp8_hlo_type(self.lhs_dtype) and is_fp8_hlo_type(self.rhs_dtype)

    @property
    def in_block(self) -> bool:
        return bool(self.site)

    @property
    def is_attention(self) -> bool:
        """QK^T or PV: the block's only batched GEMMs (the linears are [B*T, K] x [K, N]; XLA's
        metadata names an epilogue-fused GEMM after its neighbour, so the shape decides)."""
        return self.site in ATTENTION_SITES or (self.in_block and len(self.lhs_shape) >= 3)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        d.update(fp8=self.fp8, in_block=self.in_block)
        return d


def _site_and_pass(inst: HloInstruction) -> tuple[str, str]:
    name = op_name(inst)
    match = _LAYERS.search(name)
    return (match["site"] if match else ""), ("backward" if "transpose(" in name else "forward")


def _contraction(lhs_shape: tuple[int, ...], contracting: list[int]) -> int:
    return math.prod(lhs_shape[d] for d in contracting if d < len(lhs_shape))


def _shapes_and_flops(
    inst: HloInstruction, contracting: list[int]
) -> tuple[str, str, tuple, tuple, str, tuple, int] | None:
    """(lhs dtype, rhs dtype, lhs shape, rhs shape, out dtype, out shape, FLOPs) of a GEMM whose
    lhs contracts ``contracting``; None when the operand types are unknown."""
    if len(inst.operand_shapes) < 2 or not inst.operand_shapes[0] or not inst.operand_shapes[1]:
        return None
    (lt, ls), (rt, rs) = inst.operand_shapes[0][0], inst.operand_shapes[1][0]
    ot, os_ = inst.shapes[0]
    return lt, rt, ls, rs, ot, os_, 2 * math.prod(os_) * _contraction(ls, contracting)


def _cublas_gemm(inst: HloInstruction) -> tuple | None:
    """A cuBLAS custom call: its dimension numbers are in the backend_config."""
    dims = backend_config(inst).get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
    return _shapes_and_flops(inst, [int(d) for d in dims.get("lhs_contracting_dimensions", [])])


def _dot(inst: HloInstruction) -> tuple | None:
    """A ``dot`` instruction: its dimension numbers are attributes."""
    contracting = []
    for m in _DOT_DIMS.finditer(inst.attributes):
        if m["kind"] == "lhs_contracting_dims":
            contracting = [int(d) for d in m["dims"].split(",") if d]
    return _shapes_and_flops(inst, contracting)


def triton_gemm_kind(inst: HloInstruction) -> str | None:
    """The Triton GEMM fusion kind of a ``fusion`` instruction, or None for other fusions."""
    if inst.opcode != "fusion":
        return None
    kind = backend_config(inst).get("fusion_backend_config", {}).get("kind")
    return kind if kind in TRITON_GEMM_KINDS else None


def gemm_of(module: HloModule, inst: HloInstruction) -> tuple | None:
    """(form, lhs dtype, rhs dtype, lhs shape, rhs shape, out dtype, out shape, flops) of a GEMM
    instruction, or None if ``inst`` is not one."""
    if inst.opcode == "custom-call" and inst.target in CUBLAS_TARGETS:
        parsed = _cublas_gemm(inst)
        return ("cublas", *parsed) if parsed else None
    if triton_gemm_kind(inst):
        dots = [i for i in module.fused_deep(inst) if i.opcode == "dot"]
        # A split-K fusion's dot has the split as a batch dimension: its FLOPs are still 2 M N K.
        parsed = _dot(dots[0]) if dots else None
        return ("triton", *parsed) if parsed else None
    if inst.opcode == "dot":
        parsed = _dot(inst)
        return ("dot", *parsed) if parsed else None
    return None


def find_gemms(module: HloModule) -> list[Gemm]:
    """Every GEMM of the module's control-flow computations, with its runs per step."""
    runs = executions(module).runs
    loops = loop_trip_counts(module)
    gemms = []
    for computation, times in runs.items():
        for inst in module.computations.get(computation, ()):
            parsed = gemm_of(module, inst)
            if parsed is None:
                continue
            form, lt, rt, ls, rs, ot, os_, flops = parsed
            site, pass_ = _site_and_pass(inst)
            gemms.append(
                Gemm(
                    inst.name,
                    computation,
                    form,
                    lt,
                    rt,
                    ot,
                    tuple(ls),
                    tuple(rs),
                    tuple(os_),
                    int(flops),
                    times,
                    site,
                    pass_,
                    loops.get(computation, ()),
                )
            )
    return gemms


def non_fp8_block_gemms(gemms: list[Gemm], quantizes_attention: bool) -> list[Gemm]:
    """GEMMs inside the transformer block that are not FP8 although the recipe says they are:
    every block linear under an FP8 recipe, and QK^T / PV too when the recipe quantises attention
    (``fp8dpa``). Under ``fp8`` attention's GEMMs are BF16 by design and not listed."""
    return [
        g for g in gemms if g.in_block and not g.fp8 and (quantizes_attention or not g.is_attention)
    ]


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """A cuDNN fused-attention custom call: FLOPs from Q [B, T, N, d] and K [B, S, G, d]."""

    name: str
    target: str
    fp8: bool
    backward: bool
    flops: int
    runs: int


def attention_flops(inst: HloInstruction) -> int:
    """Model FLOPs of one fused attention call: the forward's two GEMMs 4 B N T S d (halved when
    causal); the backward recomputes QK^T and adds dV, dP, dQ, dK: 2.5 times the forward."""
    if len(inst.operand_shapes) < 2 or not inst.operand_shapes[0] or not inst.operand_shapes[1]:
        return 0
    q = inst.operand_shapes[0][0][1]
    k = inst.operand_shapes[1][0][1]
    if len(q) != 4 or len(k) != 4:
        return 0
    b, t, n, d = q
    s = k[1]
    forward = 4 * b * n * t * s * d
    if "CAUSAL" in inst.attributes.upper():
        forward //= 2
    return int(forward * 2.5) if "Backward" in (inst.target or "") else forward


def find_attention_calls(module: HloModule) -> list[AttentionCall]:
    runs = executions(module).runs
    calls = []
    for computation, times in runs.items():
        for inst in module.computations.get(computation, ()):
            target = inst.target or ""
            if inst.opcode != "custom-call" or not target.startswith(CUDNN_ATTENTION_PREFIX):
                continue
            fp8 = target.endswith("F8") or any(map(is_fp8_hlo_type, inst.operand_dtypes))
            calls.append(
                AttentionCall(
                    inst.name, target, fp8, "Backward" in target, attention_flops(inst), times
                )
            )
    return calls


def collective_kind(inst: HloInstruction) -> str | None:
    """'all-reduce', 'all-gather', ... for a collective (sync or the ``-start`` of an async one)."""
    op = inst.opcode.removesuffix("-start")
    return op if op in COLLECTIVES else None


def group_size(inst: HloInstruction) -> int:
    """Devices in each of a collective's replica groups (1 if the text does not say)."""
    listed = _GROUPS_LIST.search(inst.attributes)
    if listed:
        return max(1, len([d for d in listed["first"].split(",") if d]))
    iota = _GROUPS_IOTA.search(inst.attributes)
    if iota:
        return int(iota["shape"].split(",")[-1])
    mesh = _GROUPS_MESH.search(inst.attributes)
    if mesh:
        sizes = {m["name"]: int(m["size"]) for m in _MESH_AXIS.finditer(mesh["axes"])}
        return math.prod(
            int(m["sub"]) if m["sub"] else sizes.get(m["name"], 1)
            for m in _MESH_OVER.finditer(mesh["over"])
        )
    # A collective-permute sends to one peer.
    return 2 if "source_target_pairs=" in inst.attributes else 1


def collective_bytes(inst: HloInstruction) -> float:
    """Bytes each device sends into the collective: its operand for all-reduce / reduce-scatter /
    all-to-all / permute, its (gathered) result for all-gather."""
    kind = collective_kind(inst)
    operands = sum(array_bytes(s) for s in inst.operand_shapes)
    if kind == "all-gather":
        # An async start's result is (operand, result): take the largest array.
        return max((array_bytes((s,)) for s in inst.shapes), default=0)
    return operands


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    kind: str
    bytes: float
    group_size: int
    runs: int
    site: str


def find_collectives(module: HloModule) -> list[Collective]:
    runs = executions(module).runs
    found = []
    for computation, times in runs.items():
        for inst in module.computations.get(computation, ()):
            kind = collective_kind(inst)
            if kind is None:
                continue
            site, _ = _site_and_pass(inst)
            found.append(
                Collective(inst.name, kind, collective_bytes(inst), group_size(inst), times, site)
            )
    return found
