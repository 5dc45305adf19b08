"""Hugging Face weight files: writing safetensors shards with an index, reading them back.

Writing (:class:`ShardWriter`) uses the ``safetensors`` package (requirements-export.txt); a
checkpoint above ``max_shard_bytes`` is split into ``model-0000i-of-0000N.safetensors`` files with
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), as transformers
writes and reads them; a smaller one is a single ``model.safetensors``.

Reading (:class:`SafetensorsCheckpoint`) parses the format itself (8-byte little-endian header
length, JSON header, raw little-endian data) and memory-maps the data, so a tensor is read only
when asked for and BF16 needs no torch (safetensors' own NumPy reader has no bfloat16).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Hugging Face's default shard size: above it a checkpoint is split.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class ShardWriter:
    """Adds tensors in order, writing a shard each time the next tensor would pass the limit.

    Args:
      directory: where the files go (exists).
      max_shard_bytes: the largest shard (one tensor larger than it gets a shard of its own).
      log: called with a line per shard written.
    """

    def __init__(
        self,
        directory: str,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        log: Callable[[str], None] = print,
    ):
        self.directory, self.max_shard_bytes, self.log = directory, max_shard_bytes, log
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (temporary file, names, bytes)

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file  # Imported when used: requirements-export.txt.

        path = os.path.join(self.directory, f"shard-{len(self._shards):05d}.tmp")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending), self._pending_bytes))
        self.log(
            f"  wrote shard {len(self._shards)}: {len(self._pending)} tensors, "
            f"{self._pending_bytes / 1e9:.2f} GB"
        )
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes the last shard, names the files, writes the index if sharded; returns the
        file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], os.path.join(self.directory, SINGLE_FILE))
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for i, (path, tensors, _) in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.directory, name))
            names.append(name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {
            "metadata": {"total_size": sum(b for _, _, b in self._shards)},
            "weight_map": weight_map,
        }
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        return names + [INDEX_FILE]


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory (single file or sharded with an index).

    Raises (at construction):
      FileNotFoundError: neither model.safetensors nor model.safetensors.index.json is there.
      ValueError: a file is not safetensors, or holds a dtype other than F64/F32/F16/BF16.
    """

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(
                f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}: point at a Hugging Face "
                "checkpoint directory saved with safetensors (save_pretrained's default; for a "
                ".bin checkpoint, load it in transformers and save_pretrained it again)."
            )
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, start = _read_header(path)
            for key, entry in header.items():
                if key != "__metadata__":
                    self._where[key] = (path, entry, start)

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` (memory-mapped, read-only), KeyError if absent."""
        path, entry, start = self._where[name]
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            return np.zeros(shape, dtype)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return data.view(dtype).reshape(shape)


def _read_header(path: str) -> tuple[dict, int]:
    """(the JSON header, the byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a safetensors file (unreadable header).") from None
    bad = {e["dtype"] for k, e in header.items() if k != "__metadata__"} - set(DTYPES)
    if bad:
        raise ValueError(f"{path} holds {sorted(bad)} tensors; fogjax imports {sorted(DTYPES)}.")
    return header, 8 + size
