"""Benchmark entries: which (architecture, recipe, overrides) configs ``fogjax.bench`` times.

``--recipes=bf16,fp8`` varies the recipe of one config; ``--compare=arch:recipe[:field=value...]``
builds each entry from ``config_lib.get_config(arch, size)`` plus the shared ``--config.*``
overrides and its own ``field=value`` items.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from fogjax import config_lib
from fogjax.precision import registry


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the benchmark: a label ('arch:recipe') and its complete config."""

    label: str
    config: ml_collections.ConfigDict


def split_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _check_recipe(name: str) -> None:
    if name not in registry.available():
        raise ValueError(f"Unknown recipe {name!r}; choose from {registry.available()}.")


def recipe_entries(config: ml_collections.ConfigDict, names: Sequence[str]) -> list[Entry]:
    """One entry per recipe name, each a copy of ``config`` with ``precision.recipe`` set."""
    entries = []
    for name in names:
        _check_recipe(name)
        c = config.copy_and_resolve_references()
        c.precision.recipe = name
        entries.append(Entry(f"{c.model.arch}:{name}", c))
    return entries


def compare_entries(spec: str, size: str, overrides: dict[str, Any]) -> list[Entry]:
    """Entries from ``'arch:recipe[:field=value...],...'``: ``get_config(arch, size)`` + overrides.

    ``overrides`` is the flat ``{'model.num_layers': 4}`` dict of the ``--config.*`` flags, applied
    to every entry; ``field=value`` items after an entry's recipe apply to that entry alone (e.g.
    ``llama3:bf16:model.attention_impl=cudnn`` for a cuDNN-attention baseline). The entry's recipe
    wins over an overridden ``precision.recipe``.
    """
    entries = []
    for item in split_list(spec):
        arch, _, rest = item.partition(":")
        name, *own = rest.split(":")
        if not name:
            raise ValueError(f"--compare entry {item!r} must be arch:recipe, e.g. llama3:bf16.")
        if arch not in config_lib.ARCHS:
            raise ValueError(
                f"Unknown architecture {arch!r} in --compare; choose from {config_lib.ARCHS}."
            )
        if name not in registry.available():
            raise ValueError(
                f"--compare entry {item!r}: unknown recipe {name!r}; choose from "
                f"{registry.available()}."
            )
        c = config_lib.get_config(arch, size)
        c.update_from_flattened_dict(dict(overrides))
        for assignment in own:
            field, eq, value = assignment.partition("=")
            if not eq:
                raise ValueError(
                    f"--compare entry {item!r}: {assignment!r} must be field=value, e.g. "
                    "model.attention_impl=cudnn."
                )
            current = _lookup(c, field, item)
            c.update_from_flattened_dict({field: _parse(value, current, field, item)})
        c.precision.recipe = name
        entries.append(Entry(item, c))
    return entries


def _lookup(config: Any, field: str, item: str) -> Any:
    node = config
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"--compare entry {item!r}: unknown config field {field!r}.")
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise ValueError(
            f"--compare entry {item!r}: {field!r} is a config section, not a field; set one of "
            f"its fields, e.g. {field}.{next(iter(node.keys()))}=..."
        )
    return node


_KINDS = {bool: "true or false", int: "an integer", float: "a number"}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse(value: str, current: Any, field: str, item: str) -> Any:
    """``value`` as the type of the field's current value; ValueError naming the entry."""
    if current is None:  # An unset optional field takes the text as it is.
        return value
    kind = type(current)
    try:
        if isinstance(current, bool):
            return _BOOLS[value.lower()]
        return kind(value)
    except (KeyError, ValueError, TypeError):
        what = _KINDS.get(kind, f"a {kind.__name__}")
        raise ValueError(
            f"--compare entry {item!r}: {field}={value!r} must be {what} "
            f"(e.g. {field}={str(current).lower() if kind is bool else current})."
        ) from None


def size_of_config_arg(filename: str) -> str:
    """The size after the colon of ``configs/x.py:1.5b`` ('tiny' when there is none)."""
    size = filename.partition(":")[2] or "tiny"
    if size not in config_lib.SIZES:
        raise ValueError(
            f"--compare needs the size from --config=FILE:SIZE with SIZE in {config_lib.SIZES}; "
            f"got {filename!r}."
        )
    return size
