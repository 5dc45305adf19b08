"""``python -m fogjax.data.prepare``: the command line of :mod:`fogjax.data.prepare`.

Exit codes: 0 done (this host's part, or everything); 2 a bad input, setting or output (the
message names the file or flag and the fix); 1 a worker died or failed; 130 Ctrl-C and 143
SIGTERM (finished units are kept: run the same command again to continue).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence

import fogjax.data.prepare as prepare_lib
from fogjax.data import shards
from fogjax.data.prepare import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_UNIT_BYTES,
    WorkerFailed,
    default_workers,
    prepare,
)
from fogjax.data.tokenizer import BOS_POLICIES

_DESCRIPTION = (prepare_lib.__doc__ or "").split("\n\n")[0]


class _Terminated(Exception):
    """SIGTERM (scancel, a job's time limit), raised in the main thread like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def hosts_from_env(
    num_hosts: int | None, host_index: int | None, env: Mapping[str, str]
) -> tuple[int, int]:
    """(--num-hosts, --host-index), each from a SLURM job array when not given."""
    if num_hosts is None:
        num_hosts = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if host_index is None:
        task = int(env.get("SLURM_ARRAY_TASK_ID", 0))
        host_index = task - int(env.get("SLURM_ARRAY_TASK_MIN", 0))  # Arrays may start at 1.
    return num_hosts, host_index


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fogjax.data.prepare", description=_DESCRIPTION)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text files (.txt, .jsonl, .jsonl.gz, .parquet) or folders of them",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="dataset folder: new, empty, or one to continue",
    )
    p.add_argument(
        "--tokenizer",
        default="bytes",
        metavar="T",
        help="'bytes', a tokenizer.json path, or PACKAGE:RESOURCE (default: bytes)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: the cores available, here "
        f"{default_workers()}; 0 tokenises in the main process)",
    )
    p.add_argument(
        "--num-hosts",
        type=int,
        default=None,
        metavar="H",
        help="hosts sharing the input (default: SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    p.add_argument(
        "--host-index",
        type=int,
        default=None,
        metavar="I",
        help="this host, 0..H-1 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)",
    )
    p.add_argument(
        "--val-tokens",
        type=int,
        default=None,
        metavar="N",
        help="validation tokens, the first documents of the corpus (default: 5%% "
        "of the corpus, at most 50M; 0: none)",
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="the .jsonl field / .parquet column holding the text (default: text)",
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="EXPR",
        dest="filters",
        help="keep documents whose field compares true, e.g. 'int_score>=3' "
        "(repeat: all must hold)",
    )
    p.add_argument(
        "--bos",
        choices=BOS_POLICIES,
        default="auto",
        help="BOS before every document: auto (as the tokenizer adds it; Llama 3 "
        "does), yes, no (default: auto)",
    )
    p.add_argument("--bos-token", default=None, help="the BOS token for --bos yes")
    p.add_argument(
        "--eos-token",
        default=None,
        help="end-of-document token of a tokenizer.json (default: found by name)",
    )
    p.add_argument(
        "--dtype",
        choices=shards.DTYPES,
        default="auto",
        help="token dtype on disk (default: uint16 if the vocabulary fits)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file, at most (default: {DEFAULT_SHARD_TOKENS})",
    )
    p.add_argument(
        "--unit-bytes",
        type=int,
        default=DEFAULT_UNIT_BYTES,
        help=f"input bytes per work unit (default: {DEFAULT_UNIT_BYTES})",
    )
    p.add_argument(
        "--log-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal",
    )
    return p  # fmt: skip


def _summary(result: prepare_lib.Result, output: str, host: str) -> str:
    info = result.info
    if info is None:
        return (
            f"{host}: its {result.host_units} units are done ({result.prepared} now); "
            f"{result.pending} of {result.units} units are still pending on other hosts. The "
            f"last host to finish writes {output}/{shards.METADATA}; or run this command again "
            "once they are done."
        )
    return (
        f"wrote {info.dir}: {info.train_tokens:,} train tokens "
        f"({info.train_documents:,} documents, {len(info.train_shards)} shards), "
        f"{info.val_tokens:,} validation tokens ({info.val_documents:,} documents); "
        f"vocab_size {info.vocab_size}, eos_id {info.eos_id}, bos_id {info.bos_id}, {info.dtype}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    workers = default_workers() if args.workers is None else args.workers
    num_hosts, host_index = hosts_from_env(args.num_hosts, args.host_index, os.environ)
    host = f"host {host_index} of {num_hosts}"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = prepare(
            args.input,
            args.output,
            args.tokenizer,
            workers=workers,
            num_hosts=num_hosts,
            host_index=host_index,
            val_tokens=args.val_tokens,
            text_field=args.text_field,
            filters=args.filters,
            bos=args.bos,
            bos_token=args.bos_token,
            eos_token=args.eos_token,
            dtype=args.dtype,
            shard_tokens=args.shard_tokens,
            unit_bytes=args.unit_bytes,
            progress_every=args.log_every,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkerFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, _Terminated) as e:
        name = "SIGTERM" if isinstance(e, _Terminated) else "Ctrl-C"
        print(
            f"\nStopped by {name}. Finished units are kept in {args.output}; run the same "
            "command again to continue.",
            file=sys.stderr,
        )
        sys.exit(143 if isinstance(e, _Terminated) else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(_summary(result, args.output, host))


if __name__ == "__main__":
    main()
