"""What a run was: code version, libraries, devices, flags and the resolved config.

A number without its setup cannot be reproduced, so every run writes this to its TensorBoard
Text tab (:func:`to_markdown`) and the trainer can keep it in checkpoint metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax

# Distribution names, as pip knows them. transformer-engine only exists on GPU images.
_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "numpy",
    "ml_dtypes",
    "tensorboardX",
    "transformer-engine",
)

_REPO = pathlib.Path(__file__).resolve().parents[2]  # fogjax/train/provenance.py -> the repo


def _git(*args: str) -> str | None:
    """Output of ``git args`` in the fogjax checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _config_text(config: Any) -> str:
    # ConfigDict prints as YAML-like text that reads well and lists every resolved field.
    if hasattr(config, "to_dict"):
        return str(config)
    return json.dumps(config, indent=2, sort_keys=True, default=str)


def provenance(config: Any, param_count: int, extra: dict[str, Any] | None = None) -> dict:
    """A JSON-serialisable record of the run.

    Keys: git_sha / git_dirty (None outside a git checkout; dirty counts tracked changes only),
    python, versions {package: version or None}, devices {platform, kind, count, local_count,
    process_count}, xla_flags, param_count, config (text), plus ``extra`` (e.g. the mesh shape).
    """
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    devices = jax.devices()
    record = {
        "git_sha": sha,
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "devices": {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "local_count": jax.local_device_count(),
            "process_count": jax.process_count(),
        },
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "param_count": int(param_count),
        "config": _config_text(config),
    }
    record.update(extra or {})
    return record


def to_markdown(record: dict) -> str:
    """``record`` as a markdown table of scalars, followed by the config in a code block."""
    rows = ["| field | value |", "|---|---|"]
    for key, value in record.items():
        if key == "config":
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                rows.append(f"| {key}.{sub} | `{v}` |")
        else:
            rows.append(f"| {key} | `{value}` |")
    # Four-space indentation is a code block in TensorBoard's markdown (fences are not always).
    config = "\n".join("    " + line for line in str(record.get("config", "")).splitlines())
    return "\n".join(rows) + "\n\n**config**\n\n" + config + "\n"
