"""The trainer's step compiled for a GPU this machine does not have (``--target=h100``).

    JAX_PLATFORMS=cpu python -m fogjax.bench --target=h100 --config=configs/fog_flash.py:1.5b \
        --compare=llama3:bf16,fog_flash:fp8dpa --config.train.batch_size=1 [--gpus=8]

Per entry and per Triton-GEMM mode: build_run on compile-only devices of the target (targets.py),
the same jit (state shardings, donation) as the trainer, ``.compile()`` with XLA's GPU compiler,
then from the optimized HLO every GEMM (gemms.py) with the list of block GEMMs that are not FP8,
cuDNN attention calls, collectives and their bytes, the executable's memory against the target's,
and a step-time estimate (estimate.py). Nothing runs: no array is ever allocated.

Traps this guards against (each has a test):
- a target config without a CUDA runtime version: XLA silently compiles FP8 dots as BF16 GEMMs
  (the row says so: ``fp8_possible`` False and a warning);
- ``lower(lowering_platforms=('cuda',)).compile()`` compiles for the CPU: here devices come from
  the target's topology and :func:`require_gpu_program` checks the result;
- no autotuner without a GPU: with ``xla_gpu_enable_triton_gemm`` on, FP8 dots become Triton
  fusions, so both modes are compiled and an FP8 GEMM is counted in either form.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections

from fogjax import sharding
from fogjax.accounting import model_info
from fogjax.bench import estimate as estimate_lib
from fogjax.bench import gemms as gemm_lib
from fogjax.bench import hlo_stats
from fogjax.bench.hlo_module import parse_module
from fogjax.bench.targets import Target, target_devices
from fogjax.train import run as state_lib
from fogjax.train.preflight import validate_train_config

TRITON_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


@dataclasses.dataclass(frozen=True)
class CompileTarget:
    """What build_run's start-up checks see of a target: its compile-only devices, its cuDNN."""

    devices: Sequence[Any]
    cudnn_version: tuple[int, int, int]


class NotAGpuProgram(RuntimeError):
    """The compiled executable is not a GPU program (it was compiled for the host)."""


def require_gpu_program(hlo_text: str) -> None:
    """Raises NotAGpuProgram unless ``hlo_text`` is XLA GPU output: GPU fusions carry
    ``operation_queue_id`` in their backend_config, which no CPU program has."""
    if '"operation_queue_id"' not in hlo_text:
        raise NotAGpuProgram(
            "The optimized HLO is not a GPU program: it was compiled for the host (e.g. by "
            "lower(lowering_platforms=('cuda',)).compile()). Compile against the target's "
            "compile-only devices (fogjax.bench.targets.target_devices)."
        )


@contextlib.contextmanager
def target_cudnn(target: Target) -> Iterator[None]:
    """JAX's cuDNN attention binding asks the local machine, while tracing, for its cuDNN version
    and its GPU's compute capability; on a machine without a GPU both fail. Inside this context
    they answer for ``target`` instead (what the target config says), and only while tracing."""
    from jax._src.cudnn import fused_attention_stablehlo as fa  # private: no public hook exists

    major, minor, patch = target.cudnn_version
    version = major * 10000 + minor * 100 + patch
    capability = target.compute_capability

    def at_least(wanted: str) -> bool:
        return capability >= tuple(int(x) for x in wanted.split("."))

    with (
        mock.patch.object(fa, "check_cudnn_version", lambda: version),
        mock.patch.object(fa, "check_compute_capability", at_least),
    ):
        yield


def _memory(compiled: Any, target: Target) -> dict[str, Any]:
    """The executable's per-device memory from XLA's buffer assignment, against the target."""
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
        + m.generated_code_size_in_bytes
    )
    usable = target.usable_memory_bytes
    return {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "total_bytes": total,
        "device_bytes": target.memory_bytes,
        "usable_bytes": usable,
        "fits": total <= usable,
        "headroom_bytes": usable - total,
    }


def gemm_counts(gemms: list[gemm_lib.Gemm]) -> dict[str, int]:
    """Static GEMM counts (each GEMM instruction once, a layer body's once) by form and dtype."""
    counts: collections.Counter[str] = collections.Counter()
    for g in gemms:
        if g.fp8:
            counts["fp8_cublas" if g.form == "cublas" else f"fp8_{g.form}"] += 1
        else:
            counts[f"{g.lhs_dtype}_{g.form}"] += 1
    counts["fp8_total"] = sum(1 for g in gemms if g.fp8)
    counts["fp8_in_block"] = sum(1 for g in gemms if g.fp8 and g.in_block)
    counts["non_fp8_in_block"] = sum(1 for g in gemms if not g.fp8 and g.in_block)
    counts["outside_block"] = sum(1 for g in gemms if not g.in_block)
    return dict(counts)


def analyse(
    hlo_text: str, target: Target, fp8_linears: bool, quantizes_attention: bool
) -> dict[str, Any]:
    """Everything the bench reports about one optimized GPU HLO module. ``non_fp8_block_gemms``
    is None under a recipe whose linears are not FP8 GEMMs (BF16; FP4's BF16 emulation)."""
    module = parse_module(hlo_text)
    gemms = gemm_lib.find_gemms(module)
    attention = gemm_lib.find_attention_calls(module)
    collectives = gemm_lib.find_collectives(module)
    est = estimate_lib.estimate_step(module, target.rates)
    return {
        "gemm_counts": gemm_counts(gemms),
        "gemms": [g.as_dict() for g in gemms],
        "non_fp8_block_gemms": [
            f"{g.name} ({g.site or '?'} {g.pass_}: {g.lhs_dtype} x {g.rhs_dtype})"
            for g in gemm_lib.non_fp8_block_gemms(gemms, quantizes_attention)
        ]
        if fp8_linears
        else None,
        "fp8_casts_from_f32": hlo_stats.fp8_casts_from_float32(hlo_text),
        "cudnn_attention_calls": len(attention),
        "cudnn_fp8_attention_calls": sum(1 for a in attention if a.fp8),
        "collectives": [dataclasses.asdict(c) for c in collectives],
        "collective_bytes_per_step": sum(c.bytes * c.runs for c in collectives),
        "estimate": est.as_dict(),
    }


@contextlib.contextmanager
def no_persistent_cache_writes() -> Iterator[None]:
    """Keeps a deviceless compile out of jax's persistent compilation cache (when one is set,
    e.g. by the tests): a compile-only client cannot load an executable back, so a cached entry
    would fail to read ("PjRtCompiler must be constructed with a Client") and recompile anyway.
    An infinite minimum compile time stops the write; a read of a key never written misses."""
    option = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, option)
    jax.config.update(option, float("inf"))
    try:
        yield
    finally:
        jax.config.update(option, before)


def compile_for_target(
    config: ml_collections.ConfigDict, target: Target, gpus: int, triton_gemm: bool
) -> dict[str, Any]:
    """Compiles ``config``'s train step for ``gpus`` GPUs of ``target`` and analyses it.

    Returns a dict with compile_s, memory (see :func:`_memory`), the fields of :func:`analyse`,
    and estimated tokens/s per GPU and MFU. Raises what build_run or the compiler raise.
    """
    devices = target_devices(target, gpus)
    validate_train_config(config, num_devices=len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    t = config.train
    with target_cudnn(target):  # build_run traces the model too
        run = state_lib.build_run(config, mesh, CompileTarget(devices, target.cudnn_version))
        jitted = run.train_steps[False]
        batch_sharding = sharding.batch_sharding(run.mesh)
        shape = (t.batch_size, t.seq_len + 1)
        batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
        with sharding.sharding_context(run.mesh):
            start = time.perf_counter()
            lowered = jitted.trace(run.abstract, batch).lower()
            with no_persistent_cache_writes():
                compiled = lowered.compile({"xla_gpu_enable_triton_gemm": triton_gemm})
            compile_s = time.perf_counter() - start
    text = compiled.as_text()
    require_gpu_program(text)
    out = {"compile_s": compile_s, "memory": _memory(compiled, target)}
    recipe = run.recipe
    out.update(analyse(text, target, recipe.runs_fp8_linear_gemms, recipe.quantizes_attention))
    step_s = out["estimate"]["step_s"]
    info = model_info(config, run.abstract["params"])
    tokens = run.tokens_per_step
    flops_per_gpu = info["flops_per_token"] * tokens / len(devices)
    out["estimate"].update(
        tokens_per_sec_per_gpu=tokens / step_s / len(devices),
        mfu=flops_per_gpu / step_s / target.rates.bf16_flops,
        model_flops_per_step_per_gpu=flops_per_gpu,
    )
    out["num_params"] = info["params_total"]
    return out


# Every AOT row has every field (None where not reached before an error).
AOT_FIELDS = (
    "label",
    "arch",
    "recipe",
    "target",
    "gpus",
    "triton_gemm",
    "status",  # 'ok' | 'does not fit' | 'error'
    "error",
    "warnings",
    "num_params",
    "compile_s",
    "memory",
    "gemm_counts",
    "non_fp8_block_gemms",
    "fp8_casts_from_f32",
    "cudnn_attention_calls",
    "cudnn_fp8_attention_calls",
    "collective_bytes_per_step",
    "collectives",
    "estimate",
    "estimated_speedup_vs_first",
    "gemms",
    "config",
)


def _warnings(config: ml_collections.ConfigDict, target: Target, out: dict) -> list[str]:
    warnings = []
    quantizes = out["non_fp8_block_gemms"] is not None
    if quantizes and not out["gemm_counts"].get("fp8_total") and not target.runtime_version:
        warnings.append(
            f"target {target.name!r} has no CUDA runtime_version in its config: XLA's "
            "GemmRewriter then compiles every FP8 dot as a BF16 GEMM (add runtime_version)."
        )
    if out["non_fp8_block_gemms"]:
        warnings.append(
            f"{len(out['non_fp8_block_gemms'])} GEMM(s) inside the block are not FP8 under "
            f"recipe {config.precision.recipe!r}: see non_fp8_block_gemms."
        )
    return warnings


def _is_out_of_memory(e: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def aot_row(
    label: str,
    config: ml_collections.ConfigDict,
    target: Target,
    gpus: int,
    triton_gemm: bool,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row: an entry compiled for ``gpus`` x ``target``, or why it could not be."""
    row: dict[str, Any] = dict.fromkeys(AOT_FIELDS)
    row.update(
        label=label,
        arch=config.model.arch,
        recipe=config.precision.recipe,
        target=target.name,
        gpus=gpus,
        triton_gemm=triton_gemm,
        config=summary,
        warnings=[],
    )
    try:
        out = compile_for_target(config, target, gpus, triton_gemm)
    except Exception as e:  # a failed entry is a row with its error; the others still compile
        text = f"{type(e).__name__}: {e}"
        row.update(status="does not fit" if _is_out_of_memory(e) else "error", error=text[:2000])
        return row
    row.update({k: v for k, v in out.items() if k in AOT_FIELDS})
    row["warnings"] = _warnings(config, target, out)
    row["status"] = "ok" if out["memory"]["fits"] else "does not fit"
    return row


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sets each row's estimated tokens/s over the first row of the same Triton mode."""
    first: dict[bool, float] = {}
    for row in rows:
        tps = (row["estimate"] or {}).get("tokens_per_sec_per_gpu")
        if tps is None:
            continue
        base = first.setdefault(row["triton_gemm"], tps)
        row["estimated_speedup_vs_first"] = tps / base
    return rows


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def aot_table_row(r: dict[str, Any]) -> list[str]:
    counts = r["gemm_counts"] or {}
    est = r["estimate"] or {}
    mem = r["memory"] or {}
    fp8 = f"{counts.get('fp8_cublas', 0)}/{counts.get('fp8_triton', 0)}" if counts else "-"
    other = sum(
        v
        for k, v in counts.items()
        if not k.startswith("fp8") and k.endswith(("cublas", "triton", "dot"))
    )
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return [
        r["label"],
        "on" if r["triton_gemm"] else "off",
        fp8,
        str(other) if counts else "-",
        fmt(None if r["non_fp8_block_gemms"] is None else len(r["non_fp8_block_gemms"]), "d"),
        f"{fmt(r['cudnn_fp8_attention_calls'], 'd')}/{fmt(r['cudnn_attention_calls'], 'd')}",
        _gib(mem.get("total_bytes")),
        _gib(mem.get("usable_bytes")),
        {True: "yes", False: "NO"}.get(mem.get("fits"), "-"),
        fmt(est.get("step_s") and 1e3 * est["step_s"], ".1f"),
        fmt(est.get("tokens_per_sec_per_gpu"), ",.0f"),
        fmt(est.get("mfu"), ".1%"),
        fmt(r["estimated_speedup_vs_first"], ".3f"),
        r["status"],
    ]


AOT_HEADER = (
    "entry",
    "triton",
    "fp8 gemm cublas/triton",
    "other gemm",
    "non-fp8 in block",
    "cudnn f8/all",
    "GiB",
    "usable GiB",
    "fits",
    "est. step ms",
    "est. tok/s/gpu",
    "est. MFU",
    "est. ratio",
    "status",
)


def format_aot_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned table; errors and warnings on their own lines below it. Every
    time and speed in it is an estimate (estimate.py), said so in the header."""
    from fogjax.bench import text_table

    table = text_table.aligned(AOT_HEADER, [aot_table_row(r) for r in rows])
    notes = [f"{r['label']}: {r['error']}" for r in rows if r["error"]]
    notes += [f"{r['label']}: warning: {w}" for r in rows for w in r["warnings"] or ()]
    notes += [
        f"{r['label']}: non-FP8 block GEMM {g}"
        for r in rows
        for g in r["non_fp8_block_gemms"] or ()
    ]
    return "\n".join([table, *notes])
