"""Reading the documents of one piece of input, in batches, with filters and progress.

A *piece* is a whole .txt / .jsonl / .jsonl.gz file, or a range of row groups of a .parquet file
(:mod:`fogjax.data.prepare.plan` cuts the input into them). Each batch carries the documents'
texts and how far into the piece reading has come, in bytes of the input as stored (compressed
bytes for .gz and .parquet), so progress and ETA follow the disk.

Every failure to read becomes a ValueError that names the file (and the line of a .jsonl) and
the fix: a .gz that is not gzip or is cut off, text that is not UTF-8, a line that is not a JSON
object, a missing text field, a damaged parquet file.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fogjax.data.prepare.filters import Filter, keep_mask, keep_record

BATCH_DOCUMENTS = 1024  # Documents per batch: one encode_batch call, one progress report.


@dataclasses.dataclass(frozen=True)
class Piece:
    """A file, or row groups ``[first, stop)`` of a parquet file; ``bytes`` as stored."""

    path: str
    kind: str  # '.txt' | '.jsonl' | '.jsonl.gz' | '.parquet'
    bytes: int
    row_groups: tuple[int, int] | None = None
    rows: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Piece:
        groups = d.get("row_groups")
        return cls(**{**d, "row_groups": tuple(groups) if groups is not None else None})


@dataclasses.dataclass
class Batch:
    """Documents read: ``texts`` kept (non-empty, passing the filters), ``filtered`` dropped by
    a filter, ``empty`` dropped as empty; ``position`` bytes of the piece read so far."""

    texts: list[str]
    filtered: int
    empty: int
    position: int


class InputError(ValueError):
    """A piece of input cannot be read; the message names the file and the fix."""


def read_piece(
    piece: Piece, text_field: str, filters: Sequence[Filter], batch_documents: int = BATCH_DOCUMENTS
) -> Iterator[Batch]:
    """The batches of one piece, in order (see the module docstring).

    Raises:
      InputError: naming the file and the fix.
    """
    readers = {
        ".txt": _read_txt,
        ".jsonl": _read_jsonl,
        ".jsonl.gz": _read_jsonl,
        ".parquet": _read_parquet,
    }
    path = Path(piece.path)
    try:
        yield from readers[piece.kind](piece, path, text_field, filters, batch_documents)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(
            f"Input {path} disappeared since the preparation started. Restore it, or start "
            "again with a new --output."
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(
            f"{path} is not a readable gzip file ({e}). Download or compress it again; if it is "
            "plain text, rename it to .jsonl."
        ) from None
    except EOFError as e:
        raise InputError(
            f"{path} is truncated ({e}): the gzip stream ends early. Download or compress it again."
        ) from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e}). Convert it to UTF-8 first.") from None
    except _arrow_errors() as e:
        raise InputError(
            f"{path} is not a readable parquet file ({type(e).__name__}: {e}). Download or "
            "write it again."
        ) from None
    except OSError as e:  # After the gzip and arrow errors, which are OSErrors too.
        raise InputError(f"Cannot read {path} ({e}). Check that it is readable.") from None


def _arrow_errors() -> tuple[type[BaseException], ...]:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        return ()
    return (pa.ArrowException,)


def _text_of(texts: list[Any]) -> tuple[list[str], int]:
    kept = [t for t in texts if t]
    return kept, len(texts) - len(kept)


def _read_txt(
    piece: Piece, path: Path, text_field: str, filters: Sequence[Filter], batch_documents: int
) -> Iterator[Batch]:
    text = path.read_bytes().decode("utf-8")
    yield Batch([text] if text else [], 0, 0 if text else 1, piece.bytes)


def _read_jsonl(
    piece: Piece, path: Path, text_field: str, filters: Sequence[Filter], batch_documents: int
) -> Iterator[Batch]:
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if piece.kind == ".jsonl.gz" else raw
        texts: list[Any] = []
        filtered = 0
        for line_no, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            record = _json_record(line, where)
            if text_field not in record or not isinstance(record[text_field], str | None):
                raise InputError(
                    f"{where} has no string {text_field!r} field (fields: "
                    f"{sorted(record)[:10]}). Pass --text-field NAME for the field that holds "
                    "the text."
                )
            if filters and not keep_record(filters, record, where):
                filtered += 1
            else:
                texts.append(record[text_field])
            if len(texts) + filtered >= batch_documents:
                kept, empty = _text_of(texts)
                yield Batch(kept, filtered, empty, raw.tell())
                texts, filtered = [], 0
        kept, empty = _text_of(texts)
        yield Batch(kept, filtered, empty, piece.bytes)


def _json_record(line: bytes, where: str) -> dict:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise
    except ValueError as e:
        raise InputError(f"{where} is not valid JSON ({e}). Fix or drop that line.") from None
    if not isinstance(record, dict):
        raise InputError(
            f'{where} is not a JSON object. Each line must be an object like {{"text": "..."}}.'
        )
    return record


def _read_parquet(
    piece: Piece, path: Path, text_field: str, filters: Sequence[Filter], batch_documents: int
) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = list(dict.fromkeys([text_field, *(f.field for f in filters)]))
    check_parquet_columns(path, pf.schema_arrow.names, columns, text_field)
    first, stop = piece.row_groups or (0, pf.metadata.num_row_groups)
    rows_total = piece.rows or 1
    rows_done = 0
    batches = pf.iter_batches(
        batch_size=batch_documents, row_groups=range(first, stop), columns=columns
    )
    for batch in batches:
        keep = keep_mask(filters, batch, str(path)) if filters else None
        texts = batch.column(batch.schema.get_field_index(text_field)).to_pylist()
        if keep is not None:
            texts = [t for t, k in zip(texts, keep.tolist(), strict=True) if k]
        kept, empty = _text_of(texts)
        filtered = batch.num_rows - len(texts)
        rows_done += batch.num_rows
        yield Batch(kept, filtered, empty, piece.bytes * min(rows_done, rows_total) // rows_total)


def check_parquet_columns(
    path: Path, names: Sequence[str], needed: Sequence[str], text_field: str
) -> None:
    """Raises InputError naming the file, the missing column and the fix."""
    for column in needed:
        if column not in names:
            flag = "--text-field NAME" if column == text_field else "the --filter field"
            raise InputError(
                f"{path} has no {column!r} column (columns: {list(names)}). Fix {flag} to name "
                "one of its columns."
            )


def check_head(path: Path, kind: str, text_field: str, filters: Sequence[Filter]) -> None:
    """Reads the first record of a .jsonl(.gz) file, so that a file that is not gzip, not JSON,
    or lacks the text or a filter field is refused before anything is written.

    Raises:
      InputError: naming the file and the fix.
    """
    batches = read_piece(Piece(str(path), kind, 0), text_field, filters, batch_documents=1)
    try:
        next(batches, None)
    finally:
        batches.close()
