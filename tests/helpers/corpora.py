"""Small corpora on disk for the preparation tests: .jsonl(.gz) and .parquet files, a tiny
tokenizer.json trained offline, and comparing two prepared folders bit for bit."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fogjax.data import shards
from fogjax.data.tokenizer import train_byte_level_bpe

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "while", "seven", "wise")


def text(seed: int, words: int) -> str:
    """A deterministic pseudo-sentence of ``words`` words."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words)) + "."


def write_jsonl(path: Path, records: list[dict], gz: bool | None = None) -> Path:
    gz = path.name.endswith(".gz") if gz is None else gz
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int = 4) -> Path:
    columns = {k: [r[k] for r in records] for k in records[0]}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def tokenizer_json(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on the WORDS, saved as a tokenizer.json (EOS <|endoftext|> = 0)."""
    texts = [text(i, 50) for i in range(50)]
    train_byte_level_bpe(texts, vocab_size, "<|endoftext|>").backend.save(str(path))
    return path


def stream(info: shards.DatasetInfo, split: str) -> np.ndarray:
    """A split's tokens, its shards concatenated in order."""
    parts = [np.load(p) for p in info.shards(split)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def documents(info: shards.DatasetInfo, split: str) -> list[np.ndarray]:
    """A split's documents (ids without their EOS)."""
    s = stream(info, split)
    return [p[:-1] for p in np.split(s, np.flatnonzero(s == info.eos_id) + 1)[:-1]]


def assert_same_dataset(a: Path, b: Path) -> None:
    """Two prepared folders hold the same metadata.json and the same shard files, bit for bit."""
    assert (a / shards.METADATA).read_bytes() == (b / shards.METADATA).read_bytes()
    info = shards.read_dataset_info(a)
    for split in shards.SPLITS:
        for path in info.shards(split):
            assert path.read_bytes() == (b / path.name).read_bytes(), path.name
