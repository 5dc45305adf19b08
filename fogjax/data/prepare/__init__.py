"""Tokenise text files into train/validation token shards: parallel, multi-host, resumable.

    python -m fogjax.data.prepare --input corpus/*.jsonl.gz --output /data/corpus --tokenizer bytes
    python -m fogjax.data.prepare --input fineweb-edu/ --output /data/fwe \\
        --tokenizer llama3/tokenizer.json --filter 'int_score>=3' --workers 16

Reads .txt (one document per file), .jsonl / .jsonl.gz and .parquet (one document per line / row,
the text in ``--text-field``, default ``text``). The input is cut into work units (whole files, or
runs of parquet row groups: :mod:`~fogjax.data.prepare.plan`); ``--workers`` processes tokenise
units into their own shards (:mod:`~fogjax.data.prepare.worker`), hosts split the units
(``--num-hosts/--host-index``, or a SLURM job array), a ledger records finished units
(:mod:`~fogjax.data.prepare.ledger`) so that the same command continues after Ctrl-C, SIGTERM or
SIGKILL, and the last process to finish writes metadata.json
(:mod:`~fogjax.data.prepare.finalise`). The output is the same files, bit for bit, whatever the
number of workers and hosts. Train with ``--config.data.path=/data/corpus``.

:func:`prepare_documents` (:mod:`~fogjax.data.prepare.memory`) prepares documents held in memory
in one process (the embedded corpus).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from fogjax.data import documents, shards
from fogjax.data.prepare import plan as plan_lib
from fogjax.data.prepare.filters import parse_filter
from fogjax.data.prepare.finalise import DEFAULT_VAL_CAP, finalise
from fogjax.data.prepare.ledger import LEDGER_DIR, Ledger
from fogjax.data.prepare.memory import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    ValidationSplit,
    prepare_documents,
)
from fogjax.data.prepare.pool import WorkerFailed, run_units
from fogjax.data.prepare.progress import Progress
from fogjax.data.prepare.worker import Job
from fogjax.data.tokenizer import bos_id, load_tokenizer, tokenizer_file

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_UNIT_BYTES",
    "DEFAULT_VAL_CAP",
    "DEFAULT_VAL_FRACTION",
    "Result",
    "ValidationSplit",
    "WorkerFailed",
    "default_workers",
    "prepare",
    "prepare_documents",
]

DEFAULT_UNIT_BYTES = 256 << 20  # Input bytes per unit: thousands of units per terabyte.


@dataclasses.dataclass
class Result:
    """What a :func:`prepare` call did.

    Attributes:
      info: the finished dataset, or None while other hosts' units are pending.
      units: all units of the plan; host_units: this host's; prepared: units prepared by this
        call; pending: units of any host not yet finished.
    """

    info: shards.DatasetInfo | None
    units: int
    host_units: int
    prepared: int
    pending: int


def default_workers() -> int:
    """The cores this process may run on (SLURM's --cpus-per-task, taskset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not Linux.
        return os.cpu_count() or 1


def _settings(
    tokenizer: str,
    eos_token: str | None,
    bos: str,
    bos_token: str | None,
    text_field: str,
    filters: Sequence[str],
    val_tokens: int | None,
    dtype: str,
    shard_tokens: int,
    unit_bytes: int,
) -> tuple[dict, object, Path | None]:
    """(the settings recorded in the plan, the tokenizer, its file); checks every value."""
    for name, value, low in (("--shard-tokens", shard_tokens, 1), ("--unit-bytes", unit_bytes, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}.")
    if val_tokens is not None and val_tokens < 0:
        raise ValueError(f"--val-tokens must be >= 0 (0: no validation split), got {val_tokens}.")
    if not text_field:
        raise ValueError("--text-field must name a field, e.g. --text-field text.")
    path = tokenizer_file(tokenizer)
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    bos = bos_id(tok, bos, bos_token)
    np_dtype = shards.token_dtype(tok.vocab_size, dtype)
    settings = {
        "version": plan_lib.PLAN_VERSION,
        "tokenizer": tok.spec,
        "tokenizer_sha256": plan_lib.file_sha256(path) if path else None,
        "eos_token": getattr(tok, "eos_token", None),
        "bos_id": bos,
        "text_field": text_field,
        "filters": [str(parse_filter(f)) for f in filters],
        "val_tokens": val_tokens,
        "dtype": np_dtype.name,
        "shard_tokens": shard_tokens,
        "unit_bytes": unit_bytes,
    }
    return settings, tok, path


def _open_output(
    output: Path, ledger: Ledger, settings: dict, inputs: list[list], make_units
) -> list[plan_lib.Unit]:
    """The plan's units: from an existing plan (refusing changed settings), or made now."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file. Choose a folder.")
    if ledger.plan_path.is_file():
        original, saved_inputs, units = plan_lib.read_plan(ledger.plan_path)
        saved = original
        finished = {p.path for u in units if u.index in ledger.done_units() for p in u.pieces}
        complete = (output / shards.METADATA).is_file()
        if not complete:
            # Only the final cut uses --val-tokens: until metadata.json exists it may change
            # (a corpus too small for the default split is fixed by rerunning with a smaller one).
            saved = {**saved, "val_tokens": settings["val_tokens"]}
        if saved["tokenizer_sha256"] and saved["tokenizer_sha256"] == settings["tokenizer_sha256"]:
            saved = {**saved, "tokenizer": settings["tokenizer"]}  # The same file, moved.
        changes = plan_lib.differences(saved, settings)
        changes += plan_lib.input_differences(saved_inputs, inputs, finished)
        if changes:
            raise ValueError(
                f"{output} was prepared with other settings: {'; '.join(changes)}. Run the "
                "original command to continue it, or prepare into a new --output."
            )
        if not complete and settings != original:  # Record what finalise will use.
            plan_lib.write_plan(ledger.plan_path, settings, saved_inputs, units)
        return units
    if output.is_dir() and any(p.name != LEDGER_DIR for p in output.iterdir()):
        what = "a prepared dataset" if (output / shards.METADATA).exists() else "other files"
        raise ValueError(
            f"--output {output} already holds {what}. Choose a new --output (or an empty "
            "folder), or delete the old one to prepare it again."
        )
    units = make_units()  # Before anything is created: a bad input leaves no trace.
    try:
        output.mkdir(parents=True, exist_ok=True)
        ledger.create()
        plan_lib.write_plan(ledger.plan_path, settings, inputs, units)
    except OSError as e:
        raise ValueError(
            f"Cannot write --output {output} ({e}). Choose a folder you can write, on a disk "
            "with free space."
        ) from None
    return units


def prepare(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer: str = "bytes",
    *,
    workers: int = 0,
    num_hosts: int = 1,
    host_index: int = 0,
    val_tokens: int | None = None,
    text_field: str = documents.TEXT_FIELD,
    filters: Sequence[str] = (),
    bos: str = "auto",
    bos_token: str | None = None,
    eos_token: str | None = None,
    dtype: str = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    progress_every: float = 30.0,
    progress_stream: TextIO | None = None,
    tty: bool | None = None,
) -> Result:
    """Prepares (or continues preparing) the text files ``inputs`` into ``output``.

    Args:
      inputs: files, or folders searched recursively (see :mod:`fogjax.data.documents`).
      output: the dataset folder: new, empty, or one this function started with the same
        settings (then it continues).
      tokenizer: a spec of :func:`fogjax.data.tokenizer.load_tokenizer`.
      workers: worker processes (0: tokenise in this process).
      num_hosts, host_index: this call prepares the units ``u % num_hosts == host_index``.
      val_tokens: validation tokens, the first documents of the corpus (None: the smaller of
        50M and 5% of the corpus; 0: no validation split).
      text_field: the field / column holding the text.
      filters: ``FIELD OP VALUE`` comparisons all documents must pass
        (:mod:`fogjax.data.prepare.filters`).
      bos, bos_token: BOS policy 'auto' | 'yes' | 'no' (:func:`fogjax.data.tokenizer.bos_id`).
      eos_token: the end-of-document token of a tokenizer.json (found by name if None).
      dtype: token dtype on disk, 'auto' | 'uint16' | 'uint32'.
      shard_tokens: tokens per shard file, at most.
      unit_bytes: input bytes per work unit, at least (the last unit less).
      progress_every, progress_stream, tty: progress lines every that many seconds on that
        stream (default stderr) when it is not a terminal (``tty`` overrides), else a bar.

    Raises:
      FileNotFoundError: an input or the tokenizer does not exist.
      ValueError: a bad input, setting or output (the message names the file or flag and the
        fix); finished units are kept.
      WorkerFailed: a worker process died or hit a bug.
    """
    output = Path(output).expanduser().absolute()
    if workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: in this process), got {workers}.")
    plan_lib.host_units([], num_hosts, host_index)  # Checked before anything is written.
    settings, tok, tok_path = _settings(
        tokenizer, eos_token, bos, bos_token, text_field, filters, val_tokens, dtype,
        shard_tokens, unit_bytes,
    )  # fmt: skip
    files = documents.expand_inputs(inputs)
    kinds = [documents.kind_of(f) for f in files]
    if filters and ".txt" in kinds:
        txt = files[kinds.index(".txt")]
        raise ValueError(
            f"--filter needs fields, but {txt} is a .txt file (one document, no fields). Filter "
            "only .jsonl / .parquet inputs."
        )
    inputs_list = [[str(f.resolve()), f.stat().st_size] for f in files]
    ledger = Ledger(output)
    parsed = [parse_filter(f) for f in filters]
    units = _open_output(
        output, ledger, settings, inputs_list,
        lambda: plan_lib.make_units(files, kinds, unit_bytes, text_field, parsed),
    )  # fmt: skip
    mine = plan_lib.host_units(units, num_hosts, host_index)
    done = ledger.done_units()
    todo = [u for u in mine if u.index not in done]
    prepared = 0
    if todo and not (output / shards.METADATA).is_file():
        progress = Progress(
            sum(u.bytes for u in todo),
            len(mine),
            len(mine) - len(todo),
            unit_files={u.index: tuple(p.path for p in u.pieces) for u in todo},
            every=progress_every,
            stream=progress_stream or sys.stderr,
            tty=tty,
        )
        job = Job(
            output=str(output),
            tokenizer=str(tok_path) if tok_path else tokenizer,
            tokenizer_sha256=settings["tokenizer_sha256"],
            eos_token=eos_token,
            bos_id=settings["bos_id"],
            text_field=text_field,
            filters=tuple(settings["filters"]),
            dtype=settings["dtype"],
            shard_tokens=shard_tokens,
        )
        try:
            prepared = len(run_units(job, todo, workers, progress))
        finally:
            progress.close()
    pending = len(units) - len(ledger.done_units())
    info = None
    if pending == 0:
        sources = [p for p, _ in inputs_list]
        try:
            info = finalise(output, ledger, units, settings, tok, tok_path, sources)
        except OSError as e:
            raise ValueError(
                f"Writing {output}/{shards.METADATA} failed ({e}). Every unit is done: free disk "
                "space and run the same command again to write it."
            ) from None
    return Result(info, len(units), len(mine), prepared, pending)
