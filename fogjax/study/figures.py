"""The study's PNG figures (matplotlib, Agg backend: no display needed).

Each figure takes ``runs``: a list of (name, summary or None, scalars) and a path, and always
writes a PNG, with a note where no run has the data (e.g. FP8 statistics of a BF16-only study).
The x axis is tokens (steps x tokens per step), the unit the paper's divergence points use.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fogjax.study import curves  # noqa: E402

Run = tuple[str, dict[str, Any] | None, dict[str, dict[int, float]]]
FIGURES = ("loss.png", "kurtosis_qkv.png", "grad_norm.png", "fp8_fractions.png")


def _tokens(summary: dict[str, Any] | None, steps: list[int]) -> list[float]:
    per_step = (summary or {}).get("tokens_per_step", 1)
    return [s * per_step for s in steps]


def _divergence_tokens(summary: dict[str, Any] | None) -> float | None:
    d = (summary or {}).get("divergence")
    return d["tokens"] if d else None


def _save(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _style(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Line colour per architecture and line style per recipe, so that a run and its BF16 twin
    share a colour (solid: the first recipe seen, dashed: BF16, dotted: any other)."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    archs: dict[str, str] = {}
    out = {}
    for name, summary, _ in runs:
        arch, recipe = (summary or {}).get("arch", name), (summary or {}).get("recipe", "")
        colour = archs.setdefault(arch, colours[len(archs) % len(colours)])
        out[name] = {"color": colour, "ls": "--" if recipe == "bf16" else "-"}
    return out


def loss_figure(runs: list[Run], path: str) -> None:
    """Train loss (lines) and eval loss (dots) of every run; x marks a detected divergence. The
    y axis stops at 1.5x the largest initial loss: a diverged run leaves the top of the chart
    (its loss may reach 1e12) instead of flattening every other curve."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles, lows, starts = _style(runs), [], []
    for name, summary, scalars in runs:
        steps, loss = curves.series(scalars, "train/loss")
        finite = [v for v in loss if math.isfinite(v)]
        if not finite:
            continue
        lows.append(min(finite))
        starts.append(finite[0])
        ax.plot(_tokens(summary, steps), loss, lw=1, label=name, **styles[name])
        estep, eloss = curves.series(scalars, "eval/loss")
        ax.plot(_tokens(summary, estep), eloss, "o", ms=4, color=styles[name]["color"])
        div = (summary or {}).get("divergence")
        if div and div["step"] in scalars["train/loss"]:
            top = 1.5 * max(starts)
            y = min(scalars["train/loss"][div["step"]], top * 0.98)
            ax.plot(div["tokens"], y, "x", ms=10, mew=2, color=styles[name]["color"])
    ax.set(
        xlabel="tokens", ylabel="loss", title="Train loss (lines), eval loss (dots); x: diverged"
    )
    if starts:
        ax.set_ylim(0.95 * min(lows), 1.5 * max(starts))
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty_note(ax, "no run has written a loss yet")
    _save(fig, path)


def kurtosis_figure(runs: list[Run], path: str) -> None:
    """Per run: QKV kurtosis averaged over layers and of the worst layer, the first kurtosis
    warning (dashed) and the divergence (solid) marked."""
    n = max(1, len(runs))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, summary, scalars) in zip(axes.flat, runs, strict=False):
        steps, avg = curves.series(scalars, "kurtosis/qkv/avg")
        ax.set_title(name, fontsize=9)
        if not steps:
            _empty_note(ax, "no kurtosis yet")
            continue
        ax.plot(_tokens(summary, steps), avg, label="layer average")
        worst = curves.worst_qkv_layer(scalars)
        if worst:
            wsteps, wvals = curves.series(scalars, worst)
            ax.plot(_tokens(summary, wsteps), wvals, label=f"worst ({worst.rsplit('/', 1)[-1]})")
        warn = (summary or {}).get("first_kurtosis_warning_tokens")
        if warn is not None:
            ax.axvline(warn, color="tab:orange", ls="--", label="first warning")
        div = _divergence_tokens(summary)
        if div is not None:
            ax.axvline(div, color="tab:red", label="diverged")
        ax.set_xlabel("tokens", fontsize=8)
        ax.set_ylabel("QKV kurtosis", fontsize=8)
        ax.legend(fontsize=7)
    _save(fig, path)


def grad_norm_figure(runs: list[Run], path: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn, styles = False, _style(runs)
    for name, summary, scalars in runs:
        steps, grad = curves.series(scalars, "train/grad_norm")
        finite = [(s, g) for s, g in zip(steps, grad, strict=True) if math.isfinite(g) and g > 0]
        if finite:
            ax.plot(_tokens(summary, [s for s, _ in finite]), [g for _, g in finite], lw=1,
                    label=name, **styles[name])  # fmt: skip
            drawn = True
    ax.set(xlabel="tokens", ylabel="gradient norm (before clipping)", title="Gradient norm")
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty_note(ax, "no run has written a gradient norm yet")
    _save(fig, path)


def fp8_figure(runs: list[Run], path: str) -> None:
    """Mean fraction of FP8 elements saturated (clipped at the format's max) and underflowed
    (flushed to zero) over every quantised operand, per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind in zip(axes, ("saturation", "underflow"), strict=True):
        drawn = False
        for name, summary, scalars in runs:
            steps, values = curves.fp8_fraction(scalars, kind)
            if steps:
                ax.plot(_tokens(summary, steps), values, marker=".", lw=1, label=name)
                drawn = True
        ax.set(xlabel="tokens", ylabel=f"mean {kind} fraction", title=f"FP8 {kind}")
        if drawn:
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.legend(fontsize=7)
        else:
            _empty_note(ax, "no FP8 run has statistics yet")
    _save(fig, path)


def write_figures(runs: list[Run], out_dir: str) -> list[str]:
    """Every figure of :data:`FIGURES` into ``out_dir``; returns their paths."""
    makers = (loss_figure, kurtosis_figure, grad_norm_figure, fp8_figure)
    paths = []
    for name, make in zip(FIGURES, makers, strict=True):
        path = f"{out_dir}/{name}"
        make(runs, path)
        paths.append(path)
    return paths
