"""The on-disk format of a prepared dataset, and reading its description.

A prepared dataset is a folder::

    metadata.json          tokenizer, vocab_size, eos_id, bos_id, dtype, token/document counts,
                           each split's shard names in stream order, each shard's tokens and
                           largest id (shard_stats)
    tokenizer.json         copy of the HF tokenizer (absent for the 'bytes' tokenizer)
    u000000_00000.npy ...  1-D token ids, uint16 if the vocabulary fits, else uint32: the shards
                           of work unit 0 (fogjax.data.prepare); ``train_00000.npy``,
                           ``val_00000.npy`` from the in-memory path (the embedded corpus)
    .shard_scan.json       each shard's size, mtime and largest id (fogjax.data.shard_scan)
    .prepare/              the preparation's ledger (fogjax.data.prepare.ledger)

Each split is one stream of documents, each ``[BOS] ids EOS``, cut into shards of at most
``shard_tokens`` tokens; metadata.json lists which shards make up which split. It is written
last, so a folder without it is incomplete.
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


def write_npy(path: Path, array: np.ndarray) -> None:
    """Writes ``array`` to ``path`` as .npy, durably and atomically: a temporary file in the same
    folder, flushed to the disk (fsync), then renamed over ``path``. A crash leaves either the
    whole file or none (a ``.<name>.tmp.<pid>`` that the next preparation discards).

    Raises:
      OSError: the write failed (a full disk: ENOSPC, or numpy's "N requested and M written");
        the temporary file is removed first.
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ShardWriter:
    """Appends documents to one token stream as ``{stem}_{i:05d}.npy`` shards of ``shard_tokens``
    ids (``stem`` is the split, 'train' or 'val', or a preparation unit's ``u000012``)."""

    def __init__(self, directory: Path, stem: str, dtype: np.dtype, shard_tokens: int):
        self._dir, self._stem, self._dtype, self._size = directory, stem, dtype, shard_tokens
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.shards: list[str] = []
        self.shard_stats: dict[str, dict[str, int]] = {}  # name -> {tokens, max_token_id}
        self.tokens = 0
        self.documents = 0
        self.max_token_id = -1

    def add_document(self, ids: np.ndarray, eos_id: int) -> None:
        """Appends one document's ids [n] followed by ``eos_id``."""
        self.add_stream(np.append(ids, eos_id), documents=1)

    def add_stream(self, stream: np.ndarray, documents: int) -> None:
        """Appends ``stream`` [n] (any integer dtype): ``documents`` whole documents, each already
        ending with EOS (and starting with BOS where there is one).

        Raises:
          ValueError: an id does not fit the shard dtype (a tokenizer whose vocab_size is smaller
            than its largest id).
        """
        limit = np.iinfo(self._dtype).max
        if stream.size and (stream.max() > limit or stream.min() < 0):
            raise ValueError(
                f"Token id {int(stream.max())} does not fit the {np.dtype(self._dtype).name} "
                f"shards (max {limit}): the tokenizer reports a vocabulary smaller than its "
                "largest id. Pass --dtype uint32 to fogjax.data.prepare."
            )
        if stream.size:
            self.max_token_id = max(self.max_token_id, int(stream.max()))
        self._pending.append(stream.astype(self._dtype))
        self._pending_len += len(stream)
        self.tokens += len(stream)
        self.documents += documents
        while self._pending_len >= self._size:
            joined = np.concatenate(self._pending)
            self._write(joined[: self._size])
            self._pending, self._pending_len = [joined[self._size :]], len(joined) - self._size

    def close(self) -> None:
        """Writes what is left as the last (shorter) shard."""
        if self._pending_len:
            self._write(np.concatenate(self._pending))
        self._pending, self._pending_len = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self._stem}_{len(self.shards):05d}.npy"
        write_npy(self._dir / name, tokens)
        self.shards.append(name)
        self.shard_stats[name] = {"tokens": len(tokens), "max_token_id": int(tokens.max())}

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "shards": self.shards,
            "max_token_id": self.max_token_id,
        }


def write_metadata(directory: Path, metadata: dict) -> None:
    """Writes ``metadata.json`` durably and atomically (last: its presence marks the folder
    complete). Concurrent writers of the same content (two hosts finalising at once) are safe."""
    text = json.dumps({"format": FORMAT, "version": VERSION, **metadata}, indent=2) + "\n"
    write_text(directory / METADATA, text)


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a per-process temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
      max_token_id: the largest id in either split as recorded at preparation (None in old
        folders). The trainer does not trust it: :mod:`fogjax.data.shard_scan` checks the shards.
      bos_id: the id that starts every document, or None (no BOS).
      shard_stats: ``{shard name: {"tokens": n, "max_token_id": m}}`` as prepared (None in old
        folders).
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
    bos_id: int | None = None
    shard_stats: dict[str, dict[str, int]] | None = dataclasses.field(default=None, compare=False)

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
      ValueError: metadata.json is damaged (not JSON, or missing a field) or of a format this
        version does not read; the message names the file and the fix.
    """
    directory = Path(directory).expanduser().resolve()
    meta_path = directory / METADATA
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a prepared dataset (no {METADATA}). Prepare one with "
            f"`python -m fogjax.data.prepare --input TEXT_FILES --output {directory} "
            f"--tokenizer T`, or set data.path='{EMBEDDED}'."
        )
    again = "Restore it from a copy, or prepare the dataset again (python -m fogjax.data.prepare)."
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is damaged: not valid JSON ({e}). {again}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta if not isinstance(meta, dict) else meta.get("format")
        version = meta.get("version") if isinstance(meta, dict) else None
        raise ValueError(
            f"{meta_path} is format {found!r} v{version}, but this fogjax "
            f"reads {FORMAT!r} v{VERSION}. Prepare the data again with this version."
        )
    try:
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
            bos_id=meta.get("bos_id"),
            shard_stats=meta.get("shard_stats"),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{meta_path} is incomplete: it has no {e} field where fogjax.data.prepare writes "
            f"one (was it edited by hand?). {again}"
        ) from None


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
    """Every shard opens and the token counts match metadata.json's, per shard where it records
    them (a shard that is short but well-formed, e.g. rewritten by hand, is caught by the count).

    Raises:
      ValueError: naming the shard (or the split) and the fix.
    """
    for split in SPLITS:
        paths = info.shards(split)
        lengths = {p: int(open_shard(p).shape[0]) for p in paths}
        for path, n in lengths.items():
            expected = (info.shard_stats or {}).get(path.name, {}).get("tokens", n)
            if n != expected:
                raise ValueError(
                    f"Shard {path} holds {n} tokens but {METADATA} records {expected}: it was "
                    "truncated or replaced after preparation. Prepare the dataset again."
                )
        expected = info.train_tokens if split == "train" else info.val_tokens
        if sum(lengths.values()) != expected:
            raise ValueError(
                f"The {split} shards of {info.dir} hold {sum(lengths.values())} tokens but "
                f"{METADATA} records {expected}: a shard was truncated or replaced. Prepare the "
                "dataset again."
            )
