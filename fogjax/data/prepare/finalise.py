"""Finalising a preparation: the validation cut and metadata.json, once every unit is done.

The validation split is the first documents of the corpus, in input order, until it holds at
least ``val_tokens`` tokens (whole documents: the last one may overshoot); the training split is
the rest. The units' shards are used where they lie: those before the cut list under ``val``,
those after under ``train``, and only the one shard the cut falls inside is rewritten as two
(``u000003_00001a.npy`` for validation, ``...b.npy`` for training; the original is deleted once
metadata.json is written). Every EOS ends a document (preparation encodes the text of special
tokens as ordinary text), so the cut finds document ends in the token stream.

Any process may finalise, any number of times: it takes the ``finalise`` claim, and does nothing
if metadata.json exists. Every file it writes is a function of the finished units alone, so two
hosts finalising at once write the same bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fogjax.data import shard_scan, shards
from fogjax.data.prepare.ledger import Ledger
from fogjax.data.prepare.plan import Unit
from fogjax.data.tokenizer import Tokenizer

DEFAULT_VAL_CAP = 50_000_000  # Tokens: evaluation reads 20 x 512 x 4097 = 42M at the 8B size.
DEFAULT_VAL_SHARE = 20  # Without --val-tokens, at most 1/20 (5%) of a small corpus.


def val_target(val_tokens: int | None, total: int) -> int:
    """Tokens the validation split should hold: ``val_tokens``, or by default the smaller of
    :data:`DEFAULT_VAL_CAP` and 5% of the corpus."""
    if val_tokens is not None:
        return val_tokens
    return min(DEFAULT_VAL_CAP, total // DEFAULT_VAL_SHARE)


def _unit_stream(output: Path, record: dict[str, Any]) -> np.ndarray:
    return np.concatenate([np.load(output / s["name"]) for s in record["shards"]])


def _cut(output: Path, record: dict[str, Any], eos_id: int, need: int) -> tuple[int, int]:
    """(tokens, documents) of the unit's leading documents until they hold >= ``need`` tokens."""
    stream = _unit_stream(output, record)
    ends = np.flatnonzero(stream == eos_id) + 1
    j = int(np.searchsorted(ends, need))  # The first document end at or past ``need``.
    if j >= len(ends):
        return len(stream), len(ends)
    return int(ends[j]), j + 1


class _Split:
    """One split's shards, counts and per-shard stats, as listed in metadata.json."""

    def __init__(self) -> None:
        self.shards: list[str] = []
        self.tokens = 0
        self.documents = 0
        self.stats: dict[str, dict[str, int]] = {}

    def add(self, name: str, stats: dict[str, int]) -> None:
        self.shards.append(name)
        self.tokens += stats["tokens"]
        self.stats[name] = {"tokens": stats["tokens"], "max_token_id": stats["max_token_id"]}

    def summary(self) -> dict[str, Any]:
        largest = max((s["max_token_id"] for s in self.stats.values()), default=-1)
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "shards": self.shards,
            "max_token_id": largest,
        }


def _split_shard(output: Path, name: str, at: int) -> list[tuple[str, dict[str, int]]]:
    """Writes shard ``name`` as ``<stem>a.npy`` [:at] and ``<stem>b.npy`` [at:]."""
    tokens = np.load(output / name)
    out = []
    for suffix, part in (("a", tokens[:at]), ("b", tokens[at:])):
        piece = name.removesuffix(".npy") + f"{suffix}.npy"
        shards.write_npy(output / piece, part)
        out.append((piece, {"tokens": len(part), "max_token_id": int(part.max())}))
    return out


def finalise(
    output: Path,
    ledger: Ledger,
    units: Sequence[Unit],
    settings: dict[str, Any],
    tokenizer: Tokenizer,
    tokenizer_path: Path | None,
    sources: Sequence[str],
) -> shards.DatasetInfo:
    """Writes metadata.json (and the tokenizer's copy) once every unit is finished.

    Raises:
      ValueError: a unit is not finished; the corpus holds no document; or ``--val-tokens``
        leaves no training document. Each names the fix.
    """
    with ledger.claim("finalise", wait=True):
        if (output / shards.METADATA).is_file():
            return shards.read_dataset_info(output)
        records = [ledger.record(u.index) for u in units]
        missing = [u for u, r in zip(units, records, strict=True) if r is None]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(units)} units are not finished (unit "
                f"{missing[0].index}: {missing[0].describe()}). Run the preparation for every "
                "--host-index first."
            )
        return _write(output, records, settings, tokenizer, tokenizer_path, sources)


def _write(
    output: Path,
    records: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    tokenizer: Tokenizer,
    tokenizer_path: Path | None,
    sources: Sequence[str],
) -> shards.DatasetInfo:
    total = sum(r["tokens"] for r in records)
    documents = sum(r["documents"] for r in records)
    filtered = sum(r["filtered"] for r in records)
    if documents == 0:
        more = f" ({filtered} documents removed by --filter)" if filtered else ""
        raise ValueError(
            f"No text found in {len(sources)} input file(s){more}. Check --text-field names "
            "the field holding the text and that --filter keeps some documents."
        )
    target = val_target(settings["val_tokens"], total)
    val, train = _Split(), _Split()
    replaced: list[str] = []
    for record in records:
        need = target - val.tokens
        if need <= 0:
            cut_tokens, cut_docs = 0, 0
        elif record["tokens"] < need:
            cut_tokens, cut_docs = record["tokens"], record["documents"]
        else:
            cut_tokens, cut_docs = _cut(output, record, tokenizer.eos_id, need)
        val.documents += cut_docs
        train.documents += record["documents"] - cut_docs
        offset = 0
        for s in record["shards"]:
            start, stop = offset, offset + s["tokens"]
            offset = stop
            if stop <= cut_tokens:
                val.add(s["name"], s)
            elif start >= cut_tokens:
                train.add(s["name"], s)
            else:
                (a, a_stats), (b, b_stats) = _split_shard(output, s["name"], cut_tokens - start)
                val.add(a, a_stats)
                train.add(b, b_stats)
                replaced.append(s["name"])
    if train.documents == 0:
        raise ValueError(
            f"--val-tokens {target} leaves no training document: the corpus holds {total} tokens "
            f"in {documents} document(s). Pass a smaller --val-tokens (0 for no validation "
            "split)."
        )
    tokenizer_meta = {
        "source": settings["tokenizer"],
        "file": None,
        "eos_token": getattr(tokenizer, "eos_token", None),
        "sha256": settings["tokenizer_sha256"],
    }
    if tokenizer_path is not None:
        # A copy of the very file makes the folder self-contained.
        tmp = output / f".{shards.TOKENIZER_FILE}.tmp"
        shutil.copyfile(tokenizer_path, tmp)
        tmp.replace(output / shards.TOKENIZER_FILE)
        tokenizer_meta["file"] = shards.TOKENIZER_FILE
    stats = {**val.stats, **train.stats}
    shard_scan.record(output, {name: s["max_token_id"] for name, s in stats.items()})
    shards.write_metadata(
        output,
        {
            "tokenizer": tokenizer_meta,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "bos_id": settings["bos_id"],
            "dtype": settings["dtype"],
            "val_tokens": target,
            "text_field": settings["text_field"],
            "filters": settings["filters"],
            "documents_filtered": filtered,
            "documents_empty": sum(r["empty"] for r in records),
            "splits": {"train": train.summary(), "val": val.summary()},
            "max_token_id": max(s["max_token_id"] for s in stats.values()),
            "shard_stats": stats,
            "sources": list(sources),
        },
    )
    for name in replaced:  # Now held as its two halves.
        (output / name).unlink(missing_ok=True)
    return shards.read_dataset_info(output)
