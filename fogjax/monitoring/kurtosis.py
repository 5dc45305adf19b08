"""Divergence early warning from kurtosis trends (docs/spec.md §4).

In a failing FP8DPA run the paper saw QKV kurtosis leave its sub-linear / logarithmic growth at
about 3B tokens, the gradient norm spike at 12B and the loss diverge at 15B. No fixed threshold
exists: the signal is a departure from the tensor's own trend. For every probed tensor and layer
this monitor fits kurtosis = a + b log(step) to the history seen so far (excluding the newest
point) and reports the newest value's ratio to that fit. A ratio above ``threshold`` on
``patience`` consecutive statistics steps raises a warning, once per (tensor, layer) until it
returns under the threshold; the warnings of one step are reported as one line, worst first.
Points before ``start_step`` (the LR warmup, where kurtosis moves fast anyway) are ignored.

A series is not kept point by point: a least-squares line in (log step, value) depends on the
points only through n, their means and their centred second moments (:class:`_Trend`, float64,
updated with Welford's recurrences, the numerically stable form of the running sums n, Σx, Σy,
Σx², Σxy). The fit is therefore exact with O(1) state per series, whatever the run's length. The
monitor's whole state (these statistics, the patience counters and the warnings raised)
round-trips through :meth:`KurtosisMonitor.state_dict`; the trainer saves it in each checkpoint,
so a resumed run warns exactly as an uninterrupted one. Checkpoints written before the bound
(every point as ``steps`` / ``values`` lists) load into the same statistics.
"""

from __future__ import annotations

import dataclasses
import math
import re

_TAG = re.compile(r"^kurtosis/(?P<tensor>[^/]+)/(?P<layer>layer_\d+)$")


@dataclasses.dataclass
class _Trend:
    """The least-squares line y = a + b x through the points added so far, from O(1) statistics.

    ``mean_x``, ``mean_y``: the means; ``m2_x`` = Σ(x - mean_x)²; ``c_xy`` = Σ(x - mean_x)(y -
    mean_y). Updated by Welford's recurrences, so no Σx² - (Σx)²/n cancellation. ``m2_x`` is 0
    exactly when every x so far is the same (each update adds dx * (x - new mean), both factors
    of dx's sign), which is when the line is undetermined and the fit is the mean of y.
    """

    n: int = 0
    mean_x: float = 0.0
    mean_y: float = 0.0
    m2_x: float = 0.0
    c_xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        self.n += 1
        dx = x - self.mean_x
        self.mean_x += dx / self.n
        self.mean_y += (y - self.mean_y) / self.n
        self.m2_x += dx * (x - self.mean_x)
        self.c_xy += dx * (y - self.mean_y)

    def predict(self, x: float) -> float:
        if self.m2_x > 0:
            return self.mean_y + self.c_xy / self.m2_x * (x - self.mean_x)
        return self.mean_y


_TREND_FLOATS = ("mean_x", "mean_y", "m2_x", "c_xy")


@dataclasses.dataclass
class _Series:
    trend: _Trend = dataclasses.field(default_factory=_Trend)  # of (log step, value)
    above: int = 0  # consecutive points above the threshold
    warned: bool = False

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self.trend), "above": self.above, "warned": self.warned}

    @classmethod
    def from_dict(cls, fields: dict[str, object]) -> _Series:
        """Reads :meth:`to_dict`'s output, or the pre-bound format (every point in ``steps`` /
        ``values``), whose points are replayed into the statistics."""
        fields = dict(fields)
        above, warned = int(fields.pop("above", 0)), bool(fields.pop("warned", False))
        if "steps" in fields:
            trend = _Trend()
            for step, value in zip(fields["steps"], fields["values"], strict=True):
                trend.add(math.log(float(step)), float(value))
        else:
            trend = _Trend(n=int(fields["n"]), **{k: float(fields[k]) for k in _TREND_FLOATS})
        return cls(trend, above, warned)


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
        """JSON-able state: every series' fit statistics and counters (a fixed size per series,
        however long the run) and the warnings so far."""
        series = {f"{t}/{layer}": s.to_dict() for (t, layer), s in self._series.items()}
        return {"series": series, "warnings": list(self.warnings)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restores :meth:`state_dict`'s output, or that of the pre-bound format."""
        self._series = {}
        for key, fields in dict(state.get("series", {})).items():
            tensor, layer = key.rsplit("/", 1)
            self._series[(tensor, layer)] = _Series.from_dict(fields)
        self.warnings = list(state.get("warnings", []))

    @staticmethod
    def _ratio(trend: _Trend, step: float, value: float) -> float:
        return value / max(trend.predict(math.log(step)), 1e-6)

    @staticmethod
    def trend_ratio(steps: list[float], values: list[float], step: float, value: float) -> float:
        """value / (a + b log step), the fit by least squares over (steps, values)."""
        trend = _Trend()
        for s, v in zip(steps, values, strict=True):
            trend.add(math.log(float(s)), float(v))
        return KurtosisMonitor._ratio(trend, step, value)

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
            if series.trend.n >= self.min_history:
                ratio = self._ratio(series.trend, step, value)
                worst[key[0]] = max(worst.get(key[0], 0.0), ratio)
                series.above = series.above + 1 if ratio > self.threshold else 0
                if series.above == 0:
                    series.warned = False
                elif series.above >= self.patience and not series.warned:
                    series.warned = True
                    alarms.append((ratio, f"{key[0]}/{key[1]}", value, series.above))
            series.trend.add(math.log(step), float(value))
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
