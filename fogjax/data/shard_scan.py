"""The largest token id of every shard, checked cheaply at each start-up.

metadata.json records each shard's largest id at preparation, but a shard edited afterwards (a
hand-made array saved over it) may hold ids beyond the model's vocabulary, which train into NaN
and read as a divergence. Scanning a terabyte at every start-up is not cheap, so the scan is
cached: ``.shard_scan.json`` beside the shards (or, when the folder is read-only, a file under
``$FOGJAX_CACHE/shard-scans/``) maps each shard to its size, modification time (ns) and largest
id. A shard whose size and mtime match its entry is trusted; any other is scanned again. An
edit changes the mtime, so it is caught; copying a dataset without preserving times (``cp -r``
rather than ``cp -a`` / ``rsync -a``) makes the first start-up scan everything once.

Preparation primes the cache (:func:`record`) from the ids it has just written, so a freshly
prepared dataset is never scanned.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fogjax.data.cache import cache_root
from fogjax.data.shards import SPLITS, DatasetInfo, open_shard, write_text

CACHE_FILE = ".shard_scan.json"
_VERSION = 1
_CHUNK = 1 << 24  # Tokens per read while scanning: bounded memory on any shard size.


def _cache_paths(directory: Path) -> tuple[Path, Path]:
    """(beside the shards, the user-cache fallback for a read-only dataset folder)."""
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return directory / CACHE_FILE, cache_root() / "shard-scans" / f"{digest}.json"


def _load(directory: Path) -> dict[str, dict[str, int]]:
    entries: dict[str, dict[str, int]] = {}
    for path in reversed(_cache_paths(directory)):  # The folder's own cache wins.
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # Missing or damaged: a cache, so scan again.
            continue
        if isinstance(data, dict) and data.get("version") == _VERSION:
            entries.update(data.get("shards", {}))
    return entries


def _save(directory: Path, entries: dict[str, dict[str, int]]) -> None:
    text = json.dumps({"version": _VERSION, "shards": entries}, indent=1, sort_keys=True) + "\n"
    for path in _cache_paths(directory):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, text)
            return
        except OSError:  # A read-only dataset folder: fall back to the user cache.
            continue
    # Neither is writable: the next start-up scans the changed shards again; nothing is wrong.


def _stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def scan(path: Path) -> int:
    """The largest id in one shard (-1 if empty), read in bounded chunks."""
    array = open_shard(path)
    largest = -1
    for start in range(0, array.shape[0], _CHUNK):
        chunk = array[start : start + _CHUNK]
        if chunk.size:
            largest = max(largest, int(chunk.max()))
    return largest


def record(directory: Path, max_ids: dict[str, int]) -> None:
    """Enters shards just written (``{file name: largest id}``) with their current size and mtime,
    so the first start-up trusts them without a scan."""
    entries = _load(directory)
    for name, largest in max_ids.items():
        entries[name] = {**_stamp(directory / name), "max_token_id": int(largest)}
    _save(directory, entries)


def shard_max_token_ids(info: DatasetInfo) -> dict[Path, int]:
    """``{shard path: its largest id}`` for every shard of both splits: from the cache where a
    shard's size and mtime match its entry, else scanned (and the cache updated)."""
    entries = _load(info.dir)
    result: dict[Path, int] = {}
    changed = False
    for split in SPLITS:
        for path in info.shards(split):
            key = os.path.relpath(path, info.dir)
            stamp = _stamp(path)
            entry = entries.get(key)
            if entry is None or {k: entry.get(k) for k in stamp} != stamp:
                entry = {**stamp, "max_token_id": scan(path)}
                entries[key], changed = entry, True
            result[path] = int(entry["max_token_id"])
    if changed:
        _save(info.dir, entries)
    return result
