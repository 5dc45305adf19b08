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
# Tried, in order, for ``--bos yes`` when the tokenizer's post-processor adds no BOS of its own.
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[BOS]", "<|startoftext|>")
BOS_POLICIES = ("auto", "yes", "no")


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

    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any unreadable file.
        raise ValueError(
            f"Tokenizer file {path} cannot be read ({e}). It must be a tokenizer.json saved by "
            "the Hugging Face `tokenizers` library (tokenizer.save(...)); download or save it "
            "again."
        ) from None
    return HFTokenizer(backend, spec, eos_token)


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


def tokenizer_file(spec: str | os.PathLike) -> Path | None:
    """The tokenizer.json that ``spec`` names (None for 'bytes').

    Raises:
      FileNotFoundError: ``spec`` names no file and no installed package resource.
    """
    spec = os.fspath(spec)
    if spec == BYTES_SPEC:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return path.resolve()
    resource = _package_resource(spec)
    if resource is not None:
        return resource
    raise FileNotFoundError(
        f"Tokenizer {spec!r} not found. Pass 'bytes', a path to a tokenizer.json saved by the "
        "Hugging Face `tokenizers` library, or PACKAGE:RESOURCE for one inside an installed "
        "package."
    )


def load_tokenizer(spec: str, *, eos_token: str | None = None) -> Tokenizer:
    """The tokenizer named by ``spec`` (see the module docstring for the three forms).

    Args:
      spec: ``'bytes'``, a path to a tokenizer.json (or its folder), or ``PACKAGE:RESOURCE``.
      eos_token: the end-of-document token of a tokenizer.json; found among common names if None.

    Raises:
      FileNotFoundError: ``spec`` names no file and no installed package resource.
      ValueError: the file is not a readable tokenizer.json, or has no end-of-document token.
    """
    path = tokenizer_file(spec)
    if path is None:
        return ByteTokenizer()
    local = Path(os.fspath(spec)).expanduser()
    # A file keeps its resolved path as spec; a package resource keeps PACKAGE:RESOURCE.
    name = str(path) if local.exists() else os.fspath(spec)
    return _hf_from_file(path, name, eos_token)


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


def bos_id(tokenizer: Tokenizer, policy: str = "auto", bos_token: str | None = None) -> int | None:
    """The id to put before every document, or None.

    Args:
      policy: 'auto' (what the tokenizer's own post-processor adds: Llama 3's tokenizer.json adds
        <|begin_of_text|>, GPT-2's adds nothing), 'yes' (that token, else ``bos_token`` or the
        first of :data:`BOS_CANDIDATES` the vocabulary has) or 'no'.
      bos_token: the token to use for 'yes' (overrides the post-processor's).

    Raises:
      ValueError: an unknown policy, or 'yes' with no BOS token to be found.
    """
    if policy not in BOS_POLICIES:
        raise ValueError(f"--bos {policy!r}: choose one of {list(BOS_POLICIES)}.")
    if policy == "no":
        return None
    if not isinstance(tokenizer, HFTokenizer):
        if policy == "yes":
            raise ValueError(
                f"--bos yes: the {tokenizer.spec!r} tokenizer has no BOS token. Use a "
                "tokenizer.json that has one, or drop --bos yes."
            )
        return None
    backend = tokenizer.backend
    if bos_token is not None:
        found = backend.token_to_id(bos_token)
        if found is None:
            raise ValueError(
                f"--bos-token {bos_token!r} is not in the vocabulary of {tokenizer.spec}; name "
                "one of its special tokens."
            )
        return found if policy == "yes" else None
    # What the post-processor puts before a text: one id in front of the plain encoding.
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    lead = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []
    if len(lead) == 1:
        return lead[0]
    if policy == "auto":
        return None
    for name in BOS_CANDIDATES:
        if (found := backend.token_to_id(name)) is not None:
            return found
    raise ValueError(
        f"--bos yes: {tokenizer.spec} adds no BOS and has none of {list(BOS_CANDIDATES)}. Name "
        "its BOS with --bos-token, or drop --bos yes."
    )


def for_documents(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` set up to encode corpus documents: the text of a special token inside a
    document (a web page quoting "<|endoftext|>") is encoded as ordinary text, so only the EOS
    and BOS that preparation adds ever mark a document boundary (``data.document_mask`` and the
    validation cut rely on it). Changes the tokenizer in place; returns it."""
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.backend.encode_special_tokens = True
    return tokenizer
