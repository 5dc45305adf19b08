"""The run's tokenizer as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json).

A dataset prepared with a ``tokenizer.json`` (fogjax.data.prepare --tokenizer PATH, or the
embedded corpus's BPE) exports that file as it is. The byte tokenizer (ids 0-255 = UTF-8 bytes,
256 = EOS) has no file; :func:`byte_tokenizer` builds its exact equivalent in the ``tokenizers``
library: a byte-level BPE with no merges whose id for byte b is b, and EOS as the special token
256. (One difference: a literal "<|endoftext|>" in a text encodes to EOS there, to 13 bytes in
fogjax's ByteTokenizer.)

fogjax packs documents one after another, each followed by EOS, and has no BOS token: the token
before every training document is the previous one's EOS. So EOS is also the BOS token here, and
nothing is prepended when encoding (as fogjax's own harness model does).
"""

from __future__ import annotations

from typing import Any

from fogjax.data.tokenizer import BYTES_SPEC, ByteTokenizer, HFTokenizer, Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of ``tokenizers``' ByteLevel."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(eos_token: str) -> Any:
    """A ``tokenizers.Tokenizer`` equal to fogjax's ByteTokenizer (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: every byte of the text becomes its own token, in order.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
    assert tok.token_to_id(eos_token) == 256, "EOS must follow the 256 bytes"
    return tok


def backend_of(tokenizer: Tokenizer) -> Any:
    """The ``tokenizers.Tokenizer`` of a fogjax tokenizer (the byte tokenizer's equivalent)."""
    if isinstance(tokenizer, ByteTokenizer) or tokenizer.spec == BYTES_SPEC:
        return byte_tokenizer(ByteTokenizer.eos_token)
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.backend
    raise ValueError(f"Cannot export tokenizer {tokenizer.spec!r} as Hugging Face files.")


def write_tokenizer(tokenizer: Tokenizer, directory: str, seq_len: int) -> list[str]:
    """Writes the tokenizer files of ``tokenizer`` into ``directory``; returns their names."""
    import os

    from transformers import PreTrainedTokenizerFast  # requirements-export.txt

    eos = tokenizer.eos_token if isinstance(tokenizer, HFTokenizer) else ByteTokenizer.eos_token
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend_of(tokenizer),
        eos_token=eos,
        bos_token=eos,
        model_max_length=seq_len,
        clean_up_tokenization_spaces=False,
    )
    before = set(os.listdir(directory))
    hf.save_pretrained(directory)
    return sorted(set(os.listdir(directory)) - before)
