"""The on-disk format of a prepared dataset, and reading its description.

A prepared dataset is a folder::

    metadata.json          tokenizer, vocab_size, eos_id, dtype, token/document counts, shard names
    tokenizer.json         copy of the HF tokenizer (absent for the 'bytes' tokenizer)
    train_00000.npy ...    1-D token ids, uint16 if the vocabulary fits, else uint32
    val_00000.npy ...      the held-out split, same layout

Each split is one stream of documents, each followed by EOS, cut into shards of at most
``shard_tokens`` tokens. ``metadata.json`` is written last, so a folder without it is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from fogjax.data.tokenizer import load_tokenizer

FORMAT = "fogjax-token-shards"
VERSION = 1
METADATA = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
EMBEDDED = "embedded"
DTYPES = ("auto", "uint16", "uint32")


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The shard dtype for ``vocab_size`` ids: uint16 when they fit (half the disk), else uint32.

    Raises:
      ValueError: ``requested`` is too small for the vocabulary, or no dtype fits it.
    """
    if requested not in DTYPES:
        raise ValueError(f"Unknown token dtype {requested!r}; choose one of {list(DTYPES)}.")
    if requested == "auto":
        requested = "uint16" if vocab_size <= 2**16 else "uint32"
    dtype = np.dtype(requested)
    capacity = int(np.iinfo(dtype).max) + 1
    if vocab_size > capacity:
        raise ValueError(
            f"A vocabulary of {vocab_size} tokens does not fit {dtype.name} "
            f"(at most {capacity} ids). "
            + (
                "Use --dtype uint32 or --dtype auto."
                if dtype == np.uint16
                else "Use a tokenizer with a smaller vocabulary."
            )
        )
    return dtype


class ShardWriter:
    """Appends documents to one split as ``{split}_{i:05d}.npy`` shards of ``shard_tokens`` ids."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self._dir, self._split, self._dtype, self._size = directory, split, dtype, shard_tokens
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.shards: list[str] = []
        self.tokens = 0
        self.documents = 0
        self.max_token_id = -1

    def add_document(self, ids: np.ndarray, eos_id: int) -> None:
        """Appends one document's ids [n] followed by ``eos_id``."""
        doc = np.append(ids, eos_id)
        limit = np.iinfo(self._dtype).max
        if doc.size and (doc.max() > limit or doc.min() < 0):
            raise ValueError(
                f"Token id {int(doc.max())} does not fit the {np.dtype(self._dtype).name} shards "
                f"(max {limit}): the tokenizer reports a vocabulary smaller than its largest id. "
                "Pass --dtype uint32 to fogjax.data.prepare."
            )
        self.max_token_id = max(self.max_token_id, int(doc.max()))
        self._pending.append(doc.astype(self._dtype))
        self._pending_len += len(ids) + 1
        self.tokens += len(ids) + 1
        self.documents += 1
        while self._pending_len >= self._size:
            stream = np.concatenate(self._pending)
            self._write(stream[: self._size])
            self._pending, self._pending_len = [stream[self._size :]], len(stream) - self._size

    def close(self) -> None:
        """Writes what is left as the last (shorter) shard."""
        if self._pending_len:
            self._write(np.concatenate(self._pending))
        self._pending, self._pending_len = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self._split}_{len(self.shards):05d}.npy"
        np.save(self._dir / name, tokens)
        self.shards.append(name)

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "shards": self.shards,
            "max_token_id": self.max_token_id,
        }


def write_metadata(directory: Path, metadata: dict) -> None:
    """Writes ``metadata.json`` (last: its presence marks the folder complete)."""
    tmp = directory / (METADATA + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **metadata}, indent=2) + "\n")
    os.replace(tmp, directory / METADATA)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset holds.

    Attributes:
      dir: the dataset folder (for 'embedded', the cache folder it was prepared into).
      tokenizer: a spec :func:`fogjax.data.tokenizer.load_tokenizer` accepts ('bytes' or a path).
      tokenizer_source: the tokenizer as given at preparation (a description).
      eos_token: the end-of-document token string.
      vocab_size: number of token ids; the model's vocab_size must be at least this.
      eos_id: the id that ends every document.
      dtype: 'uint16' or 'uint32', the dtype of the shards (batches are int32 regardless).
      train_tokens, val_tokens: tokens per split, EOS included.
      train_documents, val_documents: documents per split.
      train_shards, val_shards: shard files per split, in stream order.
      max_token_id: the largest id in either split (recorded at preparation, or found by
        :func:`scan_max_token_id` and cached in metadata.json); None if not yet known.
    """

    dir: Path
    tokenizer: str
    tokenizer_source: str
    eos_token: str
    vocab_size: int
    eos_id: int
    dtype: str
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    train_shards: tuple[Path, ...]
    val_shards: tuple[Path, ...]
    max_token_id: int | None = None

    def shards(self, split: str) -> tuple[Path, ...]:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")
        return self.train_shards if split == "train" else self.val_shards

    def load_tokenizer(self):
        """The tokenizer the shards were written with (for decoding samples)."""
        return load_tokenizer(self.tokenizer, eos_token=self.eos_token)


def read_dataset_info(directory: str | os.PathLike) -> DatasetInfo:
    """The :class:`DatasetInfo` of a prepared dataset folder.

    Raises:
      FileNotFoundError: the folder or its metadata.json is missing.
      ValueError: metadata.json is not of a format this version reads.
    """
    directory = Path(directory).expanduser().resolve()
    meta_path = directory / METADATA
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a prepared dataset (no {METADATA}). Prepare one with "
            f"`python -m fogjax.data.prepare --input TEXT_FILES --output {directory} "
            f"--tokenizer T`, or set data.path='{EMBEDDED}'."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{meta_path} is format {meta.get('format')!r} v{meta.get('version')}, but this fogjax "
            f"reads {FORMAT!r} v{VERSION}. Prepare the data again with this version."
        )
    tok = meta["tokenizer"]
    splits = meta["splits"]
    return DatasetInfo(
        dir=directory,
        tokenizer=str(directory / tok["file"]) if tok.get("file") else tok["source"],
        tokenizer_source=tok["source"],
        eos_token=tok["eos_token"],
        vocab_size=meta["vocab_size"],
        eos_id=meta["eos_id"],
        dtype=meta["dtype"],
        train_tokens=splits["train"]["tokens"],
        val_tokens=splits["val"]["tokens"],
        train_documents=splits["train"]["documents"],
        val_documents=splits["val"]["documents"],
        train_shards=tuple(directory / s for s in splits["train"]["shards"]),
        val_shards=tuple(directory / s for s in splits["val"]["shards"]),
        max_token_id=meta.get("max_token_id"),
    )


def open_shard(path: Path) -> np.ndarray:
    """The memory-mapped 1-D token array of one shard; ValueError naming the file if it is
    missing, empty, truncated or not a 1-D .npy of unsigned ids."""
    fix = "Prepare the dataset again with python -m fogjax.data.prepare."
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ValueError(f"Shard {path} is missing. {fix}") from None
    except Exception as e:  # Zero bytes, a cut-off header or body, not a .npy at all.
        size = path.stat().st_size
        raise ValueError(
            f"Shard {path} ({size} bytes) is unreadable or truncated ({e}). {fix}"
        ) from None
    if array.ndim != 1 or array.dtype.kind != "u":
        raise ValueError(f"Shard {path} holds {array.dtype}{list(array.shape)}, not 1-D ids. {fix}")
    return array


def check_shards(info: DatasetInfo) -> None:
    """Every shard opens and the token counts add up to metadata.json's (a shard that is short
    but well-formed, e.g. rewritten by hand, is caught by the count)."""
    for split in SPLITS:
        paths = info.shards(split)
        total = sum(int(open_shard(p).shape[0]) for p in paths)
        expected = info.train_tokens if split == "train" else info.val_tokens
        if total != expected:
            raise ValueError(
                f"The {split} shards of {info.dir} hold {total} tokens but {METADATA} records "
                f"{expected}: a shard was truncated or replaced. Prepare the dataset again."
            )


def scan_max_token_id(info: DatasetInfo) -> int:
    """The largest token id in the dataset: from metadata.json, else scanned once (a pass over
    every shard) and cached there when the folder is writable."""
    if info.max_token_id is not None:
        return info.max_token_id
    largest = -1
    for split in SPLITS:
        for path in info.shards(split):
            array = open_shard(path)
            for start in range(0, array.shape[0], 1 << 24):  # Bounded memory per chunk.
                chunk = array[start : start + (1 << 24)]
                if chunk.size:
                    largest = max(largest, int(chunk.max()))
    meta_path = info.dir / METADATA
    try:
        meta = json.loads(meta_path.read_text())
        meta["max_token_id"] = largest
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, meta_path)
    except OSError:  # A read-only shared dataset: scan again next time.
        pass
    return largest
