"""``python -m fogjax.bench``: measure the train step here, or compile it for a GPU (``--target``).

    python -m fogjax.bench --config=configs/fog_flash.py:1.5b --recipes=bf16,fp8,fp8dpa
    python -m fogjax.bench --config=configs/fog_flash.py:1.5b --compare=llama3:bf16,fog_flash:fp8dpa
    python -m fogjax.bench --config=configs/fog_flash.py:1.5b --attention=xla:bf16,cudnn:fp8dpa
    python -m fogjax.bench --target=h100 [--gpus=8] [--triton_gemm=both] --config=... --compare=...
    python -m fogjax.bench --target=h100 --plan --config=... --compare=... --plan_sizes=390m,1.5b
    python -m fogjax.bench --paper --target=gh200 [--paper_scale=tiny]

Without ``--target`` each entry runs on this machine's devices (measure.py). With it nothing runs:
the step is compiled for the named GPU without one (aot.py), ``--plan`` searches the batch that
fits (plan.py), ``--paper`` estimates the paper's throughput table (paper.py).
benchmarks/README.md explains every column.
Exit codes: 0 done, 1 every entry failed, 2 bad input (one line naming the flag or entry).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

if any(a.startswith("--target") for a in sys.argv[1:]):
    # Compile-only GPU devices need no driver; without this the CUDA plugin looks for one (and
    # prints a traceback on a machine without a GPU).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fogjax import command_line
from fogjax.bench import aot, paper, plan
from fogjax.bench import attention as bench_attention  # noqa: E402
from fogjax.bench import measure as step  # noqa: E402
from fogjax.bench.entries import (  # noqa: E402
    compare_entries,
    recipe_entries,
    size_of_config_arg,
    split_list,
)
from fogjax.bench.targets import (  # noqa: E402
    TARGETS,
    TargetUnavailable,
    get_target,
    target_devices,
)

FLAGS = flags.FLAGS


def _entries(size: str | None = None) -> list:
    """The --compare or --recipes entries (at ``size`` instead of the config's, if given)."""
    flag = FLAGS["config"]
    if FLAGS.compare:
        size = size or size_of_config_arg(config_flags.get_config_filename(flag))
        return compare_entries(FLAGS.compare, size, config_flags.get_override_values(flag))
    if size is not None:
        raise ValueError("--plan_sizes needs --compare=arch:recipe,... (entries built per size).")
    names = split_list(FLAGS.recipes) if FLAGS.recipes else [FLAGS.config.precision.recipe]
    return recipe_entries(FLAGS.config, names)


def _check_paper_flags() -> None:
    """--paper builds every row itself (paper.py): flags that would be ignored are refused."""
    if not FLAGS.target:
        raise ValueError("--paper compiles for a GPU: add --target=gh200 (the paper's GPU).")
    given = [
        f"--{name}"
        for name in ("config", "compare", "recipes", "attention", "plan", "gpus")
        if FLAGS[name].present
    ]
    if given:
        raise ValueError(
            f"--paper sets each row's config, GPUs and work itself (fogjax/bench/paper.py); "
            f"drop {', '.join(given)}."
        )
    if FLAGS.triton_gemm != "off" and FLAGS["triton_gemm"].present:
        raise ValueError("--paper compiles with --triton_gemm=off (the cuBLASLt program).")


def _run_target(command: str) -> None:
    target = get_target(FLAGS.target)
    modes = aot.TRITON_MODES[FLAGS.triton_gemm]
    if FLAGS.plan:
        sizes = split_list(FLAGS.plan_sizes) if FLAGS.plan_sizes else [None]
        entries = [(e.label, size or "config", e.config) for size in sizes for e in _entries(size)]
        cells = plan.plan_cells(
            entries,
            split_list(FLAGS.plan_remat),
            [int(k) for k in split_list(FLAGS.plan_micro_batches)],
        )
        rows = []
        for cell in cells:
            row = plan.plan_cell(cell, target, FLAGS.gpus, modes[0], FLAGS.plan_max_batch)
            print(plan.format_plan_table([row]).splitlines()[-1], flush=True)
            rows.append(row)
        report = step.report_header(cells[0].config, command, target=target, gpus=FLAGS.gpus)
        report.update(benchmark="plan", rows=rows)
        _finish(report, plan.format_plan_table(rows), f"plan-{target.name}-{FLAGS.gpus}gpu")
        return
    rows = []
    for entry in _entries():
        summary = step.config_summary(entry.config, FLAGS.gpus)
        for triton in modes:
            rows.append(aot.aot_row(entry.label, entry.config, target, FLAGS.gpus, triton, summary))
    rows = aot.with_speedups(rows)
    report = step.report_header(rows and _entries()[0].config, command, target, FLAGS.gpus)
    report.update(benchmark="aot", rows=rows)
    archs = "-".join(dict.fromkeys(r["arch"] for r in rows))
    _finish(report, aot.format_aot_table(rows), f"aot-{archs}-{target.name}-{FLAGS.gpus}gpu")


def _finish(report: dict, table: str, name: str) -> None:
    """Prints the table and writes the JSON; exit 1 if every row failed."""
    print(table)
    path = FLAGS.output or step.default_output_path(report, name)
    step.write_report(report, path)
    print(f"Wrote {path}")
    if all(row["status"] == "error" for row in report["rows"]):
        sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    command = shlex.join(["python", "-m", "fogjax.bench", *sys.argv[1:]])
    if FLAGS.paper:
        try:
            _check_paper_flags()
            target = get_target(FLAGS.target)
            rows = paper.select_rows(FLAGS.paper_rows)
            target_devices(target)  # the CUDA plugin is there (else the fix, before any row)
        except (ValueError, TargetUnavailable) as e:
            print(f"ERROR: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        sys.exit(paper.main(target, FLAGS.paper_scale, command, FLAGS.output, rows))
    if FLAGS.config is None:
        raise app.UsageError("Give a config: --config=configs/fog_flash.py:1.5b")
    if sum(bool(f) for f in (FLAGS.recipes, FLAGS.compare, FLAGS.attention)) > 1:
        raise app.UsageError("Give one of --recipes, --compare and --attention.")
    if FLAGS.steps < 1 or FLAGS.warmup < 0:
        raise app.UsageError(f"--steps={FLAGS.steps} must be >= 1 and --warmup >= 0.")
    if FLAGS["paper_scale"].present or FLAGS["paper_rows"].present:
        raise app.UsageError("--paper_scale and --paper_rows go with --paper.")
    if (FLAGS.plan or FLAGS.gpus != 1) and not FLAGS.target:
        raise app.UsageError("--plan and --gpus compile for a GPU: add --target=h100 (or h200).")
    try:
        if FLAGS.target:
            if FLAGS.attention:
                raise ValueError("--attention measures kernels: run it on a GPU, not --target.")
            _run_target(command)
            return
        if FLAGS.attention:
            report = step.run_attention_benchmark(
                FLAGS.config, FLAGS.attention, FLAGS.steps, FLAGS.warmup, command
            )
            _finish_local(report, bench_attention.format_table(report["rows"]), "attention")
            return
        report = step.run_benchmark(_entries(), FLAGS.steps, FLAGS.warmup, command)
    except (ValueError, TargetUnavailable) as e:
        # Bad input (a --compare entry, a recipe, a target): the message names it and the fix;
        # absl's UsageError would bury it under the 50 lines of --help.
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    _finish_local(report, step.format_table(report["rows"]), "")


def _finish_local(report: dict, table: str, name: str) -> None:
    import jax

    if jax.process_index() == 0:
        _finish(report, table, name)


def _define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Config file and size, e.g. configs/fog_flash.py:1.5b.", lock_config=True
    )
    flags.DEFINE_string("recipes", None, "Comma-separated recipes, e.g. bf16,fp8,fp8dpa.")
    flags.DEFINE_string(
        "compare", None, "Comma-separated arch:recipe entries, e.g. llama3:bf16,fog_flash:fp8dpa."
    )
    flags.DEFINE_string(
        "attention",
        None,
        "Benchmark attention alone at the config's shapes instead of the train step: "
        "comma-separated impl:recipe, e.g. xla:bf16,cudnn:bf16,xla:fp8dpa,cudnn:fp8dpa.",
    )
    flags.DEFINE_integer("steps", 20, "Timed steps per entry (the median is reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_string(
        "output", None, "JSON path (default benchmarks/results/<name>-<date>-<device>.json)."
    )
    flags.DEFINE_enum(
        "target",
        None,
        sorted(TARGETS),
        "Compile for this GPU instead of running (no GPU needed): FP8 GEMM proof, memory, "
        "estimated step time.",
    )
    flags.DEFINE_integer("gpus", 1, "With --target: GPUs to compile for (nodes of 8 above 8).")
    flags.DEFINE_enum(
        "triton_gemm",
        "both",
        sorted(aot.TRITON_MODES),
        "With --target: xla_gpu_enable_triton_gemm off, on, or both (two compiles per entry).",
    )
    flags.DEFINE_bool("plan", False, "With --target: the largest batch per GPU that fits.")
    flags.DEFINE_string("plan_sizes", None, "With --plan: sizes, e.g. 390m,1.5b,8b.")
    flags.DEFINE_string("plan_remat", "none,dots,full", "With --plan: remat policies.")
    flags.DEFINE_string("plan_micro_batches", "1", "With --plan: micro-batch counts, e.g. 1,4.")
    flags.DEFINE_integer("plan_max_batch", 64, "With --plan: largest batch per GPU to try.")
    flags.DEFINE_bool(
        "paper",
        False,
        "With --target: the paper's throughput table (docs/spec.md §5), every row compiled at the "
        "paper's per-GPU work and estimated; no --config needed.",
    )
    flags.DEFINE_enum(
        "paper_scale",
        "full",
        paper.SCALES,
        "With --paper: 'full' (the paper's sizes) or 'tiny' (the same rows, tiny width; for CI).",
    )
    flags.DEFINE_string(
        "paper_rows",
        None,
        "With --paper: only these rows, comma-separated sizes or size:arch:recipe, e.g. "
        "8b or 1.5b:fog_flash:fp8dpa (Llama3 BF16 of each size always runs: the ratios' base).",
    )


if __name__ == "__main__":
    _define_flags()
    command_line.run(main)
