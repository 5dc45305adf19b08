"""``STUDY_DIR/report.md``, ``STUDY_DIR/summary.json`` and the figures, from the runs' folders.

Everything is read back from each run's ``summary.json`` (written by the trainer) and TensorBoard
events, so the report can be rebuilt at any time (``--report-only``), also while runs are missing
or still going. Lead time is the divergence's tokens minus the first kurtosis warning's tokens,
when the warning came first (docs/spec.md §4: the paper's QKV kurtosis left its trend ~12B tokens
before the loss diverged).
"""

from __future__ import annotations

import json
import os
from typing import Any

from fogjax import config_lib
from fogjax.study import curves, figures
from fogjax.study.runner import read_summary
from fogjax.study.spec import Study


def _row(run: Any, summary: dict[str, Any] | None) -> dict[str, Any]:
    """One run's numbers; ``status`` 'not run' when it has no summary yet."""
    row: dict[str, Any] = {"name": run.name, "arch": run.arch, "recipe": run.recipe}
    if summary is None:
        return {**row, "status": "not run", "diverged": None}
    div = summary.get("divergence")
    warn_tokens = summary.get("first_kurtosis_warning_tokens")
    lead = None
    if div and warn_tokens is not None and warn_tokens <= div["tokens"]:
        lead = div["tokens"] - warn_tokens
    return {
        **row,
        "status": summary["status"],
        "steps_done": summary["step"],
        "tokens_seen": summary["tokens_seen"],
        "tokens_per_step": summary["tokens_per_step"],
        "diverged": bool(summary.get("diverged")),
        "divergence_step": div["step"] if div else None,
        "divergence_tokens": div["tokens"] if div else None,
        "divergence_reason": div["reason"] if div else None,
        "first_kurtosis_warning_step": summary.get("first_kurtosis_warning_step"),
        "first_kurtosis_warning_tokens": warn_tokens,
        "first_qkv_warning_step": summary.get("first_qkv_warning_step"),
        "lead_time_tokens": lead,
        "final_train_loss": summary.get("final_train_loss"),
        "final_eval_loss": summary.get("final_eval_loss"),
        "max_qkv_kurtosis": summary.get("max_qkv_kurtosis"),
    }


def bf16_twins(study: Study) -> dict[str, str]:
    """{run name: its BF16 twin's name}: the run of the same architecture and fields whose recipe
    is bf16 (docs/spec.md §4 judges an FP8 run against its twin, not against another block)."""

    def key(run: Any) -> tuple:
        fields = {k: v for k, v in run.fields.items() if k != "precision.recipe"}
        return run.arch, tuple(sorted((k, repr(v)) for k, v in fields.items()))

    bf16 = {key(r): r.name for r in study.runs if r.recipe == "bf16"}
    return {r.name: bf16[key(r)] for r in study.runs if r.recipe != "bf16" and key(r) in bf16}


def _verdict(row: dict[str, Any], twin: dict[str, Any] | None) -> str | None:
    """What a divergence says about FP8 (docs/spec.md §4), from a run and its BF16 twin."""
    if twin is None or row["diverged"] is None or twin["diverged"] is None:
        return None
    if row["diverged"] and not twin["diverged"]:
        return "FP8 failure"
    if row["diverged"]:
        return "fails in BF16 too"
    return "twin diverged" if twin["diverged"] else "stable"


def _with_twins(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``bf16_twin``, ``gap_to_twin`` and ``verdict``. The gap is the final eval loss minus
    the twin's (several batches: steadier than one step's train loss), only where neither run
    diverged (a diverged loss says nothing about precision)."""
    by_name, twins = {r["name"]: r for r in rows}, bf16_twins(study)
    out = []
    for row in rows:
        twin = by_name.get(twins.get(row["name"], ""))
        gap = None
        both = twin and row.get("diverged") is False and twin.get("diverged") is False
        if both and row.get("final_eval_loss") is not None and twin.get("final_eval_loss"):
            gap = row["final_eval_loss"] - twin["final_eval_loss"]
        out.append({**row, "bf16_twin": twin["name"] if twin else None, "gap_to_twin": gap,
                    "verdict": _verdict(row, twin)})  # fmt: skip
    return out


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # A diverged loss reaches 1e12: significant digits, not a 16-digit fixed point.
        sign = "+" if signed else ""
        return f"{value:{sign}.{digits}{'g' if abs(value) >= 1e4 else 'f'}}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M" if value < 1e9 else f"{value / 1e9:.2f}B"
    return str(value)


_COLUMNS = (
    ("run", "name"),
    ("arch", "arch"),
    ("recipe", "recipe"),
    ("status", "status"),
    ("diverged?", "diverged"),
    ("at step", "divergence_step"),
    ("at tokens", "divergence_tokens"),
    ("reason", "divergence_reason"),
    ("first kurtosis warning (step)", "first_kurtosis_warning_step"),
    ("lead time (tokens)", "lead_time_tokens"),
    ("final train loss", "final_train_loss"),
    ("final eval loss", "final_eval_loss"),
    ("max QKV kurtosis", "max_qkv_kurtosis"),
    ("eval loss minus BF16 twin", "gap_to_twin"),
    ("verdict", "verdict"),
)


def markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for title, _ in _COLUMNS) + " |"
    rule = "|" + "---|" * len(_COLUMNS)
    body = ["| " + " | ".join(_fmt(r.get(key)) for _, key in _COLUMNS) + " |" for r in rows]
    lines = [
        f"# Stability study `{study.name}`",
        "",
        f"Config `{study.source}`: {len(study.runs)} runs at size {study.size}, "
        f"{study.steps} steps each. Regenerate with "
        f"`python -m fogjax.study --config={study.source} --workdir=STUDY_DIR --report-only`.",
        "",
        head,
        rule,
        *body,
        "",
        "Diverged: a NaN/inf loss, or a loss or gradient-norm spike (`log.loss_spike_*`, "
        "`log.grad_spike_*`); the step is its onset. First kurtosis warning: the first step a "
        "layer's kurtosis left its log-trend (fogjax/monitoring/kurtosis.py). Lead time: "
        "tokens from that warning to the divergence. Max QKV kurtosis: the largest per-layer "
        "value measured. "
        "Verdict (docs/spec.md §4, each run against its BF16 twin: same architecture, fields and "
        "stress): 'FP8 failure' when only the FP8 run diverged, 'fails in BF16 too' when the "
        "stress alone breaks the block, 'stable' when neither diverged.",
    ]
    if study.reference:
        ref = next((r for r in rows if r["name"] == study.reference), None)
        ref_loss = ref and ref.get("final_train_loss")
        if ref_loss is not None:
            lines += [
                "",
                f"Final train loss minus the reference `{study.reference}` (runs that "
                "did not diverge):",
                "",
            ]
            for r in rows:
                if r["name"] != study.reference and r.get("diverged") is False:
                    gap = r["final_train_loss"] - ref_loss
                    lines.append(f"- {r['name']}: {_fmt(gap, signed=True)}")
    lines += ["", "## Figures", ""]
    titles = ("Loss", "QKV kurtosis (layer average, worst layer)", "Gradient norm",
              "FP8 saturation and underflow")  # fmt: skip
    for title, name in zip(titles, figures.FIGURES, strict=True):
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def write_report(study: Study, study_dir: str) -> dict[str, Any]:
    """Writes report.md, summary.json and the figures into ``study_dir``; returns the summary."""
    os.makedirs(study_dir, exist_ok=True)
    runs, rows = [], []
    for run in study.runs:
        workdir = os.path.join(study_dir, run.name)
        summary = read_summary(workdir)
        # A run still going has no summary yet: its figures still need tokens and a style.
        seen = summary or {
            "tokens_per_step": config_lib.tokens_per_step(run.config),
            "arch": run.arch,
            "recipe": run.recipe,
        }
        runs.append((run.name, seen, curves.read_scalars(workdir)))
        rows.append(_row(run, summary))
    rows = _with_twins(study, rows)
    figures.write_figures(runs, study_dir)
    result = {
        "study": study.name,
        "config": study.source,
        "size": study.size,
        "steps": study.steps,
        "reference": study.reference or None,
        "runs": rows,
        "figures": list(figures.FIGURES),
    }
    with open(os.path.join(study_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(study_dir, "report.md"), "w") as f:
        f.write(markdown(study, rows) + "\n")
    return result
