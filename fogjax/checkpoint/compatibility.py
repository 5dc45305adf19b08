"""Whether a checkpoint fits the run restoring it, decided from orbax's tree metadata alone.

A different model (any leaf added, removed or reshaped outside the optimizer state) is a
:class:`CheckpointMismatchError`; another optimizer-state precision layout (quantised moments,
block scales, remainders, master dtype) a :class:`StatePrecisionMismatchError`, whose message names
the ``optim.*`` fields to resume with. Nothing here reads an array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class CheckpointMismatchError(ValueError):
    """The saved train state has another structure or shape than the model being restored."""


class StatePrecisionMismatchError(CheckpointMismatchError):
    """The saved parameters and optimizer state have another precision layout (optim.*_dtype,
    optim.state_precision, optim.state_block_size, optim.master_rounding) than the run's."""


def path_str(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/w': shape} over the leaves of ``tree`` (arrays, structs or orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(p): tuple(x.shape) for p, x in leaves if x is not None}


def _dtypes(tree: Any) -> dict[str, str]:
    """{'params/w': 'float32'} over the leaves of ``tree`` (arrays, structs or orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(p): str(np.dtype(x.dtype)) for p, x in leaves if x is not None}


def precision_problems(saved: Any, expected: Any, shape_problems: list[str]) -> list[str]:
    """The differences, if they are those of another precision layout: leaves added, removed or
    reshaped only under opt_state/ (quantised moments, scales, remainders), dtypes changed only
    under params/ and opt_state/. Else [] (a different model)."""
    saved_shapes, expected_shapes = _shapes(saved), _shapes(expected)
    reshaped = {
        p
        for p in saved_shapes.keys() | expected_shapes.keys()
        if saved_shapes.get(p) != expected_shapes.get(p)
    }
    saved_dtypes, expected_dtypes = _dtypes(saved), _dtypes(expected)
    retyped = {
        p: f"{p!r} is saved as {saved_dtypes[p]}, this run stores {d}"
        for p, d in expected_dtypes.items()
        if p in saved_dtypes and saved_dtypes[p] != d
    }
    if not all(p.startswith("opt_state/") for p in reshaped):
        return []
    if not all(p.startswith(("params/", "opt_state/")) for p in retyped):
        return []
    return list(retyped.values()) + shape_problems


def shape_problems(saved: Any, expected: Any) -> list[str]:
    """One line per leaf of ``expected`` missing from ``saved`` or shaped otherwise, and per leaf
    of ``saved`` this model lacks; [] when the two trees have the same shapes."""
    saved_shapes, expected_shapes = _shapes(saved), _shapes(expected)
    problems = []
    for path, shape in expected_shapes.items():
        if path not in saved_shapes:
            problems.append(f"{path!r} (expected shape {shape}) is not in the checkpoint")
        elif saved_shapes[path] != shape:
            problems.append(f"{path!r} has saved shape {saved_shapes[path]}, expected {shape}")
    problems += [
        f"{path!r} (saved shape {shape}) is not in this model"
        for path, shape in saved_shapes.items()
        if path not in expected_shapes
    ]
    return problems
