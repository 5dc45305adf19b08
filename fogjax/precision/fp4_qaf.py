"""Quantisation-aware finetuning (QAF) for FP4 runs: when to switch, and the rho statistic.

"FP4 All the Way" (arXiv 2505.19115, §5): once the full-precision weight gradient's RMS falls
below sqrt(3) times the std of the FP4 quantisation noise, rho = RMS(g_bf16) / std(g_fp4 - g_bf16)
< sqrt(3), FP4 training stops making progress; the fix is QAF, FP4 forward (RtN) with a BF16
backward and update (fp4_recipes.qaf_recipe).

Two triggers, both host-side: ``precision.qaf_start`` (a step >= 1, or a fraction of train.steps
in (0, 1)) and ``precision.qaf_auto`` (on statistics steps, rho of every block linear's weight
gradient, both ways on the same batch and the same SR keys; the switch fires once the average over
layers stays below sqrt(3) for ``precision.qaf_patience`` consecutive statistics steps). The
phase is saved in the checkpoint metadata (:meth:`QafSwitch.to_metadata`).

The paper resets the LR at the switch with a short warm-up; ``precision.qaf_lr_reset`` and
``precision.qaf_warmup_steps`` (off by default) do so (:func:`qaf_schedule`). The schedule takes
the switch step as a traced value, so one compiled QAF step serves a switch found at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

RHO_THRESHOLD = math.sqrt(3.0)
PHASES = ("fp4", "qaf")


def qaf_start_step(qaf_start: float, total_steps: int) -> int | None:
    """The first QAF step of ``precision.qaf_start``: None if < 0 (off), a fraction of
    ``total_steps`` if in (0, 1), else a whole step number."""
    if qaf_start < 0:
        return None
    if 0 < qaf_start < 1:
        return int(round(qaf_start * total_steps))
    if qaf_start != int(qaf_start):
        raise ValueError(
            f"precision.qaf_start={qaf_start} must be < 0 (off), a fraction in (0, 1) of "
            "train.steps, or a whole step number (e.g. --config.precision.qaf_start=0.9)."
        )
    return int(qaf_start)


@dataclasses.dataclass(frozen=True)
class QafLr:
    """The LR options of the QAF phase (``precision.qaf_lr_reset``, ``qaf_warmup_steps``)."""

    reset: bool = False
    warmup_steps: int = 0

    @classmethod
    def from_config(cls, precision: Any) -> QafLr:
        warmup = int(getattr(precision, "qaf_warmup_steps", 0))
        if warmup < 0:
            raise ValueError(f"precision.qaf_warmup_steps={warmup} must be >= 0 (0 is off).")
        return cls(bool(getattr(precision, "qaf_lr_reset", False)), warmup)

    @property
    def active(self) -> bool:
        return self.reset or self.warmup_steps > 0


def qaf_schedule(
    schedule: Callable[[Any], jax.Array],
    switch_step: jax.Array | int,
    lr: QafLr,
    peak_lr: float,
    min_lr: float,
    total_steps: int,
) -> Callable[[Any], jax.Array]:
    """The learning rate of a run that switches to QAF at step s = ``switch_step`` (traceable):
    ``schedule(t)`` before s; from s on, with t the optimizer step (float32),

      base(t) = peak_lr + (min_lr - peak_lr) * clip((t - s) / max(T - s, 1), 0, 1)  if lr.reset
                schedule(t)                                                        otherwise
      lr(t)   = base(t) * min(1, (t - s + 1) / W)   (W = lr.warmup_steps; no factor when W = 0)
    """

    def learning_rate(count: Any) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        s = jnp.asarray(switch_step, jnp.float32)
        before = schedule(count)
        base = before
        if lr.reset:
            frac = jnp.clip((t - s) / jnp.maximum(total_steps - s, 1.0), 0.0, 1.0)
            base = peak_lr + (min_lr - peak_lr) * frac
        if lr.warmup_steps > 0:
            base = base * jnp.clip((t - s + 1.0) / lr.warmup_steps, 0.0, 1.0)
        return jnp.where(t >= s, base, before).astype(jnp.float32)

    return learning_rate


def weight_grad_rho(g_fp4: jax.Array, g_ref: jax.Array, layer_axis: bool) -> jax.Array:
    """rho = RMS(g_ref) / std(g_fp4 - g_ref), float32; per layer ([L]) if ``layer_axis`` (the
    leading axis of an nn.scan-stacked kernel), else a scalar. std is the population std."""
    axes = tuple(range(1 if layer_axis else 0, g_ref.ndim))
    ref, noise = g_ref.astype(jnp.float32), (g_fp4 - g_ref).astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(ref), axis=axes))
    return rms / jnp.std(noise, axis=axes)


def block_kernel_rho(
    grads_fp4: Any, grads_ref: Any, scanned: bool, fp4_layers: Collection[str] | None = None
) -> dict[str, jax.Array]:
    """``{'<kernel path>': rho}`` for every block-linear kernel (paths under ``layers``), or only
    under the top-level modules ``fp4_layers`` (BF16 blocks of ``precision.high_precision_layers``
    have no quantisation noise of their own)."""
    flat_fp4 = traverse_util.flatten_dict(grads_fp4)
    flat_ref = traverse_util.flatten_dict(grads_ref)

    def wanted(top: str) -> bool:
        return top in fp4_layers if fp4_layers is not None else top.startswith("layers")

    return {
        "/".join(path[:-1]): weight_grad_rho(flat_fp4[path], flat_ref[path], scanned)
        for path in flat_ref
        if path[-1] == "kernel" and wanted(path[0])
    }


def rho_scalars(rho: dict[str, Any]) -> dict[str, float]:
    """Host rho values -> ``{'fp4/<layer path>/rho': float, 'fp4/rho/avg': float}``.

    A stacked [L] value becomes one tag per layer, the index appended to ``layers`` (the name an
    unscanned model gives the same module), as stats.py does for the FP8 tags.
    """
    out = {}
    for path, value in rho.items():
        value = np.asarray(value, np.float64)
        head, _, rest = path.partition("/")
        if value.ndim == 0:
            out[f"fp4/{path}/rho"] = float(value)
        for i, v in enumerate(value.reshape(-1) if value.ndim else []):
            out[f"fp4/{head}_{i}/{rest}/rho"] = float(v)
    out["fp4/rho/avg"] = float(np.mean([v for v in out.values()])) if out else float("nan")
    return out


@dataclasses.dataclass
class QafSwitch:
    """The host-side QAF phase of a run.

    Attributes:
      start_step: first QAF step from ``precision.qaf_start`` (None: no fixed start).
      auto: switch on rho (``precision.qaf_auto``).
      patience: consecutive statistics steps with rho average < sqrt(3) before switching.
      phase: 'fp4' or 'qaf'.
      switch_step: the first step run in QAF (None while in 'fp4').
      below: the current run of statistics steps below the threshold.
    """

    start_step: int | None = None
    auto: bool = False
    patience: int = 2
    phase: str = "fp4"
    switch_step: int | None = None
    below: int = 0

    @classmethod
    def from_config(cls, precision: Any, total_steps: int) -> QafSwitch:
        if precision.qaf_patience < 1:
            raise ValueError(
                f"precision.qaf_patience={precision.qaf_patience} must be >= 1 (statistics steps)."
            )
        return cls(
            start_step=qaf_start_step(precision.qaf_start, total_steps),
            auto=bool(precision.qaf_auto),
            patience=int(precision.qaf_patience),
        )

    @property
    def enabled(self) -> bool:
        return self.start_step is not None or self.auto

    def in_qaf(self, step: int) -> bool:
        """Whether step ``step`` (0-based, the state's step before it runs) runs in QAF."""
        if self.phase == "fp4" and self.start_step is not None and step >= self.start_step:
            self.phase, self.switch_step = "qaf", self.start_step
        return self.phase == "qaf" and step >= self.switch_step

    def observe(self, step: int, rho_avg: float) -> bool:
        """Records statistics step ``step``'s rho average; True if it switches the run to QAF
        from step ``step + 1`` on."""
        if not self.auto or self.phase == "qaf":
            return False
        self.below = self.below + 1 if rho_avg < RHO_THRESHOLD else 0
        if self.below >= self.patience:
            self.phase, self.switch_step = "qaf", step + 1
            return True
        return False

    def to_metadata(self) -> dict[str, Any]:
        return {"phase": self.phase, "switch_step": self.switch_step, "below": self.below}

    def restore(self, meta: dict[str, Any] | None) -> None:
        """Takes the phase saved by :meth:`to_metadata` (absent in older checkpoints)."""
        if meta:
            if meta["phase"] not in PHASES:
                raise ValueError(f"Checkpoint QAF phase {meta['phase']!r} is not one of {PHASES}.")
            self.phase, self.switch_step, self.below = (
                meta["phase"],
                meta["switch_step"],
                int(meta["below"]),
            )
