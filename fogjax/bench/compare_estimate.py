"""Estimated vs measured step time: how wrong the deviceless estimate was, per entry.

    python -m fogjax.bench.compare_estimate MEASURED.json ESTIMATED.json [--output=FILE.json]

MEASURED.json is a ``python -m fogjax.bench`` report run on a GPU, ESTIMATED.json the same entries
compiled with ``--target`` (the cuBLASLt rows, ``triton_gemm`` false, are compared). Rows are
matched by label; the error is (estimated - measured) / measured. benchmarks/gpu_check.sh runs it.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def compare(measured: dict[str, Any], estimated: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per label present in both reports with a measured and an estimated step time."""
    estimates = {
        r["label"]: r["estimate"]["step_s"]
        for r in estimated["rows"]
        if not r.get("triton_gemm") and r.get("estimate")
    }
    rows = []
    for r in measured["rows"]:
        if r.get("step_ms") is None or r["label"] not in estimates:
            continue
        measured_s, estimated_s = r["step_ms"] / 1e3, estimates[r["label"]]
        rows.append(
            {
                "label": r["label"],
                "measured_step_s": measured_s,
                "estimated_step_s": estimated_s,
                "relative_error": (estimated_s - measured_s) / measured_s,
            }
        )
    return rows


def main(argv: list[str]) -> int:
    paths = [a for a in argv if not a.startswith("--output=")]
    if len(paths) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    with open(paths[0]) as f, open(paths[1]) as g:
        rows = compare(json.load(f), json.load(g))
    for r in rows:
        print(
            f"{r['label']}: measured {1e3 * r['measured_step_s']:.1f} ms, estimated "
            f"{1e3 * r['estimated_step_s']:.1f} ms ({r['relative_error']:+.0%})"
        )
    for a in argv:
        if a.startswith("--output="):
            with open(a.removeprefix("--output="), "w") as f:
                json.dump({"measured": paths[0], "estimated": paths[1], "rows": rows}, f, indent=2)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
