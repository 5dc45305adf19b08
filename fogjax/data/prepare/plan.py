"""The plan of a preparation: its settings and the input cut into work units.

A *unit* is consecutive pieces of input (:class:`fogjax.data.prepare.reading.Piece`: whole files,
or row groups of a parquet file) holding at least ``unit_bytes`` bytes as stored, the last unit
less. One process tokenises one unit into its own shards, so the output of a unit depends on
nothing but the unit and the settings: any number of workers and hosts, in any order, write the
same files. Host ``i`` of ``H`` takes the units ``u`` with ``u % H == i``.

The plan is written once, to ``<output>/.prepare/plan.json``; a later run on the same output
(a resume, another host) compares its settings and input files with it and refuses any
difference, naming it. The units are taken from the file, so a resume does not read parquet
footers again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fogjax.data.prepare.filters import Filter
from fogjax.data.prepare.reading import InputError, Piece, check_head, check_parquet_columns

PLAN_VERSION = 1
# What each setting is called on the command line, for the refusal of a changed one.
FLAGS = {
    "version": "the fogjax preparation format",
    "tokenizer": "--tokenizer",
    "tokenizer_sha256": "--tokenizer (the file's contents, sha256)",
    "eos_token": "--eos-token",
    "bos_id": "--bos / --bos-token (BOS id)",
    "text_field": "--text-field",
    "filters": "--filter",
    "val_tokens": "--val-tokens",
    "dtype": "--dtype",
    "shard_tokens": "--shard-tokens",
    "unit_bytes": "--unit-bytes",
}


@dataclasses.dataclass(frozen=True)
class Unit:
    """Work unit ``index``: its pieces, in input order."""

    index: int
    pieces: tuple[Piece, ...]

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.pieces)

    @property
    def name(self) -> str:
        """The stem of its shard files, ``u000012``."""
        return f"u{self.index:06d}"

    def describe(self) -> str:
        """Its files, for messages."""
        paths = list(dict.fromkeys(p.path for p in self.pieces))
        more = f" and {len(paths) - 2} more" if len(paths) > 2 else ""
        return ", ".join(paths[:2]) + more

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "pieces": [p.to_json() for p in self.pieces]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Unit:
        return cls(d["index"], tuple(Piece.from_json(p) for p in d["pieces"]))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _candidates(
    files: Sequence[Path], kinds: Sequence[str], text_field: str, filters: Sequence[Filter]
) -> list[Piece]:
    """One piece per file, or per row group of a parquet file (merged later). Reads each file's
    head (a .jsonl's first record, a parquet footer): bad files are refused here."""
    filter_fields = [f.field for f in filters]
    out: list[Piece] = []
    for path, kind in zip(files, kinds, strict=True):
        if kind in (".jsonl", ".jsonl.gz"):
            check_head(path, kind, text_field, filters)
        if kind != ".parquet":
            out.append(Piece(str(path), kind, path.stat().st_size))
            continue
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as e:
            raise InputError(
                f"{path} is not a readable parquet file ({type(e).__name__}: {e}). Download or "
                "write it again."
            ) from None
        check_parquet_columns(path, schema.names, [text_field, *filter_fields], text_field)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            size = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
            out.append(Piece(str(path), kind, size, (g, g + 1), group.num_rows))
    return out


def _merge(last: Piece, piece: Piece) -> Piece | None:
    """Consecutive row groups of one parquet file as one piece, else None."""
    if last.path != piece.path or last.row_groups is None or piece.row_groups is None:
        return None
    if last.row_groups[1] != piece.row_groups[0]:
        return None
    return Piece(
        last.path,
        last.kind,
        last.bytes + piece.bytes,
        (last.row_groups[0], piece.row_groups[1]),
        (last.rows or 0) + (piece.rows or 0),
    )


def make_units(
    files: Sequence[Path],
    kinds: Sequence[str],
    unit_bytes: int,
    text_field: str,
    filters: Sequence[Filter] = (),
) -> list[Unit]:
    """The units of ``files`` (see the module docstring); deterministic in the files and sizes.

    Raises:
      InputError: a file cannot be read or lacks a needed field (its head is read here).
    """
    units: list[Unit] = []
    pieces: list[Piece] = []
    for candidate in _candidates(files, kinds, text_field, filters):
        merged = _merge(pieces[-1], candidate) if pieces else None
        if merged is not None:
            pieces[-1] = merged
        else:
            pieces.append(candidate)
        if sum(p.bytes for p in pieces) >= unit_bytes:
            units.append(Unit(len(units), tuple(pieces)))
            pieces = []
    if pieces:
        units.append(Unit(len(units), tuple(pieces)))
    return units


def host_units(units: Sequence[Unit], num_hosts: int, host_index: int) -> list[Unit]:
    """The units host ``host_index`` of ``num_hosts`` prepares (round robin: even shares)."""
    if num_hosts < 1 or not 0 <= host_index < num_hosts:
        raise ValueError(
            f"--host-index {host_index} is not in [0, --num-hosts {num_hosts}); number the hosts "
            "0 .. H-1 (SLURM_ARRAY_TASK_ID of an array --array=0-(H-1))."
        )
    return [u for u in units if u.index % num_hosts == host_index]


def differences(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Each setting that differs from the saved plan's, as 'FLAG: A before, B now'."""
    out = []
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            flag = FLAGS.get(key, key)
            out.append(f"{flag}: {saved.get(key)!r} before, {settings.get(key)!r} now")
    return out


def input_differences(
    saved: list[list[Any]], inputs: list[list[Any]], finished: set[str]
) -> list[str]:
    """How the input files (path, size) differ from the saved plan's, for the refusal.

    A file may change size only while none of its units is ``finished`` (a damaged download
    replaced after the preparation named it); a finished file changed would make the output
    disagree with its input. Another list of files, or another order, is always a difference.
    """
    old, new = {p: s for p, s in saved}, {p: s for p, s in inputs}
    changed = sorted(p for p in finished if p in old and p in new and old[p] != new[p])
    if [p for p, _ in saved] == [p for p, _ in inputs] and not changed:
        return []
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    out = [f"--input: {len(saved)} files before, {len(inputs)} now"]
    out += [f"no longer given: {p}" for p in gone[:3]]
    out += [f"new: {p}" for p in added[:3]]
    out += [f"changed since it was prepared: {p} ({old[p]} -> {new[p]} bytes)" for p in changed[:3]]
    if not (gone or added or changed):
        out.append("the same files in another order")
    return out


def write_plan(path: Path, settings: dict, inputs: list[list[Any]], units: list[Unit]) -> None:
    from fogjax.data.shards import write_text

    plan = {
        "version": PLAN_VERSION,
        "settings": settings,
        "inputs": inputs,
        "units": [u.to_json() for u in units],
    }
    write_text(path, json.dumps(plan, indent=1) + "\n")


def read_plan(path: Path) -> tuple[dict, list[list[Any]], list[Unit]]:
    """(settings, inputs, units) of a saved plan.

    Raises:
      ValueError: the file is damaged, naming it and the fix.
    """
    try:
        plan = json.loads(path.read_text())
        return plan["settings"], plan["inputs"], [Unit.from_json(u) for u in plan["units"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is damaged ({type(e).__name__}: {e}): the output's record of what it holds "
            "is lost. Prepare into a new --output."
        ) from None
