"""The configs a run has used: ``config.json`` (the current one) and ``config_history/``.

A resumed run whose model changed in a way that keeps every array's shape (rope_base,
input_scale, softmax_scale, train.seq_len, ...) would restore silently and train another model.
:func:`config_changes` lists such differences against the config the checkpoints were written
with; the trainer refuses them unless ``train.allow_config_change=True``. Every start that uses
a config different from the previous one is recorded as ``config_history/step_<N>.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG_FILE = "config.json"
HISTORY_DIR = "config_history"
# What defines the model a checkpoint holds; other fields (steps, LR, logging) may change freely.
MODEL_DEFINING = ("model", "train.seq_len")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _model_defining(config_dict: dict) -> dict[str, Any]:
    flat = _flatten(config_dict)
    return {
        k: v
        for k, v in flat.items()
        if any(k == p or k.startswith(p + ".") for p in MODEL_DEFINING)
    }


def load_saved(workdir: str) -> dict | None:
    """The workdir's current ``config.json`` as a dict, or None if there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_changes(saved: dict, config: Any) -> list[str]:
    """``['model.rope_base: 500000.0 -> 10000.0', ...]``: model-defining fields that differ."""
    before = _model_defining(saved)
    after = _model_defining(json.loads(config.to_json_best_effort()))
    return [
        f"{k}: {before.get(k, '(absent)')!r} -> {after.get(k, '(absent)')!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]


def refuse_changes(changes: list[str], workdir: str) -> None:
    """ValueError listing ``changes`` and the two ways on."""
    raise ValueError(
        f"The checkpoints in {workdir} were written with another model config: "
        + "; ".join(changes)
        + ". Resume with the original values, or accept the change with "
        "--config.train.allow_config_change=True (every config used is kept in "
        f"{os.path.join(workdir, HISTORY_DIR)}), or use another --workdir. Nothing was changed."
    )


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # A crash mid-write never leaves a truncated file behind.


def record(workdir: str, config: Any, start_step: int) -> None:
    """Writes ``config.json`` and, when it differs from the last one kept, a history entry."""
    text = config.to_json_best_effort(indent=2)
    history = os.path.join(workdir, HISTORY_DIR)
    os.makedirs(history, exist_ok=True)
    kept = sorted(
        (f for f in os.listdir(history) if f.startswith("step_") and f.endswith(".json")),
        key=lambda f: int(f[len("step_") : -len(".json")]),
    )
    last = None
    if kept:
        with open(os.path.join(history, kept[-1])) as f:
            last = f.read()
    if last != text:
        _atomic_write(os.path.join(history, f"step_{start_step}.json"), text)
    _atomic_write(os.path.join(workdir, CONFIG_FILE), text)
