"""Text documents read from .txt, .jsonl, .jsonl.gz and .parquet files.

A .txt file is one document; each line of a .jsonl(.gz) file and each row of a .parquet file is one
document, its text in the ``text`` field / column. Folders are searched recursively for these files.
Empty documents are skipped (they would only add a lone EOS).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
TEXT_FIELD = "text"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The input files named by ``inputs`` (files, or folders searched recursively, sorted).

    Raises:
      FileNotFoundError: an input does not exist.
      ValueError: an input file has an unsupported suffix, or a folder holds no supported file.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Input {str(item)!r} does not exist. Check the path given to --input "
                f"(files with suffixes {', '.join(SUFFIXES)}, or folders holding them)."
            )
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise ValueError(
                    f"Input folder {str(path)!r} holds no {', '.join(SUFFIXES)} files. "
                    "Point --input at the text files, or convert them to one of these formats."
                )
            files.extend(found)
        elif _kind(path) is None:
            raise ValueError(
                f"Input {str(path)!r} has an unsupported format. Use {', '.join(SUFFIXES)} "
                "(.jsonl/.parquet need a 'text' field)."
            )
        else:
            files.append(path)
    return files


def _read_txt(path: Path) -> Iterator[str]:
    yield path.read_text(encoding="utf-8")


def _read_jsonl(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{line_no} is not valid JSON ({e}). Fix or drop that line."
                ) from e
            if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
                raise ValueError(
                    f"{path}:{line_no} has no string {TEXT_FIELD!r} field. Each line must be "
                    f'a JSON object like {{"{TEXT_FIELD}": "..."}}; rename the field holding the '
                    "text."
                )
            yield record[TEXT_FIELD]


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # Imported here: only .parquet inputs need pyarrow.

    pf = pq.ParquetFile(path)
    if TEXT_FIELD not in pf.schema_arrow.names:
        raise ValueError(
            f"{path} has no {TEXT_FIELD!r} column (columns: {pf.schema_arrow.names}). "
            f"Rename the column holding the text to {TEXT_FIELD!r}."
        )
    for batch in pf.iter_batches(columns=[TEXT_FIELD], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


_READERS = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".jsonl.gz": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_documents(files: Sequence[Path]) -> Iterator[str]:
    """The non-empty documents of ``files`` in order (see the module docstring)."""
    for path in files:
        try:
            for text in _READERS[_kind(path)](path):
                if text:
                    yield text
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}). Convert it to UTF-8 first.") from e
