"""A memory plan: the largest batch per GPU that fits, per configuration, from deviceless compiles.

    JAX_PLATFORMS=cpu python -m fogjax.bench --target=h100 --plan \
        --config=configs/fog_flash.py:1.5b --compare=llama3:bf16,fog_flash:fp8dpa \
        --plan_sizes=390m,1.5b,8b --plan_remat=none,dots,full [--gpus=8 --config.mesh.fsdp=-1]

For every (entry, size, remat policy, micro-batch count) the step is compiled for the target with
1, 2, 4, ... sequences per GPU per micro-batch until it no longer fits (XLA's buffer assignment
against the target's usable memory); the row keeps the largest that fits, its memory and the
estimated tokens/s per GPU there (an estimate: estimate.py). Powers of two only: the answer is
"at least this much fits, twice as much does not".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from fogjax import sharding
from fogjax.bench import aot
from fogjax.bench.targets import Target, target_devices

PLAN_FIELDS = (
    "label",
    "size",
    "remat",
    "micro_batches",
    "gpus",
    "target",
    "triton_gemm",
    "max_batch_per_gpu",  # sequences per GPU per optimizer step (micro-batches included)
    "global_batch",
    "memory_gib",
    "usable_gib",
    "estimated_tokens_per_sec_per_gpu",
    "estimated_mfu",
    "tried",  # [{'batch_per_gpu', 'status', 'memory_gib'}]
    "status",  # 'ok' | 'does not fit' (not even one sequence) | 'error'
    "error",
)


@dataclasses.dataclass(frozen=True)
class PlanCell:
    """One configuration of the plan: an entry's config at a size with a remat policy."""

    label: str
    size: str
    config: ml_collections.ConfigDict


def batch_shards(config: ml_collections.ConfigDict, gpus: int) -> int:
    """How many ways the batch is split: mesh data x fsdp for ``gpus`` devices."""
    data, fsdp, _ = sharding.resolve_mesh_shape(config.mesh, gpus)
    return data * fsdp


def plan_cell(
    cell: PlanCell, target: Target, gpus: int, triton_gemm: bool, max_batch_per_gpu: int
) -> dict[str, Any]:
    """The largest power-of-two batch per GPU of ``cell`` that fits ``gpus`` x ``target``."""
    c = cell.config
    row: dict[str, Any] = dict.fromkeys(PLAN_FIELDS)
    row.update(
        label=cell.label,
        size=cell.size,
        remat=c.model.remat,
        micro_batches=c.train.micro_batches,
        gpus=gpus,
        target=target.name,
        triton_gemm=triton_gemm,
        usable_gib=target.usable_memory_bytes / 2**30,
        tried=[],
    )
    devices = target_devices(target, gpus)
    shards = batch_shards(c, len(devices))
    # Sequences per batch shard per micro-batch: 1, 2, 4, ... (a tensor-parallel group shares
    # its shard's sequences); the row reports the global batch and global / gpus.
    best = None
    per_micro = 1
    while per_micro * c.train.micro_batches * shards / gpus <= max_batch_per_gpu:
        trial = c.copy_and_resolve_references()
        trial.train.batch_size = per_micro * c.train.micro_batches * shards
        r = aot.aot_row(cell.label, trial, target, gpus, triton_gemm)
        mem = (r["memory"] or {}).get("total_bytes")
        per_gpu = trial.train.batch_size / gpus
        row["tried"].append(
            {
                "batch_per_gpu": per_gpu,
                "status": r["status"],
                "memory_gib": None if mem is None else mem / 2**30,
            }
        )
        if r["status"] == "error":
            row.update(status="error", error=r["error"])
            return row
        if r["status"] != "ok":
            break
        best = (trial.train.batch_size, r)
        per_micro *= 2
    if best is None:
        row["status"] = "does not fit" if row["tried"] else "error"
        return row
    global_batch, r = best
    est = r["estimate"]
    row.update(
        status="ok",
        max_batch_per_gpu=global_batch / gpus,
        global_batch=global_batch,
        memory_gib=r["memory"]["total_bytes"] / 2**30,
        estimated_tokens_per_sec_per_gpu=est["tokens_per_sec_per_gpu"],
        estimated_mfu=est["mfu"],
    )
    return row


def plan_cells(
    entries: Sequence[tuple[str, str, ml_collections.ConfigDict]],
    remats: Sequence[str],
    micro_batches: Sequence[int],
) -> list[PlanCell]:
    """Every (entry, remat, micro-batches) combination; ``entries`` are (label, size, config)."""
    cells = []
    for label, size, config in entries:
        for remat in remats:
            for k in micro_batches:
                c = config.copy_and_resolve_references()
                c.model.remat = remat
                c.train.micro_batches = k
                cells.append(PlanCell(label, size, c))
    return cells


def format_plan_table(rows: Sequence[dict[str, Any]]) -> str:
    from fogjax.bench import text_table

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    header = (
        "entry",
        "size",
        "remat",
        "micro",
        "gpus",
        "max batch/gpu",
        "GiB",
        "usable GiB",
        "est. tok/s/gpu",
        "est. MFU",
        "status",
    )
    cells = [
        [
            r["label"],
            r["size"],
            r["remat"],
            str(r["micro_batches"]),
            str(r["gpus"]),
            fmt(r["max_batch_per_gpu"], "g"),
            fmt(r["memory_gib"], ".1f"),
            fmt(r["usable_gib"], ".1f"),
            fmt(r["estimated_tokens_per_sec_per_gpu"], ",.0f"),
            fmt(r["estimated_mfu"], ".1%"),
            r["status"],
        ]
        for r in rows
    ]
    notes = [f"{r['label']} {r['size']} {r['remat']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join([text_table.aligned(header, cells), *notes])
