"""The paper's Table 3 (tokens/s/GPU on GH200, docs/spec.md §5), estimated by one command.

    python -m fogjax.bench --paper --target=gh200 [--paper_scale=tiny] [--output=FILE.json]

Each row is one (architecture, recipe) of the paper's throughput table, built like a ``--compare``
entry (entries.py) with cuDNN fused attention, at the paper's per-GPU work (:data:`WORK`), and
compiled without a GPU for the target with Triton GEMMs off (aot.py: the cuBLASLt program the
estimate is made for). Per row: the estimated tokens/s per GPU beside the paper's measured one,
both as ratios to Llama3 BF16 at the same size, the memory per GPU against 95% of the target's,
kernels per step and the estimated step split into GEMM, attention, memory-bound and collective
seconds (estimate.py). A row that fails (out of memory, ...) is a row with its error.

``--paper_scale=tiny`` runs the same rows through the same code at a tiny width (head dim 128 and
T = 128, which cuDNN's FP8 attention accepts), for CI (tests/bench/test_paper.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from fogjax.bench import aot, measure, text_table
from fogjax.bench.entries import compare_entries
from fogjax.bench.targets import Target

CUDNN = "model.attention_impl=cudnn"  # cuDNN fused attention: BF16, or FP8 under fp8dpa


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of the paper's throughput table."""

    size: str  # '1.5b' | '8b'
    model: str  # the paper's name
    arch: str
    recipe: str
    paper_tokens_per_sec_per_gpu: int | None  # measured on GH200 (docs/spec.md §5); None: not given
    # Micro-batches this many times larger than the work's (so this many times fewer), the same
    # sequences per GPU per step: what a recipe's memory allows beyond the table's common setting.
    micro_batch_scale: int = 1

    @property
    def entry(self) -> str:
        """The ``--compare`` entry that builds it."""
        return f"{self.arch}:{self.recipe}:{CUDNN}"

    @property
    def label(self) -> str:
        label = f"{self.size.upper()} {self.model} {self.recipe.upper()}"
        if self.micro_batch_scale > 1:
            label += f", {self.micro_batch_scale}x larger micro-batches"
        return label

    @property
    def key(self) -> str:
        """What ``--paper_rows`` selects it by: 'size:arch:recipe' (':mb<scale>x' for a row with
        larger micro-batches)."""
        key = f"{self.size}:{self.arch}:{self.recipe}"
        return key + (f":mb{self.micro_batch_scale}x" if self.micro_batch_scale > 1 else "")

    @property
    def is_baseline(self) -> bool:
        """Llama3 BF16 at the table's common micro-batch: what the ratios of its size are to."""
        return is_baseline(self.arch, self.recipe, self.micro_batch_scale)


ROWS: tuple[PaperRow, ...] = (
    PaperRow("1.5b", "Llama3", "llama3", "bf16", 46_470),
    PaperRow("1.5b", "FOG-max", "fog_max", "fp8dpa", 53_551),
    PaperRow("1.5b", "FOG-opt", "fog_opt", "fp8dpa", None),
    PaperRow("1.5b", "FOG-flash", "fog_flash", "fp8dpa", 54_848),
    PaperRow("1.5b", "Llama3+SmoothSwiGLU", "llama3_smooth_swiglu", "fp8", 54_903),
    PaperRow("8b", "Llama3", "llama3", "bf16", 9_105),
    PaperRow("8b", "FOG-max", "fog_max", "fp8dpa", None),
    PaperRow("8b", "FOG-opt", "fog_opt", "fp8dpa", None),
    PaperRow("8b", "FOG-flash", "fog_flash", "fp8dpa", 12_764),
    PaperRow("8b", "Llama3+SmoothSwiGLU", "llama3_smooth_swiglu", "fp8", None),
    # Not the paper's: the 8B rows again with micro-batches twice as large (4 per GPU), which
    # halves FSDP's per-micro-batch weight all-gathers; FP8's smaller residuals make it fit.
    PaperRow("8b", "Llama3", "llama3", "bf16", None, micro_batch_scale=2),
    PaperRow("8b", "FOG-flash", "fog_flash", "fp8dpa", None, micro_batch_scale=2),
)
BASELINE = ("llama3", "bf16")  # the ratios' denominator at each size


def is_baseline(arch: str, recipe: str, micro_batch_scale: int | None) -> bool:
    """The row the ratios of its size are to: Llama3 BF16 at the table's common micro-batch."""
    return (arch, recipe) == BASELINE and (micro_batch_scale or 1) == 1


def select_rows(spec: str | None) -> tuple[PaperRow, ...]:
    """The rows ``--paper_rows`` names: comma-separated sizes ('8b') or row keys
    ('1.5b:fog_flash:fp8dpa'); every row when None. The Llama3 BF16 row of each size selected is
    always included, since the ratios are to it. Rows keep the table's order."""
    if spec is None:
        return ROWS
    wanted = {item.strip() for item in spec.split(",") if item.strip()}
    known = {r.size for r in ROWS} | {r.key for r in ROWS}
    unknown = sorted(wanted - known)
    if unknown or not wanted:
        raise ValueError(
            f"--paper_rows={spec!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"give sizes or rows among {', '.join(r.key for r in ROWS)}."
        )
    picked = {r for r in ROWS if r.size in wanted or r.key in wanted}
    sizes = {r.size for r in picked}
    return tuple(r for r in ROWS if r in picked or (r.size in sizes and r.is_baseline))


@dataclasses.dataclass(frozen=True)
class Work:
    """What one size's rows compile: the config size, GPUs and the overrides of every row.

    ``overrides`` set the global batch, micro-batches, sequence length and mesh (and, at the tiny
    scale, the model's dimensions); ``paper`` says what the paper ran and how this differs."""

    config_size: str
    gpus: int
    overrides: dict[str, Any]
    paper: str


# Tiny stand-in: head dim 128 and seq_len a multiple of 128 (cuDNN FP8 attention), two layers.
_TINY_MODEL = {
    "model.num_layers": 2,
    "model.d_model": 128,
    "model.num_heads": 1,
    "model.num_kv_heads": 1,
    "model.ffn_dim": 256,
    "model.vocab_size": 512,
    "train.seq_len": 128,
}
_PAPER_15B = (
    "1.5B: one node of 4 GH200, data parallel, 64 sequences of 4096 tokens per GPU per optimizer "
    "step in 16 micro-batches of 4 (global batch 256). Compiled: the same 4-GPU data-parallel "
    "program (mesh data=4), whose gradient all-reduces the estimate counts without overlap."
)
_PAPER_8B = (
    "8B: 8 nodes = 32 GH200, ZeRO-1, 16 sequences per GPU per step (global batch 512). Compiled: "
    "one node of 8 GPUs with FSDP (mesh fsdp=8: parameters, gradients and optimizer state "
    "sharded, so more all-gathers than ZeRO-1 and no inter-node traffic), 16 sequences per GPU "
    "per step (global batch 128) in 8 micro-batches of 2 per GPU: every micro-batch all-gathers "
    "the weights, so the largest micro-batch that fits every recipe (2 per GPU) halves those "
    "all-gathers against micro-batches of 1. The two rows with 2x larger micro-batches (4 per "
    "GPU) show which recipes fit there."
)
WORK: dict[str, dict[str, Work]] = {
    "full": {
        "1.5b": Work(
            "1.5b",
            4,
            {"train.batch_size": 256, "train.micro_batches": 16, "mesh.data": 4, "mesh.fsdp": 1},
            _PAPER_15B,
        ),
        "8b": Work(
            "8b",
            8,
            {"train.batch_size": 128, "train.micro_batches": 8, "mesh.data": 1, "mesh.fsdp": 8},
            _PAPER_8B,
        ),
    },
    "tiny": {
        "1.5b": Work(
            "tiny",
            4,
            {
                **_TINY_MODEL,
                "train.batch_size": 16,
                "train.micro_batches": 2,
                "mesh.data": 4,
                "mesh.fsdp": 1,
            },
            "tiny stand-in for the 1.5B rows: 4 GPUs data parallel, 2 micro-batches of 2 per GPU",
        ),
        "8b": Work(
            "tiny",
            8,
            {
                **_TINY_MODEL,
                "train.batch_size": 16,
                "train.micro_batches": 2,
                "mesh.data": 1,
                "mesh.fsdp": 8,
            },
            "tiny stand-in for the 8B rows: 8 GPUs FSDP, 2 micro-batches of 1 per GPU",
        ),
    },
}
SCALES = tuple(WORK)

PAPER_FIELDS = (
    "label",
    "size",
    "model",
    "arch",
    "recipe",
    "entry",
    "micro_batch_scale",  # 1, or micro-batches this many times larger than the work's
    "gpus",
    "status",  # 'ok' | 'does not fit' | 'error' (aot.aot_row)
    "error",
    "warnings",
    "estimated_tokens_per_sec_per_gpu",
    "paper_tokens_per_sec_per_gpu",
    "estimated_ratio",  # over our Llama3 BF16 at the same size
    "paper_ratio",  # the paper's, over its Llama3 BF16 at the same size
    "memory_gib",
    "usable_gib",
    "fits",
    "kernels_per_step",
    "estimated_step_s",
    "split_s",  # {'gemm', 'attention', 'memory', 'collective'}: sums to estimated_step_s
    "fp8_gemms_in_block",
    "non_fp8_gemms_in_block",
    "cudnn_fp8_attention_calls",
    "cudnn_attention_calls",
    "compile_s",
    "config",
    "aot",  # the whole aot_row: every GEMM, collective, the estimate's top kernels, ...
)


def row_overrides(row: PaperRow, work: Work) -> dict[str, Any]:
    """The work's overrides, with ``micro_batch_scale`` times fewer micro-batches for the row."""
    overrides = dict(work.overrides)
    micro_batches = overrides["train.micro_batches"]
    if micro_batches % row.micro_batch_scale:
        raise ValueError(
            f"row {row.key}: micro_batch_scale={row.micro_batch_scale} does not divide the "
            f"work's train.micro_batches={micro_batches}."
        )
    overrides["train.micro_batches"] = micro_batches // row.micro_batch_scale
    return overrides


def row_config(row: PaperRow, scale: str) -> Any:
    """The row's complete config: ``get_config(arch, size)`` + the work's overrides (micro-batches
    scaled for the row) + cuDNN."""
    work = WORK[scale][row.size]
    (entry,) = compare_entries(row.entry, work.config_size, row_overrides(row, work))
    return entry.config


def split(estimate: dict[str, Any]) -> dict[str, float]:
    """The estimate's categories in four: GEMM (all dtypes), attention, memory-bound, collective."""
    by = estimate["by_category_s"]
    total = lambda prefix: sum(v for k, v in by.items() if k.startswith(prefix))  # noqa: E731
    return {
        "gemm": total("gemm_"),
        "attention": total("attention_"),
        "memory": by.get("memory", 0.0),
        "collective": by.get("collective", 0.0),
    }


def paper_row(row: PaperRow, aot_row: dict[str, Any], gpus: int) -> dict[str, Any]:
    """One output row from the row and its compile (``aot.aot_row``); ratios are set later."""
    out: dict[str, Any] = dict.fromkeys(PAPER_FIELDS)
    out.update(
        label=row.label,
        size=row.size,
        model=row.model,
        arch=row.arch,
        recipe=row.recipe,
        entry=row.entry,
        micro_batch_scale=row.micro_batch_scale,
        gpus=gpus,
        status=aot_row["status"],
        error=aot_row["error"],
        warnings=aot_row["warnings"],
        paper_tokens_per_sec_per_gpu=row.paper_tokens_per_sec_per_gpu,
        compile_s=aot_row["compile_s"],
        config=aot_row["config"],
        aot=aot_row,
    )
    if aot_row["memory"]:
        mem = aot_row["memory"]
        out.update(
            memory_gib=mem["total_bytes"] / 2**30,
            usable_gib=mem["usable_bytes"] / 2**30,
            fits=mem["fits"],
        )
    est = aot_row["estimate"]
    if est:
        out.update(
            estimated_tokens_per_sec_per_gpu=est["tokens_per_sec_per_gpu"],
            kernels_per_step=est["kernels_per_step"],
            estimated_step_s=est["step_s"],
            split_s=split(est),
        )
    counts = aot_row["gemm_counts"]
    if counts is not None:
        out.update(
            fp8_gemms_in_block=counts.get("fp8_in_block", 0),
            non_fp8_gemms_in_block=counts.get("non_fp8_in_block", 0),
            cudnn_fp8_attention_calls=aot_row["cudnn_fp8_attention_calls"],
            cudnn_attention_calls=aot_row["cudnn_attention_calls"],
        )
    return out


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sets each row's estimated and paper ratios to Llama3 BF16 at its size (None without one)."""
    base_of = {
        r["size"]: r for r in rows if is_baseline(r["arch"], r["recipe"], r["micro_batch_scale"])
    }
    for r in rows:
        base = base_of.get(r["size"])
        if base is None:
            continue
        for field, value in (
            ("estimated_ratio", "estimated_tokens_per_sec_per_gpu"),
            ("paper_ratio", "paper_tokens_per_sec_per_gpu"),
        ):
            if r[value] is not None and base[value]:
                r[field] = r[value] / base[value]
    return rows


def compile_row(row: PaperRow, scale: str, target: Target) -> dict[str, Any]:
    """``aot.aot_row`` of the row at its work (Triton GEMMs off), or a row with its error."""
    work = WORK[scale][row.size]
    try:
        config = row_config(row, scale)
        summary = measure.config_summary(config, work.gpus)
    except ValueError as e:  # e.g. a mesh that does not cover the work's GPUs
        result = dict.fromkeys(aot.AOT_FIELDS)
        result.update(status="error", error=f"{type(e).__name__}: {e}", warnings=[])
        return result
    return aot.aot_row(row.entry, config, target, work.gpus, False, summary)


def run_rows(
    target: Target,
    scale: str,
    rows: Sequence[PaperRow] = ROWS,
    log: Callable[[str], None] = lambda s: print(s, end="", flush=True),
) -> list[dict[str, Any]]:
    """Compiles every row for ``target`` and returns the output rows, printing
    ``compiling row i/n: label ... done in X s`` through ``log`` as it goes."""
    out = []
    for i, row in enumerate(rows, 1):
        gpus = WORK[scale][row.size].gpus
        log(f"compiling row {i}/{len(rows)}: {row.label} ({row.entry}, {gpus} x {target.name}) ...")
        start = time.perf_counter()
        r = paper_row(row, compile_row(row, scale, target), gpus)
        tps = r["estimated_tokens_per_sec_per_gpu"]
        speed = "" if tps is None else f", est. {tps:,.0f} tok/s/GPU"
        log(f" done in {time.perf_counter() - start:.1f} s: {r['status']}{speed}\n")
        out.append(r)
    return with_ratios(out)


def work_summary(scale: str) -> dict[str, Any]:
    """The per-GPU work of each size, for the report."""
    out = {}
    for size, w in WORK[scale].items():
        t = {k.removeprefix("train."): v for k, v in w.overrides.items() if k.startswith("train.")}
        mesh = {k.removeprefix("mesh."): v for k, v in w.overrides.items() if k.startswith("mesh.")}
        shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
        out[size] = {
            "config_size": w.config_size,
            "gpus": w.gpus,
            "mesh": mesh,
            "batch_size": t["batch_size"],
            "micro_batches": t["micro_batches"],
            "sequences_per_gpu_per_step": t["batch_size"] // w.gpus,
            "sequences_per_gpu_per_micro_batch": t["batch_size"] // t["micro_batches"] // shards,
            "paper": w.paper,
        }
    return out


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


HEADER = (
    "size",
    "model",
    "recipe",
    "GPUs",
    "est. tok/s/GPU",
    "paper tok/s/GPU",
    "est. ratio",
    "paper ratio",
    "GiB/GPU",
    "fits",
    "kernels/step",
    "GEMM s",
    "attention s",
    "memory-bound s",
    "collective s",
    "est. step s",
    "FP8 GEMMs in block",
    "status",
)


def table_row(r: dict[str, Any]) -> list[str]:
    s = r["split_s"] or {}
    fits = {True: "yes", False: "**no**"}.get(r["fits"], "—")
    scale = r["micro_batch_scale"] or 1
    return [
        r["size"].upper(),
        r["model"] + (f" ({scale}x larger micro-batches)" if scale > 1 else ""),
        r["recipe"].upper(),
        str(r["gpus"]),
        _fmt(r["estimated_tokens_per_sec_per_gpu"], ",.0f"),
        _fmt(r["paper_tokens_per_sec_per_gpu"], ","),
        _fmt(r["estimated_ratio"], ".3f"),
        _fmt(r["paper_ratio"], ".3f"),
        _fmt(r["memory_gib"], ".1f"),
        fits,
        _fmt(r["kernels_per_step"], ","),
        _fmt(s.get("gemm"), ".3f"),
        _fmt(s.get("attention"), ".3f"),
        _fmt(s.get("memory"), ".3f"),
        _fmt(s.get("collective"), ".3f"),
        _fmt(r["estimated_step_s"], ".3f"),
        _fmt(r["fp8_gemms_in_block"], "d"),
        r["status"],
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table; errors and warnings below it."""
    table = text_table.markdown(HEADER, [table_row(r) for r in rows])
    notes = [f"- {r['label']}: {r['error']}" for r in rows if r["error"]]
    notes += [f"- {r['label']}: warning: {w}" for r in rows for w in r["warnings"] or ()]
    return "\n".join([table, *([""] + notes if notes else [])])


def report(rows: list[dict[str, Any]], target: Target, scale: str, command: str) -> dict[str, Any]:
    """The JSON report: provenance (command, git, versions), the target, the work, the rows."""
    first = row_config(ROWS[0], scale)
    header = measure.report_header(first, command, target, WORK[scale][ROWS[0].size].gpus)
    del header["config"]  # each row carries its own
    header["target"]["gpus"] = {size: w.gpus for size, w in WORK[scale].items()}
    header.update(
        benchmark="paper",
        scale=scale,
        triton_gemm=False,
        work=work_summary(scale),
        paper_source="docs/spec.md §5: GH200, T=4096, Megatron-LM + Transformer Engine (measured)",
        rows=rows,
    )
    return header


def default_output(target: Target, scale: str) -> str:
    """benchmarks/results/paper-<target>.json (paper-<target>-tiny.json at the tiny scale)."""
    name = f"paper-{target.name}" + ("" if scale == "full" else f"-{scale}")
    return os.path.join(measure.RESULTS_DIR, f"{name}.json")


def main(
    target: Target,
    scale: str,
    command: str,
    output: str | None,
    rows: Sequence[PaperRow] = ROWS,
) -> int:
    """Runs the rows, prints the Markdown table, writes the JSON; 1 if every row failed."""
    rows = run_rows(target, scale, rows)
    print(format_table(rows), flush=True)
    path = output or default_output(target, scale)
    measure.write_report(report(rows, target, scale, command), path)
    print(f"Wrote {path}")
    return 1 if all(r["status"] == "error" for r in rows) else 0
