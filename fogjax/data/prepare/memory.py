"""Documents held in memory -> a dataset folder, in one process (the embedded corpus, tests).

The command line's path for files on disk (parallel, resumable, multi-host) is
:mod:`fogjax.data.prepare`; this one keeps the earlier validation rule, a share of characters
(:class:`ValidationSplit`), so the embedded corpus stays bit-identical.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tqdm

from fogjax.data import shard_scan, shards
from fogjax.data.tokenizer import HFTokenizer, Tokenizer

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB of uint16 per shard: few files, each cheap to memory-map.
_ENCODE_BATCH = 256  # Documents per encode_batch call (HF tokenizers parallelise within a batch).


class ValidationSplit:
    """Decides, one document at a time, whether it is held out for validation.

    A document is held out when adding it keeps the held-out share of characters at or below
    ``fraction``. Deterministic, needs no pass over the data first, spreads the held-out documents
    through the corpus, and follows the fraction in characters even when document sizes are skewed
    (a count of documents would not). The first document always trains.
    """

    def __init__(self, fraction: float):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1), got {fraction}; 0 writes no validation split."
            )
        self.fraction = fraction
        self._total = 0
        self._held_out = 0

    def is_validation(self, text: str) -> bool:
        self._total += len(text)
        if self._held_out + len(text) <= self.fraction * self._total:
            self._held_out += len(text)
            return True
        return False


def prepare_documents(
    docs: Iterable[str],
    output: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    dtype: str = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    sources: Sequence[str] = (),
) -> shards.DatasetInfo:
    """Tokenises ``docs`` into a dataset folder at ``output`` (created; must be new or empty).

    Args:
      docs: document texts, in corpus order (empty ones are skipped).
      output: the dataset folder.
      tokenizer: the tokenizer; a Hugging Face one is saved as ``output/tokenizer.json``.
      val_fraction: share of characters held out as whole documents (see :class:`ValidationSplit`).
      dtype: 'auto' (uint16 when the vocabulary fits, else uint32), 'uint16' or 'uint32'.
      shard_tokens: tokens per shard file.
      progress: show a tqdm bar (only on a terminal).
      sources: input names recorded in metadata.json.

    Raises:
      ValueError: the vocabulary does not fit ``dtype``; no document was given; ``output``
        is not a new or empty folder; or ``val_fraction`` > 0 but the corpus is too small to
        hold out a whole document.
    """
    output = Path(output).expanduser()
    np_dtype = shards.token_dtype(tokenizer.vocab_size, dtype)
    split = ValidationSplit(val_fraction)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}.")
    existed = output.exists()
    if existed and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(
            f"Output {str(output)!r} exists and is not an empty folder. Choose a new one."
        )
    output.mkdir(parents=True, exist_ok=True)
    try:
        _write_splits(docs, output, tokenizer, split, np_dtype, shard_tokens, progress, sources)
    except BaseException:
        # Never leave a half-written dataset, but never delete a folder the caller made: what is
        # inside is ours (it was empty).
        for child in output.iterdir() if existed else ():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        if not existed:
            shutil.rmtree(output, ignore_errors=True)
        raise
    return shards.read_dataset_info(output)


def _names(sources: Sequence[str]) -> str:
    if not sources:
        return "the documents"
    more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
    return ", ".join(sources[:3]) + more


def _write_splits(
    docs: Iterable[str],
    output: Path,
    tokenizer: Tokenizer,
    split: ValidationSplit,
    dtype: np.dtype,
    shard_tokens: int,
    progress: bool,
    sources: Sequence[str],
) -> None:
    writers = {s: shards.ShardWriter(output, s, dtype, shard_tokens) for s in shards.SPLITS}
    bar = tqdm.tqdm(
        desc="tokenising", unit="doc", disable=None if progress else True, mininterval=1
    )
    docs = (d for d in docs if d)  # An empty document would only add a lone EOS.
    with bar:
        while batch := list(itertools.islice(docs, _ENCODE_BATCH)):
            for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
                name = "val" if split.is_validation(text) else "train"
                writers[name].add_document(ids, tokenizer.eos_id)
            bar.update(len(batch))
            bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens, refresh=False)
    for w in writers.values():
        w.close()
    if writers["train"].documents == 0:
        raise ValueError(f"No text found in {_names(sources)}: every document is empty.")
    if split.fraction > 0 and writers["val"].documents == 0:
        raise ValueError(
            f"val_fraction {split.fraction} held out no document: the corpus has "
            f"{writers['train'].documents} document(s) and none is small enough. Give more, "
            "smaller documents, raise val_fraction, or pass val_fraction=0."
        )
    tokenizer_meta = {"source": tokenizer.spec, "file": None}
    tokenizer_meta["eos_token"] = getattr(tokenizer, "eos_token", None)
    if isinstance(tokenizer, HFTokenizer):
        # A copy makes the folder self-contained: decoding never depends on the original file.
        tokenizer.backend.save(str(output / shards.TOKENIZER_FILE))
        tokenizer_meta["file"] = shards.TOKENIZER_FILE
    stats = {name: st for w in writers.values() for name, st in w.shard_stats.items()}
    shard_scan.record(output, {name: st["max_token_id"] for name, st in stats.items()})
    shards.write_metadata(
        output,
        {
            "tokenizer": tokenizer_meta,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "val_fraction": split.fraction,
            "splits": {s: w.summary() for s, w in writers.items()},
            "max_token_id": max(w.max_token_id for w in writers.values()),
            "shard_stats": stats,
            "sources": list(sources),
        },
    )
