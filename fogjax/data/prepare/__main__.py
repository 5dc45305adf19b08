"""``python -m fogjax.data.prepare``: the command line of :mod:`fogjax.data.prepare`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fogjax.data.prepare as prepare_lib
from fogjax.data import shards
from fogjax.data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare

_DESCRIPTION = (prepare_lib.__doc__ or "").split("\n\n")[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fogjax.data.prepare", description=_DESCRIPTION)
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text files (.txt, .jsonl, .jsonl.gz, .parquet) or folders of them",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="new dataset folder")
    parser.add_argument(
        "--tokenizer",
        default="bytes",
        metavar="T",
        help="'bytes', a tokenizer.json path, or PACKAGE:RESOURCE (default: bytes)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of text held out for validation (default: {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument(
        "--dtype",
        choices=shards.DTYPES,
        default="auto",
        help="token dtype on disk (default: uint16 if the vocabulary fits)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})",
    )
    parser.add_argument(
        "--eos-token",
        default=None,
        help="end-of-document token of a tokenizer.json (default: found by name)",
    )
    args = parser.parse_args(argv)
    try:
        info = prepare(
            args.input,
            args.output,
            args.tokenizer,
            val_fraction=args.val_fraction,
            dtype=args.dtype,
            shard_tokens=args.shard_tokens,
            eos_token=args.eos_token,
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(
        f"wrote {info.dir}: {info.train_tokens:,} train tokens "
        f"({info.train_documents:,} documents, {len(info.train_shards)} shards), "
        f"{info.val_tokens:,} validation tokens "
        f"({info.val_documents:,} documents); vocab_size {info.vocab_size}, eos_id {info.eos_id}, "
        f"{info.dtype}"
    )


if __name__ == "__main__":
    main()
