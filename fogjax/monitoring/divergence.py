"""Divergence detection from the per-step loss and gradient norm (pure Python, no JAX).

Four signals, checked in this order on every step:

- ``non_finite``: the loss or the gradients are NaN/inf (the parameters are lost from there on).
- ``loss_blowup``: one step's loss above ``blowup_ratio`` times the first step's loss (the model at
  initialisation, about ln V), at once and at any step, warm-up included. No model that is still
  learning is that much worse than an untrained one; at LR 1000 the tiny model's loss reached
  1.2e7 for one step and then fell back to uniform predictions (about the first step's loss),
  which no rule below ever flags: it never stays above the running minimum.
- ``loss_spike``: the loss stays above its running minimum by more than ``loss_margin`` (nats)
  for ``loss_patience`` consecutive steps. A single bad batch is noise; a loss that stays up has
  left its basin. The divergence step is the first step of that run of steps. The running
  minimum is that of the mean over ``loss_patience`` consecutive normal steps: the minimum of
  single steps would be a lucky batch, which small batches make far below the typical loss. It
  starts at the first step's loss (the model at initialisation, about ln V), so a loss that blew
  up inside the warm-up and stays above where it started is a divergence from the first step
  after the warm-up (seen at LR 3e-2 on the tiny OP block: 7,700 at step 10, 4.6e8 at step 20).
- ``grad_spike``: the gradient norm stays above ``grad_ratio`` times its trailing baseline (an
  exponential moving average of the steps not above it) for ``grad_patience`` consecutive steps.

Steps up to ``start_step`` (the LR warm-up, whose loss and gradient transients are normal) are
neither flagged nor used for the running minimum or the baseline. Only the first divergence is
reported; its state round-trips through :meth:`DivergenceDetector.state_dict` so that a resumed
run detects exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

REASONS = ("non_finite", "loss_blowup", "loss_spike", "grad_spike")


@dataclasses.dataclass(frozen=True)
class Divergence:
    """A detected divergence: ``step`` is its onset, ``detected_at`` the step that confirmed it."""

    reason: str
    step: int
    detected_at: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DivergenceDetector:
    """Feeds on (step, loss, grad_norm); returns the first :class:`Divergence` once found.

    Args:
      loss_margin: nats above the running minimum that count as a spike (0 disables).
      blowup_ratio: a single loss above this multiple of the first step's loss is a divergence
        at once (0 disables).
      loss_patience: consecutive spiking steps before a loss divergence is declared.
      grad_ratio: multiple of the trailing grad-norm baseline that counts as a spike (0 disables).
      grad_patience: consecutive spiking steps before a grad-norm divergence is declared.
      start_step: steps <= this are ignored (pass the LR warm-up length).
      grad_ema: decay of the grad-norm baseline (0.9: about the last 10 normal steps).
      grad_min_history: normal steps needed before the grad-norm baseline is trusted.
    """

    def __init__(
        self,
        loss_margin: float = 1.0,
        loss_patience: int = 10,
        grad_ratio: float = 10.0,
        grad_patience: int = 5,
        start_step: int = 0,
        grad_ema: float = 0.9,
        grad_min_history: int = 5,
        blowup_ratio: float = 2.0,
    ):
        if loss_margin < 0 or grad_ratio < 0 or (grad_ratio and grad_ratio <= 1.0):
            raise ValueError(
                "log.loss_spike_margin must be >= 0 and log.grad_spike_ratio 0 (off) or > 1."
            )
        if blowup_ratio < 0 or (blowup_ratio and blowup_ratio <= 1.0):
            raise ValueError("log.loss_blowup_ratio must be 0 (off) or > 1.")
        self.blowup_ratio = blowup_ratio
        self.loss_first: float | None = None  # The first step's loss: the untrained model's.
        if loss_patience < 1 or grad_patience < 1:
            raise ValueError("log.loss_spike_patience and log.grad_spike_patience must be >= 1.")
        self.loss_margin, self.loss_patience = loss_margin, loss_patience
        self.grad_ratio, self.grad_patience = grad_ratio, grad_patience
        self.start_step, self.grad_ema, self.grad_min_history = (
            start_step,
            grad_ema,
            grad_min_history,
        )
        self.loss_min = math.inf
        self.loss_window: list[float] = []  # the last loss_patience normal losses
        self.loss_onset: int | None = None  # first step of the current run above the margin
        self.grad_baseline = 0.0
        self.grad_history = 0
        self.grad_onset: int | None = None
        self.found: Divergence | None = None

    def update(self, step: int, loss: float, grad_norm: float) -> Divergence | None:
        """Feeds one step; returns the divergence the first time one is detected, else None."""
        if self.found is not None:
            return None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            detail = f"loss={loss}, grad_norm={grad_norm}"
            return self._found("non_finite", step, step, detail)
        if math.isinf(self.loss_min):
            self.loss_min = loss  # The first step's loss, even inside the warm-up (docstring).
        if self.loss_first is None:
            self.loss_first = loss
        if self.blowup_ratio and loss > self.blowup_ratio * self.loss_first:
            detail = (
                f"loss {loss:.4g} is above {self.blowup_ratio:g}x the first step's loss "
                f"{self.loss_first:.3f}"
            )
            return self._found("loss_blowup", step, step, detail)
        if step <= self.start_step:
            return None
        return self._loss(step, loss) or self._grad(step, grad_norm)

    def _found(self, reason: str, onset: int, step: int, detail: str) -> Divergence:
        self.found = Divergence(reason, onset, step, detail)
        return self.found

    def _loss(self, step: int, loss: float) -> Divergence | None:
        if not self.loss_margin:
            return None
        if loss > self.loss_min + self.loss_margin:
            onset = self.loss_onset = step if self.loss_onset is None else self.loss_onset
            if step - onset + 1 >= self.loss_patience:
                detail = (
                    f"loss {loss:.3f} stayed above its running minimum {self.loss_min:.3f} + "
                    f"{self.loss_margin} for {step - onset + 1} steps"
                )
                return self._found("loss_spike", onset, step, detail)
            return None
        self.loss_onset = None
        self.loss_window = [*self.loss_window, loss][-self.loss_patience :]
        if len(self.loss_window) == self.loss_patience:
            self.loss_min = min(self.loss_min, sum(self.loss_window) / self.loss_patience)
        return None

    def _grad(self, step: int, grad_norm: float) -> Divergence | None:
        if not self.grad_ratio:
            return None
        trusted = self.grad_history >= self.grad_min_history
        if trusted and grad_norm > self.grad_ratio * self.grad_baseline:
            onset = self.grad_onset = step if self.grad_onset is None else self.grad_onset
            if step - onset + 1 >= self.grad_patience:
                detail = (
                    f"grad_norm {grad_norm:.3g} stayed above {self.grad_ratio}x its baseline "
                    f"{self.grad_baseline:.3g} for {step - onset + 1} steps"
                )
                return self._found("grad_spike", onset, step, detail)
            return None
        self.grad_onset = None
        if self.grad_history == 0:
            self.grad_baseline = grad_norm
        else:
            self.grad_baseline = (
                self.grad_ema * self.grad_baseline + (1 - self.grad_ema) * grad_norm
            )
        self.grad_history += 1
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (saved in the checkpoint metadata)."""
        return {
            "loss_first": self.loss_first,
            "loss_min": self.loss_min if math.isfinite(self.loss_min) else None,
            "loss_onset": self.loss_onset,
            "loss_window": list(self.loss_window),
            "grad_baseline": self.grad_baseline,
            "grad_history": self.grad_history,
            "grad_onset": self.grad_onset,
            "found": self.found.to_dict() if self.found else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loss_min = state.get("loss_min")
        self.loss_min = math.inf if loss_min is None else float(loss_min)
        # Written before loss_first was recorded: the running minimum starts at the first loss
        # and only falls, so the blow-up threshold is that much stricter, never looser.
        first = state.get("loss_first", loss_min)
        self.loss_first = None if first is None else float(first)
        self.loss_onset = state.get("loss_onset")
        self.loss_window = [float(v) for v in state.get("loss_window", [])]
        self.grad_baseline = float(state.get("grad_baseline", 0.0))
        self.grad_history = int(state.get("grad_history", 0))
        self.grad_onset = state.get("grad_onset")
        found = state.get("found")
        self.found = Divergence(**found) if found else None


def detector_from_config(config: Any) -> DivergenceDetector:
    """The detector of a run config's ``log.*`` divergence fields."""
    log = config.log
    start = log.divergence_start_step
    return DivergenceDetector(
        loss_margin=log.loss_spike_margin,
        loss_patience=log.loss_spike_patience,
        grad_ratio=log.grad_spike_ratio,
        grad_patience=log.grad_spike_patience,
        start_step=config.optim.warmup_steps if start < 0 else start,
        blowup_ratio=log.loss_blowup_ratio,
    )
