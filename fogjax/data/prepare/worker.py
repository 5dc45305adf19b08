"""Tokenising one unit of input into its own shards (what each worker process does).

The documents of a unit, in input order, each become ``[BOS] ids EOS`` (BOS only where the
settings say); the unit's token stream is cut into ``<output>/u000012_00000.npy, ...`` of
``shard_tokens`` ids each, written durably (fsync, rename), and then the unit's record is
written to the ledger. The result depends only on the unit and the settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fogjax.data import shards
from fogjax.data.prepare.filters import parse_filter
from fogjax.data.prepare.ledger import Ledger
from fogjax.data.prepare.plan import Unit, file_sha256
from fogjax.data.prepare.reading import read_piece
from fogjax.data.tokenizer import for_documents, load_tokenizer

# (input bytes, documents, tokens) done since the last call; may raise to stop the worker.
Report = Callable[[int, int, int], None]


@dataclasses.dataclass(frozen=True)
class Job:
    """What every unit of one preparation needs (picklable, sent to the worker processes)."""

    output: str
    tokenizer: str
    tokenizer_sha256: str | None
    eos_token: str | None
    bos_id: int | None
    text_field: str
    filters: tuple[str, ...]
    dtype: str
    shard_tokens: int


class OutputError(ValueError):
    """Writing the output failed (a full disk, a quota, permissions); names the file and fix."""


def pack(encoded: Sequence[np.ndarray], bos_id: int | None, eos_id: int) -> np.ndarray:
    """int64 [sum(n_i) + k * len(encoded)]: each document's ids [n_i] as ``[BOS] ids EOS``
    (k = 2 with BOS, else 1), in order, built with a few vectorised copies per batch."""
    n = len(encoded)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    lead = 0 if bos_id is None else 1
    extra = lead + 1
    flat = np.concatenate(encoded).astype(np.int64, copy=False) if n else np.zeros(0, np.int64)
    out = np.empty(int(lengths.sum()) + extra * n, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + extra)[:-1]]).astype(np.int64)
    # Token j of the batch (in document d) lands at j + d * extra + lead.
    out[np.arange(flat.size) + extra * np.repeat(np.arange(n), lengths) + lead] = flat
    out[starts + lead + lengths] = eos_id
    if bos_id is not None:
        out[starts] = bos_id
    return out


class UnitWorker:
    """Prepares units of one :class:`Job` (the tokenizer is loaded once per process)."""

    def __init__(self, job: Job):
        self.job = job
        if job.tokenizer_sha256 and file_sha256(job.tokenizer) != job.tokenizer_sha256:
            raise ValueError(
                f"Tokenizer file {job.tokenizer} changed since this preparation started. Put the "
                "original back, or prepare into a new --output."
            )
        self.tokenizer = for_documents(load_tokenizer(job.tokenizer, eos_token=job.eos_token))
        self.filters = [parse_filter(f) for f in job.filters]
        self.dtype = np.dtype(job.dtype)
        self.output = Path(job.output)
        self.ledger = Ledger(self.output)

    def run(self, unit: Unit, report: Report) -> dict[str, Any] | None:
        """Prepares ``unit`` unless it is finished or claimed by another live process (then
        None). Returns the unit's record.

        Raises:
          InputError: the input cannot be read (names the file and the fix).
          OutputError: a shard cannot be written (names the file and the fix).
        """
        with self.ledger.claim(unit.name) as claim:
            if not claim.held:
                return None
            record = self.ledger.record(unit.index)
            if record is not None:
                return record
            try:
                if claim.resumed:
                    self.ledger.discard_partial(unit.name)  # A killed worker's leftovers.
                record = self._tokenise(unit, report)
                self.ledger.write_record(unit.index, record)
            except OSError as e:  # Reading errors are InputErrors by now: this is the output.
                raise OutputError(
                    f"Writing {unit.name} into {self.output} failed: {e}. Free disk space (or "
                    "raise the quota) and run the same command again: finished units are kept."
                ) from None
            return record

    def _tokenise(self, unit: Unit, report: Report) -> dict[str, Any]:
        job, tok = self.job, self.tokenizer
        writer = shards.ShardWriter(self.output, unit.name, self.dtype, job.shard_tokens)
        filtered = empty = 0
        for piece in unit.pieces:
            position = 0
            for batch in read_piece(piece, job.text_field, self.filters):
                stream = pack(tok.encode_batch(batch.texts), job.bos_id, tok.eos_id)
                writer.add_stream(stream, len(batch.texts))
                filtered, empty = filtered + batch.filtered, empty + batch.empty
                report(batch.position - position, len(batch.texts), len(stream))
                position = batch.position
        writer.close()
        return {
            "unit": unit.index,
            "tokens": writer.tokens,
            "documents": writer.documents,
            "filtered": filtered,
            "empty": empty,
            "shards": [{"name": n, **writer.shard_stats[n]} for n in writer.shards],
        }
