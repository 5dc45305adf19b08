"""Divergence early warning from kurtosis trends (docs/spec.md §4).

In a failing FP8DPA run the paper saw QKV kurtosis leave its sub-linear / logarithmic growth at
about 3B tokens, the gradient norm spike at 12B and the loss diverge at 15B. No fixed threshold
exists: the signal is a departure from the tensor's own trend. For every probed tensor and layer
this monitor fits kurtosis = a + b log(step) to the history seen so far (excluding the newest
point) and reports the newest value's ratio to that fit. A ratio above ``threshold`` on
``patience`` consecutive statistics steps raises a warning, once per (tensor, layer) until it
returns under the threshold; the warnings of one step are reported as one line, worst first.
Points before ``start_step`` (the LR warmup, where kurtosis moves fast anyway) are ignored.
The monitor's whole state (every series and the warnings raised) round-trips through
:meth:`KurtosisMonitor.state_dict`; the trainer saves it in each checkpoint, so a resumed run
warns exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_TAG = re.compile(r"^kurtosis/(?P<tensor>[^/]+)/(?P<layer>layer_\d+)$")


@dataclasses.dataclass
class _Series:
    steps: list[float] = dataclasses.field(default_factory=list)
    values: list[float] = dataclasses.field(default_factory=list)
    above: int = 0  # consecutive points above the threshold
    warned: bool = False


class KurtosisMonitor:
    """Tracks ``kurtosis/<tensor>/layer_NN`` scalars and flags departures from a log trend.

    Args:
      threshold: ratio of the newest value to the trend's prediction that counts as a departure.
      patience: consecutive departures before a warning.
      min_history: points needed before a trend is fitted (early training moves a lot).
      start_step: statistics before this step are ignored (pass the LR warmup length).
    """

    def __init__(
        self,
        threshold: float = 1.5,
        patience: int = 2,
        min_history: int = 6,
        start_step: int = 0,
    ):
        if threshold <= 1.0 or patience < 1 or min_history < 3:
            raise ValueError(
                "log.kurtosis_alarm_ratio must be > 1, and patience >= 1, min_history >= 3."
            )
        self.threshold = threshold
        self.patience = patience
        self.min_history = min_history
        self.start_step = start_step
        self._series: dict[tuple[str, str], _Series] = {}
        self.warnings: list[dict[str, object]] = []  # {'step', 'where': [...], 'line'}, in order

    @property
    def first_warning_step(self) -> int | None:
        return int(self.warnings[0]["step"]) if self.warnings else None

    def state_dict(self) -> dict[str, object]:
        """JSON-able state: every series (steps, values, counters) and the warnings so far."""
        series = {f"{t}/{layer}": dataclasses.asdict(s) for (t, layer), s in self._series.items()}
        return {"series": series, "warnings": list(self.warnings)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._series = {}
        for key, fields in dict(state.get("series", {})).items():
            tensor, layer = key.rsplit("/", 1)
            self._series[(tensor, layer)] = _Series(**fields)
        self.warnings = list(state.get("warnings", []))

    @staticmethod
    def trend_ratio(steps: list[float], values: list[float], step: float, value: float) -> float:
        """value / (a + b log step), the fit by least squares over (steps, values)."""
        x = np.log(np.asarray(steps, np.float64))
        y = np.asarray(values, np.float64)
        b, a = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
        predicted = a + b * math.log(step)
        return value / max(predicted, 1e-6)

    def update(self, step: int, scalars: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """Feeds one statistics step; returns (TensorBoard scalars, warning lines)."""
        out: dict[str, float] = {}
        alarms: list[tuple[float, str, float, int]] = []  # (ratio, where, value, steps above)
        worst: dict[str, float] = {}
        for tag, value in scalars.items():
            match = _TAG.match(tag)
            if match is None or not math.isfinite(value) or step < max(1, self.start_step):
                continue
            key = (match["tensor"], match["layer"])
            series = self._series.setdefault(key, _Series())
            if len(series.steps) >= self.min_history:
                ratio = self.trend_ratio(series.steps, series.values, step, value)
                worst[key[0]] = max(worst.get(key[0], 0.0), ratio)
                series.above = series.above + 1 if ratio > self.threshold else 0
                if series.above == 0:
                    series.warned = False
                elif series.above >= self.patience and not series.warned:
                    series.warned = True
                    alarms.append((ratio, f"{key[0]}/{key[1]}", value, series.above))
            series.steps.append(float(step))
            series.values.append(float(value))
        for tensor, ratio in worst.items():
            out[f"monitor/kurtosis_trend_ratio/{tensor}"] = ratio
        if not alarms:
            return out, []
        alarms.sort(reverse=True)
        self.warnings.append(
            {"step": step, "where": [w for _, w, _, _ in alarms], "line": self._line(step, alarms)}
        )
        return out, [self.warnings[-1]["line"]]

    def _line(self, step: int, alarms: list[tuple[float, str, float, int]]) -> str:
        shown = ", ".join(f"{w} {v:.2f} ({r:.2f}x)" for r, w, v, _ in alarms[:4])
        more = f" and {len(alarms) - 4} more" if len(alarms) > 4 else ""
        return (
            f"WARNING step {step}: kurtosis left its log-trend (> {self.threshold}x for "
            f"{self.patience}+ statistics steps) in {shown}{more}. In the paper such a departure "
            "preceded FP8 divergence by billions of tokens: watch train/grad_norm; a FOG block, a "
            "lower LR or BF16 attention are the remedies."
        )
