"""Progress of a preparation: a bar on a terminal, periodic lines in a log.

Under SLURM (or ``> log 2>&1``) stderr is a file and a bar would be one ever-growing line, so
every ``every`` seconds one line is printed instead::

    prepare: 37/120 units, 9/30 files, 1,234,567 documents, 512.3M tokens, 2,150.0/6,800.0 MB,
    48.2 MB/s, ETA 1m37s   (one line)

Bytes are of the input as stored (compressed .gz and .parquet), known from file sizes and parquet
metadata before any text is read, so the ETA holds from the first line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import tqdm


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts bytes, documents, tokens and units; shows them (see the module docstring).

    Args:
      total_bytes: the input bytes of the units this run prepares.
      total_units, done_units: units of this host, and those already finished before.
      unit_files: ``{unit index: its input files}`` of the units this run prepares: a file
        counts as done once all its units are.
      every: seconds between lines when ``stream`` is not a terminal.
      stream: where to write (default stderr); ``tty`` overrides its isatty().
    """

    def __init__(
        self,
        total_bytes: int,
        total_units: int,
        done_units: int = 0,
        *,
        unit_files: dict[int, tuple[str, ...]] | None = None,
        every: float = 30.0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        label: str = "prepare",
    ):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_bytes, self.total_units = total_bytes, total_units
        self.units, self.bytes, self.documents, self.tokens = done_units, 0, 0, 0
        self.every, self.label = every, label
        self._unit_files = dict(unit_files or {})
        self._open_units: dict[str, int] = {}  # file -> its units not yet done
        for files in self._unit_files.values():
            for f in files:
                self._open_units[f] = self._open_units.get(f, 0) + 1
        self.total_files, self.files = len(self._open_units), 0
        self._start = self._last = time.monotonic()
        self._bar = None
        if self.tty:
            self._bar = tqdm.tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc=label, file=self.stream
            )

    def add(self, nbytes: int, documents: int, tokens: int) -> None:
        self.bytes += nbytes
        self.documents += documents
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(
                f"{self.units}/{self.total_units} units, {self.documents:,} docs, "
                f"{_count(self.tokens)} tokens",
                refresh=False,
            )
        self.tick()

    def unit_done(self, index: int | None = None) -> None:
        self.units += 1
        for f in self._unit_files.get(index, ()):
            self._open_units[f] -= 1
            self.files += self._open_units[f] == 0

    def tick(self) -> None:
        """Prints a line if ``every`` seconds passed since the last (logs only)."""
        if self._bar is None and time.monotonic() - self._last >= self.every:
            self.line()

    def line(self) -> str:
        """Prints and returns the progress line."""
        now = time.monotonic()
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        rate = self.bytes / elapsed
        left = max(self.total_bytes - self.bytes, 0)
        eta = _duration(left / rate) if rate > 0 else "unknown"
        text = (
            f"{self.label}: {self.units}/{self.total_units} units, {self.files}/{self.total_files} "
            f"files, {self.documents:,} documents, "
            f"{_count(self.tokens)} tokens, {self.bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} "
            f"MB, {rate / 1e6:.1f} MB/s, ETA {eta}"
        )
        print(text, file=self.stream, flush=True)
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self.line()
