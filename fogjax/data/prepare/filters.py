"""``--filter FIELD OP VALUE``: keep only the documents whose field compares true.

    --filter 'int_score>=3'        FineWeb-Edu's integer educational score
    --filter 'language==en' --filter 'score>0.8'     several filters: all must hold

OP is one of ``>= <= > < == !=`` (``=`` means ``==``). VALUE is an integer, a float, ``true`` /
``false``, or else a string (quotes optional). A document whose field is null never passes. On
.parquet inputs the comparison runs in pyarrow over whole record batches; on .jsonl lines it runs
per record.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_PATTERN = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(>=|<=|==|!=|=|>|<)\s*(.*?)\s*$")
_PYTHON_OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
_ARROW_OPS = {
    ">=": "greater_equal",
    "<=": "less_equal",
    ">": "greater",
    "<": "less",
    "==": "equal",
    "!=": "not_equal",
}


@dataclasses.dataclass(frozen=True)
class Filter:
    """One comparison ``field op value``."""

    field: str
    op: str
    value: Any

    def __str__(self) -> str:
        value = self.value
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return f"{self.field}{self.op}{text}"


def _value(text: str) -> Any:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_filter(text: str) -> Filter:
    """``'int_score>=3'`` -> Filter('int_score', '>=', 3).

    Raises:
      ValueError: not ``FIELD OP VALUE``.
    """
    match = _PATTERN.match(text)
    if not match or not match.group(3) or match.group(3)[0] in "<>=!":
        raise ValueError(
            f"--filter {text!r} is not FIELD OP VALUE: write e.g. --filter 'int_score>=3' "
            f"(OP one of {', '.join(_PYTHON_OPS)})."
        )
    field, op, value = match.groups()
    return Filter(field, "==" if op == "=" else op, _value(value))


def keep_mask(filters: Sequence[Filter], batch: Any, where: str) -> np.ndarray:
    """bool [rows]: the rows of a pyarrow RecordBatch that pass every filter.

    Raises:
      ValueError: a column cannot be compared with its value (naming ``where`` and the column).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = np.ones(batch.num_rows, dtype=bool)
    for f in filters:
        column = batch.column(batch.schema.get_field_index(f.field))
        try:
            result = getattr(pc, _ARROW_OPS[f.op])(column, pa.scalar(f.value))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(
                f"{where}: --filter {f} cannot compare column {f.field!r} ({column.type}) with "
                f"{f.value!r} ({e}). Write the value as the column's type (a number for a "
                "numeric column)."
            ) from None
        keep &= np.asarray(result.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    return keep


def keep_record(filters: Sequence[Filter], record: dict, where: str) -> bool:
    """Whether a JSON record passes every filter.

    Raises:
      ValueError: the record has no such field, or its value cannot be compared (naming
        ``where``, e.g. ``file.jsonl:12``).
    """
    for f in filters:
        if f.field not in record:
            raise ValueError(
                f"{where} has no {f.field!r} field for --filter {f}. Check the field name (the "
                f"record has {sorted(record)[:10]})."
            )
        value = record[f.field]
        if value is None:
            return False
        try:
            if not _PYTHON_OPS[f.op](value, f.value):
                return False
        except TypeError:
            raise ValueError(
                f"{where}: --filter {f} cannot compare {f.field}={value!r} with {f.value!r}. "
                "Write the value as the field's type (a number for a numeric field)."
            ) from None
    return True
