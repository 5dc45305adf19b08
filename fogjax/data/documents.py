"""The input files of a preparation: .txt, .jsonl, .jsonl.gz and .parquet.

A .txt file is one document; each line of a .jsonl(.gz) file and each row of a .parquet file is one
document, its text in the ``text`` field / column (``--text-field``). Folders are searched
recursively for these files. Reading them is :mod:`fogjax.data.prepare.reading`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
TEXT_FIELD = "text"


def kind_of(path: Path) -> str | None:
    """The input format of ``path`` (one of :data:`SUFFIXES`), or None."""
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
            found = sorted(p for p in path.rglob("*") if p.is_file() and kind_of(p))
            if not found:
                raise ValueError(
                    f"Input folder {str(path)!r} holds no {', '.join(SUFFIXES)} files. "
                    "Point --input at the text files, or convert them to one of these formats."
                )
            files.extend(found)
        elif kind_of(path) is None:
            raise ValueError(
                f"Input {str(path)!r} has an unsupported format. Use {', '.join(SUFFIXES)} "
                "(.jsonl/.parquet with the text in a field, --text-field)."
            )
        else:
            files.append(path)
    return files
