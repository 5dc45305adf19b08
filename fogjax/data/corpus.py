"""The embedded corpus: Python's own documentation and sources, prepared on first use and cached.

Every Python installation ships ``pydoc_data.topics.topics``, the text of ``help('TOPIC')`` (about
80 documents, ~465k characters of English prose with code), and the standard library's own
modules. The corpus is the topics followed by the top-level ``.py`` modules of the standard
library in name order, until :data:`CORPUS_CHARS` characters (about 0.9M BPE tokens): large
enough that the default run (300 steps of 16 x 128 tokens) sees each training token at most
once, so its eval loss measures generalisation, not memorisation. Nothing is downloaded. On
first use the documents are split (10% of the characters held out), a byte-level BPE of 4096
tokens (the tiny model's vocab_size) is trained on the train documents in a few seconds, and
both splits are written to the cache.

The cache folder is ``$FOGJAX_CACHE`` (default ``~/.cache/fogjax``)``/embedded-<tokenizer>-<hash>``,
the hash covering the corpus text and every setting, so another Python version (other topics) or
another setting gets its own folder. It is written to a temporary folder and renamed into place:
a crash never leaves a half cache, and when processes race, the first rename wins and the others
use its (identical) result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from fogjax.data import prepare, shards
from fogjax.data.cache import cache_root
from fogjax.data.tokenizer import BYTES_SPEC, ByteTokenizer, train_byte_level_bpe

TOKENIZERS = ("bpe", BYTES_SPEC)
DEFAULT_TOKENIZER = "bpe"
BPE_VOCAB_SIZE = 4096  # The tiny config's model.vocab_size.
EOS_TOKEN = "<|endoftext|>"
# Larger than the usual 5%: the corpus is small, and 10% (~11k tokens) fills the tiny config's
# evaluation (4 batches x 16 sequences x 129 tokens) without repeating a window.
VAL_FRACTION = 0.1
_CACHE_VERSION = 2  # Bump when preparation changes in a way the hash below does not see.
# Corpus size in characters: the default run's 614k training tokens fit in its train split.
CORPUS_CHARS = 3_000_000


def documents() -> list[str]:
    """The corpus: one document per pydoc topic (sorted by name), then one per standard-library
    module (sorted by file name) until :data:`CORPUS_CHARS` characters. Deterministic for a
    given Python installation."""
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics) if topics[name]]
    total = sum(map(len, docs))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        if total >= CORPUS_CHARS:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(text)
            total += len(text)
    return docs


def _fingerprint(docs: list[str], tokenizer: str) -> str:
    h = hashlib.sha256()
    settings = [_CACHE_VERSION, shards.VERSION, tokenizer, BPE_VOCAB_SIZE, EOS_TOKEN, VAL_FRACTION]
    h.update(json.dumps(settings).encode())
    for doc in docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build(docs: list[str], tokenizer: str, output: Path) -> None:
    """Prepares ``docs`` into ``output`` (a new folder) with the named tokenizer."""
    if tokenizer == "bpe":
        # The tokenizer sees the train documents only, so validation loss is a fair held-out number.
        split = prepare.ValidationSplit(VAL_FRACTION)
        train_docs = [d for d in docs if not split.is_validation(d)]
        tok = train_byte_level_bpe(train_docs, BPE_VOCAB_SIZE, EOS_TOKEN)
    else:
        tok = ByteTokenizer()
    prepare.prepare_documents(
        docs,
        output,
        tok,
        val_fraction=VAL_FRACTION,
        progress=False,
        sources=["pydoc_data.topics (Python documentation)", "the standard library's *.py"],
    )


def embedded_dataset_dir(tokenizer: str = DEFAULT_TOKENIZER) -> Path:
    """The prepared embedded corpus, built into the cache on first use; later calls only look.

    Args:
      tokenizer: 'bpe' (byte-level BPE, vocabulary 4096) or 'bytes' (vocabulary 257).
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(
            f"Unknown embedded tokenizer {tokenizer!r}; use data.path='embedded' (BPE) or "
            f"'embedded:{BYTES_SPEC}'."
        )
    docs = documents()
    root = cache_root()
    final = root / f"embedded-{tokenizer}-{_fingerprint(docs, tokenizer)}"
    if (final / shards.METADATA).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        _build(docs, tokenizer, tmp / "data")
        try:
            os.rename(tmp / "data", final)
        except OSError:
            # Another process renamed its copy into place first; it is identical, so use it.
            if not (final / shards.METADATA).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
