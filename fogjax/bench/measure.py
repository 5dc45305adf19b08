"""Throughput, MFU, memory and FP8 GEMM counts of the full train step, measured, as JSON.

    python -m fogjax.bench --config=configs/fog_flash.py:1.5b --recipes=bf16,fp8,fp8dpa \
        --config.train.batch_size=1 [--steps=20] [--warmup=3] [--output=FILE.json]
    python -m fogjax.bench --config=configs/fog_flash.py:1.5b --config.train.batch_size=1 \
        --compare=llama3:bf16,fog_flash:fp8dpa
    python -m fogjax.bench --config=configs/fog_flash.py:1.5b \
        --attention=xla:bf16,cudnn:bf16,xla:fp8dpa,cudnn:fp8dpa     # attention alone, TFLOP/s

Each entry is one (architecture, recipe) pair. ``--recipes`` varies the recipe of the config
file's model; ``--compare`` gives ``arch:recipe`` pairs built with ``config_lib.get_config(arch,
size)`` (size from the config file's argument, ``1.5b`` above) and the same ``--config.*``
overrides, for the paper's Llama3 BF16 vs FOG-flash FP8DPA comparison. Each entry runs the
trainer's step (build_run, create_state, make_train_step, jit with the state shardings and
``donate_argnums=0``) on one random token batch (no data pipeline): compile (timed), ``warmup``
steps, then ``steps`` steps timed one by one with ``block_until_ready``; the median is reported.
An entry that fails (out of memory, a backend that is missing) is a row with its error.

benchmarks/README.md explains every column and gives the paper's reference numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fogjax import sharding
from fogjax.accounting import model_info
from fogjax.bench import attention as bench_attention
from fogjax.bench import hlo_stats, text_table
from fogjax.bench.entries import Entry
from fogjax.monitoring.throughput import mfu
from fogjax.train import provenance
from fogjax.train import run as state_lib
from fogjax.train.preflight import validate_train_config

log = logging.getLogger(__name__)

# fogjax/bench/measure.py -> the repository root, three levels up.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = os.path.join(_REPO, "benchmarks", "results")

# Every row has every field (None where it does not apply or was not reached before an error).
ROW_FIELDS = (
    "label",  # 'arch:recipe'
    "arch",
    "recipe",
    "status",  # 'ok' | 'error'
    "error",  # the exception, for failed rows
    "num_params",
    "flops_per_token",  # model FLOPs (fogjax.info): 6 N + 12 L D T
    "compile_s",  # trace + lower + compile of the train step
    "step_ms",  # median of the timed steps
    "step_times_ms",  # every timed step
    "tokens_per_sec",  # global
    "tokens_per_sec_per_device",
    "tflops_per_device",  # model FLOPs per second per device / 1e12
    "mfu",  # against the device's dense BF16 peak (None if unknown, e.g. CPU)
    "mfu_fp8_peak",  # against the device's dense FP8 peak (None if unknown)
    "speedup_vs_first",  # tokens_per_sec / the first row's
    "loss",  # after the last step (a NaN here means the timings ran on garbage)
    "peak_memory_bytes",  # device high-water mark after this row (GPU); None where not reported
    "peak_memory_is_own",  # False: an earlier row set that high-water mark (benchmarks/README.md)
    "compiled_memory_bytes",  # XLA's buffer assignment for the step, per device (every backend)
    "fp8_gemm_custom_calls",  # __cublas$lt$matmul$f8 in the optimized HLO (per scanned body)
    "cudnn_fp8_attention_calls",  # __cudnn$fmha...F8 custom calls
    "cudnn_attention_calls",  # any __cudnn$fmha... custom call
    "fp8_dot_generals",  # jaxpr dot_generals with an FP8 operand (per scanned body)
    "fp8_dot_generals_by_dtype",  # {'lhs x rhs': count}
    "fp8_dots_hlo",  # FP8 dots in the HLO before optimization
    "fp8_dots_left_in_optimized_hlo",  # GPU: FP8 dots not rewritten to cuBLASLt; CPU: always 0
    "config",  # resolved summary of the entry's config
)


_SUMMARY_MODEL_FIELDS = (
    "arch",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_dim",
    "ffn_activation",
    "vocab_size",
    "tie_embeddings",
    "attention_impl",
    "remat",
    "scan_layers",
)


def config_summary(
    config: ml_collections.ConfigDict, num_devices: int | None = None
) -> dict[str, Any]:
    """The fields that decide a step's cost: model sizes, recipe, batch, mesh (over
    ``num_devices``, default every device JAX sees)."""
    m, t = config.model, config.train
    devices = jax.device_count() if num_devices is None else num_devices
    data, fsdp, tensor = sharding.resolve_mesh_shape(config.mesh, devices)
    summary = {k: m[k] for k in _SUMMARY_MODEL_FIELDS}
    summary.update(
        recipe=config.precision.recipe,
        backend=config.precision.backend,
        compute_dtype=config.precision.compute_dtype,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        micro_batches=t.micro_batches,
        mesh={"data": data, "fsdp": fsdp, "tensor": tensor},
    )
    return summary


def _device_peak_bytes() -> int | None:
    """The first local device's allocator high-water mark (GPU); None where not reported."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backends without allocator statistics raise various errors
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _compiled_bytes(compiled: Any) -> int | None:
    """Device memory the executable needs per device, from XLA's buffer assignment."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if analysis is None:
        return None
    peak = getattr(analysis, "peak_memory_in_bytes", 0)
    if peak:
        return int(peak)
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def compile_train_step(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Builds and compiles the trainer's step for ``config`` and counts its FP8 GEMMs.

    Returns {'run', 'compiled', 'batch_sharding', 'compile_s'} plus the HLO/jaxpr count fields
    of :data:`ROW_FIELDS`. Nothing is allocated but the executable.
    """
    validate_train_config(config)
    t = config.train
    run = state_lib.build_run(config)
    batch_sharding = sharding.batch_sharding(run.mesh)
    jitted = run.train_steps[False]
    batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32, sharding=batch_sharding)
    with sharding.sharding_context(run.mesh):
        start = time.perf_counter()
        traced = jitted.trace(run.abstract, batch)
        lowered = traced.lower()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    optimized = compiled.as_text()
    by_dtype = hlo_stats.count_fp8_dot_generals(traced.jaxpr)
    return {
        "run": run,
        "compiled": compiled,
        "batch_sharding": batch_sharding,
        "compile_s": compile_s,
        "compiled_memory_bytes": _compiled_bytes(compiled),
        "fp8_gemm_custom_calls": hlo_stats.count_fp8_gemm_custom_calls(optimized),
        "cudnn_fp8_attention_calls": hlo_stats.count_cudnn_fp8_attention_calls(optimized),
        "cudnn_attention_calls": hlo_stats.count_cudnn_attention_calls(optimized),
        "fp8_dot_generals": sum(by_dtype.values()),
        "fp8_dot_generals_by_dtype": {f"{a} x {b}": n for (a, b), n in sorted(by_dtype.items())},
        "fp8_dots_hlo": hlo_stats.count_fp8_dots(lowered.as_text(dialect="hlo")),
        "fp8_dots_left_in_optimized_hlo": hlo_stats.count_fp8_dots(optimized),
    }


def _random_batch(config: ml_collections.ConfigDict, batch_sharding: Any) -> jax.Array:
    t = config.train
    shape = (t.batch_size, t.seq_len + 1)
    make = lambda key: jax.random.randint(key, shape, 0, config.model.vocab_size, jnp.int32)
    return jax.jit(make, out_shardings=batch_sharding)(jax.random.key(config.seed))


def measure(config: ml_collections.ConfigDict, steps: int, warmup: int, row: dict) -> None:
    """Fills ``row`` with one entry's measurements, field by field (so a failure keeps the
    fields measured before it)."""
    info = model_info(config)
    row["num_params"] = info["params_total"]
    row["flops_per_token"] = info["flops_per_token"]
    built = compile_train_step(config)
    row.update({k: v for k, v in built.items() if k in ROW_FIELDS})
    run, compiled = built["run"], built["compiled"]
    state = state_lib.create_state(run.init, run.shardings, config.seed)
    batch = _random_batch(config, built["batch_sharding"])
    out = None
    for _ in range(warmup):
        state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready((state, out))
        times.append(time.perf_counter() - start)
    loss = float(out["loss"]) if out is not None else None
    # Strict JSON has no NaN/inf: a diverged loss is kept as its text.
    row["loss"] = loss if loss is None or math.isfinite(loss) else str(loss)

    step_s = statistics.median(times)
    n = run.mesh.size
    tokens = run.tokens_per_step
    flops_per_device = info["flops_per_token"] * tokens / n
    kind = jax.devices()[0].device_kind
    peak_override = config.log.peak_tflops * 1e12 or None
    row.update(
        step_ms=1e3 * step_s,
        step_times_ms=[round(1e3 * s, 4) for s in times],
        tokens_per_sec=tokens / step_s,
        tokens_per_sec_per_device=tokens / step_s / n,
        tflops_per_device=flops_per_device / step_s / 1e12,
        mfu=mfu(flops_per_device, step_s, kind, "bf16", peak_override),
        mfu_fp8_peak=mfu(flops_per_device, step_s, kind, "fp8"),
    )


def _error_text(e: BaseException, limit: int = 2000) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ...[truncated]"


def bench_entry(entry: Entry, steps: int, warmup: int) -> dict[str, Any]:
    """One row: ``entry`` measured, or its error (the benchmark goes on with the next entry)."""
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(
        label=entry.label, arch=entry.config.model.arch, recipe=entry.config.precision.recipe
    )
    peak_before = _device_peak_bytes()
    try:
        row["config"] = config_summary(entry.config)
        measure(entry.config, steps, warmup, row)
        row["status"] = "ok"
    except Exception as e:  # any failure, out of memory included, becomes the row's error
        log.exception("Entry %s failed.", entry.label)
        row.update(status="error", error=_error_text(e))
    gc.collect()  # release this entry's state and executable before the next one
    peak = _device_peak_bytes()
    if peak is not None:
        row["peak_memory_bytes"] = peak
        row["peak_memory_is_own"] = peak > (peak_before or 0)
    return row


def _nvidia_smi_names() -> list[str] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def run_benchmark(
    entries: Sequence[Entry], steps: int, warmup: int, command: str = ""
) -> dict[str, Any]:
    """Measures every entry; returns the report (provenance, setup and one row per entry)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
    if not entries:
        raise ValueError("Nothing to benchmark: give --recipes or --compare.")
    rows = [bench_entry(entry, steps, warmup) for entry in entries]
    first = rows[0]["tokens_per_sec"]
    for row in rows:
        if first and row["tokens_per_sec"]:
            row["speedup_vs_first"] = row["tokens_per_sec"] / first
    return _report(entries[0].config, rows[0]["num_params"] or 0, rows, steps, warmup, command)


def report_header(
    config: ml_collections.ConfigDict,
    command: str,
    target: Any = None,
    gpus: int | None = None,
    num_params: int = 0,
) -> dict[str, Any]:
    """A report's provenance (command, git, versions, devices) and setup, without rows. With
    ``target`` (fogjax.bench.targets.Target) it also names the GPU compiled for."""
    record = provenance.provenance(config, num_params)
    devices = dict(record["devices"], nvidia_smi=_nvidia_smi_names())
    header = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_sha": record["git_sha"],
        "git_dirty": record["git_dirty"],
        "python": record["python"],
        "versions": record["versions"],
        "devices": devices,
        "xla_flags": record["xla_flags"],
        "config": config_summary(config, gpus),
    }
    if target is not None:
        header["target"] = {
            "name": target.name,
            "device": target.device_name,
            "gpus": gpus,
            "memory_bytes": target.memory_bytes,
            "usable_memory_bytes": target.usable_memory_bytes,
            "cuda_runtime": target.runtime_version,
            "cudnn": ".".join(map(str, target.cudnn_version)),
            "rates": dataclasses.asdict(target.rates),
            "note": "compiled without a GPU; times and speeds are estimates (estimate.py)",
        }
    return header


def _report(
    config: ml_collections.ConfigDict,
    num_params: int,
    rows: list[dict[str, Any]],
    steps: int,
    warmup: int,
    command: str,
) -> dict[str, Any]:
    """The JSON report of measured rows: provenance, setup and the rows."""
    report = report_header(config, command, num_params=num_params)
    report.update(steps=steps, warmup=warmup, rows=rows)
    return report


def run_attention_benchmark(
    config: ml_collections.ConfigDict, spec: str, steps: int, warmup: int, command: str = ""
) -> dict[str, Any]:
    """The attention-only benchmark (bench_attention.py) of every ``impl:recipe`` in ``spec``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
    variants = bench_attention.parse_variants(spec)
    rows = [bench_attention.measure_variant(config, i, r, steps, warmup) for i, r in variants]
    report = _report(config, 0, rows, steps, warmup, command)
    report["benchmark"] = "attention"
    return report


def default_output_path(report: dict[str, Any], name: str = "") -> str:
    """benchmarks/results/<archs or name>-<UTC date-time>-<device kind>.json in the repository."""
    archs = name or "-".join(dict.fromkeys(row["arch"] for row in report["rows"]))
    device = re.sub(r"[^a-z0-9]+", "-", report["devices"]["kind"].lower()).strip("-")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return os.path.join(RESULTS_DIR, f"{archs}-{stamp}-{device}.json")


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale if scale != 1.0 else value, spec)


def _pair(row: dict[str, Any], a: str, b: str) -> str:
    return f"{_fmt(row[a], 'd')}/{_fmt(row[b], 'd')}"


# (header, cell of a row) of the printed table; the JSON has every field.
_TABLE_COLUMNS = (
    ("entry", lambda r: r["label"]),
    ("step ms", lambda r: _fmt(r["step_ms"], ".1f")),
    ("tok/s/dev", lambda r: _fmt(r["tokens_per_sec_per_device"], ",.0f")),
    ("TFLOP/s/dev", lambda r: _fmt(r["tflops_per_device"], ".2f")),
    ("MFU bf16", lambda r: _fmt(r["mfu"], ".1%")),
    ("MFU fp8", lambda r: _fmt(r["mfu_fp8_peak"], ".1%")),
    ("speedup", lambda r: _fmt(r["speedup_vs_first"], ".3f")),
    ("compile s", lambda r: _fmt(r["compile_s"], ".1f")),
    ("peak GiB", lambda r: _fmt(r["peak_memory_bytes"], ".2f", 2.0**-30)),
    ("step GiB", lambda r: _fmt(r["compiled_memory_bytes"], ".2f", 2.0**-30)),
    ("cublas f8", lambda r: _fmt(r["fp8_gemm_custom_calls"], "d")),
    ("cudnn f8/all", lambda r: _pair(r, "cudnn_fp8_attention_calls", "cudnn_attention_calls")),
    ("f8 dots jaxpr/hlo", lambda r: _pair(r, "fp8_dot_generals", "fp8_dots_hlo")),
    ("status", lambda r: r["status"]),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table, failed rows' errors on their own lines below it."""
    table = text_table.aligned(
        [name for name, _ in _TABLE_COLUMNS],
        [[cell(row) for _, cell in _TABLE_COLUMNS] for row in rows],
    )
    return "\n".join([table] + [f"{row['label']}: {row['error']}" for row in rows if row["error"]])


def write_report(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
