"""Tokenizers: raw UTF-8 bytes, or a Hugging Face `tokenizers` JSON file.

A tokenizer *spec* is the string a user writes (``--tokenizer`` of ``fogjax.data.prepare``):

- ``bytes``: one token per UTF-8 byte (ids 0-255) and EOS = 256; vocabulary 257. Needs no file.
- a path to a ``tokenizer.json`` (or to a folder holding one), saved by HF ``tokenizers``.
- ``PACKAGE:RESOURCE``: a ``tokenizer.json`` that ships inside an installed Python package,
  e.g. ``mypkg:assets/tokenizer.json``, found with ``importlib.resources`` (works offline).

Every tokenizer has ``encode``/``decode``, ``vocab_size`` and ``eos_id``; documents are joined with
``eos_id`` when data is prepared.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

BYTES_SPEC = "bytes"
# Special tokens tried, in order, when a tokenizer.json does not say which one ends a document.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class Tokenizer(Protocol):
    """What preparation and sampling need from a tokenizer."""

    @property
    def spec(self) -> str:
        """The spec it was loaded from, or a description if it was built in memory (trained)."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, int64 [n], without EOS."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` of each text (batched where the backend can parallelise)."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; EOS is shown as its token string."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 is EOS. Exact round trip for any text."""

    eos_token = "<|endoftext|>"

    @property
    def spec(self) -> str:
        return BYTES_SPEC

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids), dtype=np.int64)
        # Decode each EOS-separated piece on its own, so EOS never splits a multi-byte character.
        pieces = np.split(ids, np.flatnonzero(ids == self.eos_id))
        texts = [
            bytes(p[p != self.eos_id].astype(np.uint8)).decode("utf-8", "replace") for p in pieces
        ]
        return self.eos_token.join(texts)


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with a known EOS token."""

    def __init__(self, tokenizer, spec: str, eos_token: str | None = None):
        self._tok = tokenizer
        self._spec = spec
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        found = [(n, tokenizer.token_to_id(n)) for n in names]
        found = [(n, i) for n, i in found if i is not None]
        if not found:
            raise ValueError(
                f"Tokenizer {spec!r} has no end-of-document token (looked for {list(names)}). "
                "Add one as a special token to the tokenizer, or name it with --eos-token."
            )
        self.eos_token, self._eos_id = found[0]

    @property
    def spec(self) -> str:
        return self._spec

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def backend(self):
        """The wrapped ``tokenizers.Tokenizer`` (e.g. to ``save`` it)."""
        return self._tok

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _hf_from_file(path: Path, spec: str, eos_token: str | None) -> HFTokenizer:
    import tokenizers  # Imported here: the bytes tokenizer must not need it.

    return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), spec, eos_token)


def _package_resource(spec: str) -> Path | None:
    """The file named by ``PACKAGE:RESOURCE`` if PACKAGE is installed, else None."""
    package, _, resource = spec.partition(":")
    if not package or not resource or not package.replace(".", "").replace("_", "").isalnum():
        return None
    try:
        if importlib.util.find_spec(package) is None:
            return None
    except ModuleNotFoundError:  # A parent package of a dotted name is missing.
        return None
    path = Path(str(importlib.resources.files(package).joinpath(resource)))
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"Package {package!r} is installed but has no tokenizer file {resource!r} ({path}). "
            f"List the files under {path.parent} and pass the right PACKAGE:RESOURCE."
        )
    return path


def load_tokenizer(spec: str, *, eos_token: str | None = None) -> Tokenizer:
    """The tokenizer named by ``spec`` (see the module docstring for the three forms).

    Args:
      spec: ``'bytes'``, a path to a tokenizer.json (or its folder), or ``PACKAGE:RESOURCE``.
      eos_token: the end-of-document token of a tokenizer.json; found among common names if None.

    Raises:
      FileNotFoundError: ``spec`` names no file and no installed package resource.
      ValueError: the tokenizer has no end-of-document token.
    """
    spec = os.fspath(spec)
    if spec == BYTES_SPEC:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return _hf_from_file(path, str(path.resolve()), eos_token)
    resource = _package_resource(spec)
    if resource is not None:
        return _hf_from_file(resource, spec, eos_token)
    raise FileNotFoundError(
        f"Tokenizer {spec!r} not found. Pass 'bytes', a path to a tokenizer.json saved by the "
        "Hugging Face `tokenizers` library, or PACKAGE:RESOURCE for one inside an installed "
        "package."
    )


def train_byte_level_bpe(texts: Sequence[str], vocab_size: int, eos_token: str) -> HFTokenizer:
    """A byte-level BPE tokenizer trained on ``texts``; ``eos_token`` gets id 0.

    Deterministic for the same texts (checked across processes and hash seeds), and decodes any
    encoded text back exactly: the byte-level alphabet covers every byte, nothing is normalised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    spec = f"byte-level BPE, {vocab_size} tokens, trained on {len(texts)} documents"
    return HFTokenizer(tok, spec=spec, eos_token=eos_token)
