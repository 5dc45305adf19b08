"""Metrics out of the device and into TensorBoard and the console.

- :class:`MetricWriter`: tensorboardX events, written by process 0 only (tensorboardX, never
  TensorFlow: clu and flax.metrics.tensorboard import it); a write error never stops training.
- :func:`metrics_to_host`: one device-to-host transfer of a metrics pytree, flattened to tags.
- :func:`console_line` and :class:`Console`: the one-line log and a tqdm bar on a TTY.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm


def _import_tensorboardx_without_torch() -> None:
    """Imports tensorboardX with ``torch`` hidden, where torch is installed but not yet imported.

    tensorboardX's package import tries ``import torch`` only to accept torch tensors as values,
    which fogjax never passes; where torch is installed (the Hugging Face export extra) that was
    1.3 s of every trainer's start-up. A ``None`` in ``sys.modules`` makes that import fail fast
    inside tensorboardX (it falls back to numpy); the entry is removed right after, so a later
    ``import torch`` works as usual.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX  # noqa: F401
    finally:
        if hide:
            del sys.modules["torch"]


_import_tensorboardx_without_torch()
from tensorboardX import summary as tb_summary  # noqa: E402
from tensorboardX.event_file_writer import EventsWriter  # noqa: E402
from tensorboardX.proto import event_pb2  # noqa: E402

# tensorboardX warns once per tag and step that a value is NaN or inf; a diverging run has dozens
# per step, and the NaN check (fogjax/monitoring/reporter.py) already says it, in one message.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)


class MetricWriter:
    """Scalars and text to a TensorBoard event file in ``logdir``; a no-op on processes != 0.

    Events are written synchronously in the caller's thread (tensorboardX's ``EventsWriter``, not
    its ``SummaryWriter``): SummaryWriter's background thread dies on a write error (a full disk)
    and the next ``add_scalar`` then blocks on its queue for ever, signals included. Here the
    first write error is reported once (``warn``) and the writer turns itself off, so training
    goes on without events; :attr:`error` says why.
    """

    def __init__(
        self,
        logdir: str,
        *,
        enabled: bool | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.error: str | None = None
        self._warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self._events: EventsWriter | None = None
        if self.enabled:
            os.makedirs(logdir, exist_ok=True)
            self._guarded(
                lambda: setattr(self, "_events", EventsWriter(os.path.join(logdir, "events")))
            )

    def _guarded(self, write: Callable[[], Any]) -> None:
        """Runs ``write``; on the first failure warns once and stops writing events."""
        try:
            write()
        except Exception as e:  # OSError (full disk, read-only), or anything under it.
            self.error = f"{type(e).__name__}: {e}"
            self._events = None
            self._warn(
                f"WARNING: TensorBoard events can no longer be written ({self.error}); training "
                "continues without them (console and checkpoints are unaffected)."
            )

    def _write(self, step: int, summary: Any) -> None:
        events = self._events
        if events is not None:
            event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            self._guarded(lambda: events.write_event(event))

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        """One value per tag at ``step``; None values (e.g. MFU on CPU) are skipped."""
        for tag, value in scalars.items():
            if value is not None and self._events is not None:
                self._write(step, tb_summary.scalar(tag, float(value)))

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Markdown ``text`` under ``tag`` (TensorBoard's Text tab)."""
        self._write(step, tb_summary.text(tag, text))

    def flush(self) -> None:
        events = self._events
        if events is not None:
            self._guarded(events.flush)

    def close(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            self._guarded(events.close)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def metrics_to_host(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flat {'prefix/a/b': float} from a pytree of scalars and per-layer [L] arrays.

    A [L] array becomes ``.../layer_00`` ... ``.../layer_{L-1}`` plus their mean ``.../avg``.
    Everything is fetched in one ``jax.device_get`` (one sync with the device). Arrays of
    rank >= 2 are refused: they are not metrics, and a silent reduction would hide that.
    """
    host = jax.device_get(tree)
    flat: dict[str, float] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(host)[0]:
        name = "/".join(([prefix] if prefix else []) + [_key_name(k) for k in path])
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            flat[name] = float(arr)
        elif arr.ndim == 1:
            width = max(2, len(str(arr.size - 1)))
            for i, v in enumerate(arr):
                flat[f"{name}/layer_{i:0{width}d}"] = float(v)
            flat[f"{name}/avg"] = float(arr.mean())
        else:
            raise ValueError(
                f"Metric {name!r} has shape {arr.shape}; metrics must be scalars or per-layer "
                "[L] arrays. Reduce it in the train step before returning it."
            )
    return flat


def format_duration(seconds: float) -> str:
    """'5m12s', '2h03m', '45s', '3d04h': the two leading units."""
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def console_line(
    step: int,
    total_steps: int,
    loss: float | None = None,
    lr: float | None = None,
    tokens_per_s: float | None = None,
    mfu: float | None = None,
    eta_s: float | None = None,
) -> str:
    """``step 120/2000 | loss 3.412 | lr 1.0e-03 | 12.3k tok/s | mfu 41.2% | eta 5m12s``.

    Fields that are None are left out (MFU on CPU; speed before the second tick).
    """
    parts = [f"step {step}/{total_steps}"]
    if loss is not None:
        parts.append(f"loss {loss:.3f}" if math.isfinite(loss) else f"loss {loss}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if tokens_per_s is not None:
        parts.append(f"{_si(tokens_per_s)} tok/s")
    if mfu is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class Console:
    """Progress on the terminal, from process 0 only.

    On a TTY a tqdm bar tracks the step and lines are printed above it; redirected to a file
    (SLURM logs), there is no bar, only the lines, so logs stay free of carriage returns.
    """

    def __init__(
        self, total_steps: int, initial_step: int = 0, *, enabled: bool | None = None, stream=None
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._stream = stream or sys.stdout
        self._bar = None
        if self.enabled and self._stream.isatty():
            self._bar = tqdm.tqdm(
                total=total_steps, initial=initial_step, file=self._stream, dynamic_ncols=True
            )
        self._step = initial_step

    def update(self, step: int) -> None:
        """Move the bar to ``step``."""
        if self._bar is not None and step > self._step:
            self._bar.update(step - self._step)
        self._step = max(self._step, step)

    def print(self, line: str) -> None:
        """Print one line (above the bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self._stream)
        else:
            print(line, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
