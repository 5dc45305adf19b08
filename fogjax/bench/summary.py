"""A Markdown table of deviceless-compile reports (``--target`` JSON), one row per entry.

    python -m fogjax.bench.summary benchmarks/results/aot-*.json

Columns: size (d_model x layers), target, GPUs, entry, FP8 GEMMs in the layer body (cuBLASLt),
non-FP8 block GEMMs, cuDNN FP8 / all attention calls, memory per GPU and whether it fits, the
estimated tokens/s per GPU and the estimated ratio to the report's first entry.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from fogjax.bench import text_table

HEADER = (
    "width x layers",
    "GPU",
    "GPUs",
    "entry",
    "FP8 GEMMs in block",
    "non-FP8 in block",
    "cuDNN FP8/all",
    "GiB/GPU",
    "fits",
    "est. tok/s/GPU",
    "est. ratio",
)


def rows_of(report: dict[str, Any]) -> list[list[str]]:
    config = report["config"]
    size = f"{config['d_model']} x {config['num_layers']}"
    target = report["target"]
    out = []
    for r in report["rows"]:
        counts = r.get("gemm_counts") or {}
        mem = r.get("memory") or {}
        est = r.get("estimate") or {}
        non_fp8 = r.get("non_fp8_block_gemms")
        tps = est.get("tokens_per_sec_per_gpu")
        ratio = r.get("estimated_speedup_vs_first")
        out.append(
            [
                size,
                target["name"].upper(),
                str(target["gpus"]),
                r["label"].replace("model.attention_impl=", "attn="),
                str(counts.get("fp8_in_block", "-")),
                "n/a" if non_fp8 is None else str(len(non_fp8)),
                f"{r.get('cudnn_fp8_attention_calls', '-')}/{r.get('cudnn_attention_calls', '-')}",
                "-" if not mem else f"{mem['total_bytes'] / 2**30:.1f}",
                {True: "yes", False: "**no**"}.get(mem.get("fits"), r["status"]),
                "-" if tps is None else f"{tps:,.0f}",
                "-" if ratio is None else f"{ratio:.2f}",
            ]
        )
    return out


def markdown(reports: Sequence[dict[str, Any]]) -> str:
    return text_table.markdown(HEADER, [row for report in reports for row in rows_of(report)])


def main(paths: Sequence[str]) -> int:
    if not paths:
        print("usage: python -m fogjax.bench.summary REPORT.json [...]", file=sys.stderr)
        return 2
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    print(markdown([r for r in reports if r.get("benchmark") == "aot"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
