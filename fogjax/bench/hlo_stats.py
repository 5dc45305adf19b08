"""Where the FP8 GEMMs went: counters over HLO text and jaxprs.

On GPU, XLA rewrites a ``dot`` whose operands are FP8 into a cuBLASLt call with custom-call target
``__cublas$lt$matmul$f8``, and ``jax.nn.dot_product_attention(implementation='cudnn')`` lowers to
cuDNN fused-attention custom calls (``__cudnn$fmha...``; the FP8 variants end in ``F8``). Counting
them in the optimized HLO (``jax.jit(f).lower(...).compile().as_text()``) proves that a recipe
really runs its GEMMs on FP8 tensor cores. A scanned layer body is one HLO computation, so each
count is per scanned body, not per layer.

On CPU, the optimized HLO has no FP8 dot at all: XLA CPU converts the f8 operands to f32 before
an f32 GEMM (that is the emulation). There, count at the jaxpr level
(:func:`count_fp8_dot_generals`) or in the HLO before optimization
(``lowered.as_text(dialect='hlo')``) with :func:`count_fp8_dots`.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

FP8_GEMM_TARGET = "__cublas$lt$matmul$f8"
# jax/_src/cudnn/fused_attention_stablehlo.py: forward targets are __cudnn$fmhaSoftmax,
# __cudnn$fmhaScaleBiasSoftmax(Dropout), ...; backward ones end in "Backward"; the FP8 forms are
# __cudnn$fmhaSoftmaxF8 and __cudnn$fmhaSoftmaxBackwardF8.
CUDNN_ATTENTION_PREFIX = "__cudnn$fmha"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_ARRAY_TYPE = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\](?:\{[^}]*\})?")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)")
_OPCODE = re.compile(r"\s*(?P<op>[a-z][\w\-]*)\(")
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]*)"')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_COMMENT = re.compile(r"/\*.*?\*/")


# An array type of the HLO text: (element type, dimensions), e.g. ('bf16', (2048, 512)).
ArrayType = tuple[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class HloInstruction:
    """One instruction of an HLO module's text.

    Attributes:
      name: its name, without ``%``.
      dtype: result element type (``bf16``, ``f8e4m3fn``, ...), or ``tuple``.
      opcode: ``dot``, ``custom-call``, ``fusion``, ...
      operand_dtypes: element type of each operand (None where the text does not say and the
        operand is not defined earlier in the same computation).
      target: the custom-call target, or None.
      computation: the name of the computation that holds it.
      shapes: the result's array types, one per tuple element (one for an array result).
      operands: the operands' names (without ``%``; None for an operand that is not a name).
      operand_shapes: each operand's array types where known (as ``shapes``), else ().
      arguments: the operand list's text (``0`` for ``parameter(0)``).
      attributes: the text after the operand list (``calls=``, ``backend_config=``, ...).
    """

    name: str
    dtype: str
    opcode: str
    operand_dtypes: tuple[str | None, ...]
    target: str | None
    computation: str = ""
    shapes: tuple[ArrayType, ...] = ()
    operands: tuple[str | None, ...] = ()
    operand_shapes: tuple[tuple[ArrayType, ...], ...] = ()
    arguments: str = ""
    attributes: str = ""


def _closing(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]`` (or len(text) if unclosed)."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_operands(text: str) -> list[str]:
    """Splits an operand list at top-level commas (shapes and layouts contain commas too)."""
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    if "".join(current).strip():
        parts.append("".join(current))
    return [p.strip() for p in parts]


def _is_open(line: str) -> bool:
    """Whether an instruction continues on the next line (hand-written HLO splits attributes)."""
    code = _STRING.sub('""', line)
    depth = sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
    return depth > 0 or code.rstrip().endswith(",")


def _logical_lines(hlo_text: str) -> Iterator[str]:
    """Lines of ``hlo_text`` with each instruction joined onto one line."""
    pending = ""
    for line in hlo_text.splitlines():
        pending = f"{pending} {line.strip()}" if pending else line
        if _INSTRUCTION.match(pending) and _is_open(pending):
            continue
        yield pending
        pending = ""
    if pending:
        yield pending


def _array_types(text: str) -> tuple[ArrayType, ...]:
    """Every array type in ``text`` (a result type or a tuple of them), in order."""
    types = []
    for m in _ARRAY_TYPE.finditer(_COMMENT.sub("", text)):
        dims = tuple(int(d.strip().lstrip("<=")) for d in m["dims"].split(",") if d.strip())
        types.append((m["dtype"], dims))
    return tuple(types)


def instructions(hlo_text: str) -> Iterator[HloInstruction]:
    """Every instruction of every computation in ``hlo_text``, in order.

    Operand types are printed inline in some HLO dumps (``dot(f8e4m3fn[16,32]{1,0} %a, ...)``)
    and not in others (``dot(%a, %b)``, what jax's ``as_text`` gives); the latter are resolved
    through the instructions defined earlier in the same computation. An instruction written over
    several lines (attributes on their own lines, as in hand-written HLO) is read as one.
    """
    scope: dict[str, tuple[str, tuple[ArrayType, ...]]] = {}
    computation = ""
    for line in _logical_lines(hlo_text):
        match = _INSTRUCTION.match(line)
        if match is None:
            if line.rstrip().endswith("{"):  # a computation header: a new name scope
                scope = {}
                header = _COMPUTATION.match(line)
                computation = header["name"] if header else ""
            continue
        rest = match["rest"]
        if rest.startswith("("):
            dtype, end = "tuple", _closing(rest, 0)
        else:
            array = _ARRAY_TYPE.match(rest)
            if array is None:
                continue
            dtype, end = array["dtype"], array.end()
        opcode = _OPCODE.match(rest, end)
        if opcode is None:
            continue
        args_start = opcode.end() - 1
        args_end = _closing(rest, args_start)
        operand_dtypes, operands, operand_shapes = [], [], []
        for operand in _split_operands(_COMMENT.sub("", rest[args_start + 1 : args_end - 1])):
            inline = _ARRAY_TYPE.match(operand)
            ref = operand.split()[-1].lstrip("%") if operand else ""
            known = scope.get(ref)
            if inline is not None and " " in operand:
                operand_dtypes.append(inline["dtype"])
                operand_shapes.append(_array_types(operand[: inline.end()]))
            else:
                operand_dtypes.append(known[0] if known else None)
                operand_shapes.append(known[1] if known else ())
            operands.append(ref if ref and not ref[0].isdigit() else None)
        target = _TARGET.search(rest, args_end)
        name = match["name"]
        shapes = _array_types(rest[:end])
        scope[name] = (dtype, shapes)
        yield HloInstruction(
            name,
            dtype,
            opcode["op"],
            tuple(operand_dtypes),
            target["target"] if target else None,
            computation=computation,
            shapes=shapes,
            operands=tuple(operands),
            operand_shapes=tuple(operand_shapes),
            arguments=rest[args_start + 1 : args_end - 1],
            attributes=rest[args_end:],
        )


def is_fp8_hlo_type(dtype: str | None) -> bool:
    """``f8e4m3fn``, ``f8e5m2`` and the other 8-bit float HLO element types."""
    return dtype is not None and dtype.startswith("f8")


def fp8_casts_from_float32(hlo_text: str) -> list[str]:
    """Fusions that cast a float32 operand to FP8 without rounding it to bf16 first: a bf16 tensor
    that XLA materialised in float32 because it dropped its float32 -> bf16 -> float32 round trip
    (``xla_allow_excess_precision``; see fogjax/train/compiler_options.py), or a float32 master
    weight cast without its bf16 step. Twice the bytes, and not the CPU's numbers. A fusion that
    reads float32 (the master weights) and converts to bf16 on the way to FP8 is not listed.
    Names, for the report."""
    insts = list(instructions(hlo_text))
    rounds_to_bf16 = {i.computation for i in insts if i.opcode == "convert" and i.dtype == "bf16"}
    found = []
    for inst in insts:
        if inst.opcode != "fusion":
            continue
        fp8_sizes = {_size(shape) for dtype, shape in inst.shapes if is_fp8_hlo_type(dtype)}
        wide = {
            _size(shape)
            for types in inst.operand_shapes
            for dtype, shape in types
            if dtype == "f32" and _size(shape) > 1
        }
        called = re.search(r"calls=%?([\w.\-]+)", inst.attributes)
        if fp8_sizes & wide and not (called and called.group(1) in rounds_to_bf16):
            found.append(inst.name)
    return found


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def custom_call_counts(hlo_text: str) -> dict[str, int]:
    """{custom-call target: how many custom calls name it} over the whole module."""
    counts = collections.Counter(
        inst.target for inst in instructions(hlo_text) if inst.opcode == "custom-call"
    )
    return dict(counts)


def count_fp8_gemm_custom_calls(hlo_text: str) -> int:
    """cuBLASLt FP8 GEMMs (target ``__cublas$lt$matmul$f8``) in an optimized GPU HLO module."""
    return custom_call_counts(hlo_text).get(FP8_GEMM_TARGET, 0)


def _cudnn_attention_calls(hlo_text: str) -> Iterator[HloInstruction]:
    for inst in instructions(hlo_text):
        if inst.opcode == "custom-call" and (inst.target or "").startswith(CUDNN_ATTENTION_PREFIX):
            yield inst


def count_cudnn_attention_calls(hlo_text: str) -> int:
    """cuDNN fused-attention custom calls of any precision, forward and backward."""
    return sum(1 for _ in _cudnn_attention_calls(hlo_text))


def count_cudnn_fp8_attention_calls(hlo_text: str) -> int:
    """cuDNN fused-attention custom calls that run in FP8 (forward and backward).

    FP8 means an ``...F8`` target (``__cudnn$fmhaSoftmaxF8``, ``__cudnn$fmhaSoftmaxBackwardF8``)
    or any FP8 operand, so a future target name with FP8 inputs is still counted.
    """
    return sum(
        1
        for inst in _cudnn_attention_calls(hlo_text)
        if inst.target.endswith("F8") or any(map(is_fp8_hlo_type, inst.operand_dtypes))
    )


def count_fp8_dots(hlo_text: str) -> int:
    """``dot`` / ``convolution`` instructions with at least one FP8 (f8e4m3fn, f8e5m2) operand.

    Use it on HLO before optimization (``lowered.as_text(dialect='hlo')``), where every FP8 GEMM is
    such a dot. In optimized HLO it counts the FP8 dots the backend kept as dots: on GPU those XLA
    did not rewrite into cuBLASLt (ideally 0); on CPU always 0, since XLA CPU converts f8 operands
    to f32 before the dot.
    """
    return sum(
        1
        for inst in instructions(hlo_text)
        if inst.opcode in ("dot", "convolution") and any(map(is_fp8_hlo_type, inst.operand_dtypes))
    )


def _sub_jaxprs(value: Any) -> Iterator[Any]:
    """Open jaxprs held by an equation parameter (ClosedJaxpr, Jaxpr, or tuples of them)."""
    if isinstance(value, list | tuple):
        for item in value:
            yield from _sub_jaxprs(item)
    elif hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr


def count_fp8_dot_generals(jaxpr: Any) -> dict[tuple[str, str], int]:
    """{(lhs dtype, rhs dtype): count} of ``dot_general`` equations with an FP8 operand.

    Walks every sub-jaxpr (scan and while bodies, cond branches, pjit, custom_vjp / custom_jvp
    primals, remat), each once: a scanned layer body counts once, whatever the number of layers.
    Accepts a ``ClosedJaxpr`` (``jax.make_jaxpr(f)(...)``, ``jax.jit(f).trace(...).jaxpr``) or an
    open ``Jaxpr``. Dtype names are numpy's (``float8_e4m3fn``, ``float8_e5m2``).
    """
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def visit(j: Any) -> None:
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (str(v.aval.dtype) for v in eqn.invars[:2])
                if lhs.startswith("float8") or rhs.startswith("float8"):
                    counts[(lhs, rhs)] += 1
            for param in eqn.params.values():
                for sub in _sub_jaxprs(param):
                    visit(sub)

    visit(jaxpr.jaxpr if hasattr(jaxpr, "consts") else jaxpr)
    return dict(counts)
