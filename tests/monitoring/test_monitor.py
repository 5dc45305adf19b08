"""Kurtosis early warning: quiet on a logarithmic trend, loud on a departure."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from fogjax.monitoring.kurtosis import KurtosisMonitor


def feed(monitor, steps, values_by_tag):
    lines, scalars = [], []
    for i, step in enumerate(steps):
        out, warn = monitor.update(step, {tag: v[i] for tag, v in values_by_tag.items()})
        lines += warn
        scalars.append(out)
    return scalars, lines


def test_trend_ratio_is_one_on_an_exact_log_trend():
    steps = [10, 20, 40, 80, 160]
    values = [3 + 0.5 * math.log(s) for s in steps]
    ratio = KurtosisMonitor.trend_ratio(steps, values, 320, 3 + 0.5 * math.log(320))
    assert ratio == pytest.approx(1.0, rel=1e-9)


def test_quiet_on_sublinear_growth_with_noise():
    rng = np.random.default_rng(0)
    steps = list(range(50, 5001, 50))
    values = [3 + 0.8 * math.log(s) + rng.normal(0, 0.1) for s in steps]
    scalars, lines = feed(KurtosisMonitor(), steps, {"kurtosis/qkv/layer_00": values})
    assert lines == []
    ratios = [s["monitor/kurtosis_trend_ratio/qkv"] for s in scalars if s]
    assert max(ratios) < 1.2


def test_warns_once_when_one_layer_leaves_its_trend():
    steps = list(range(100, 3001, 100))
    calm = [4 + 0.5 * math.log(s) for s in steps]
    # Layer 3 follows the trend, then grows exponentially from step 2000 on.
    breaking = [
        v * (1.0 if s < 2000 else 1.6 ** ((s - 1900) / 100))
        for s, v in zip(steps, calm, strict=True)
    ]
    monitor = KurtosisMonitor(threshold=1.5, patience=2)
    scalars, lines = feed(
        monitor, steps, {"kurtosis/qkv/layer_00": calm, "kurtosis/qkv/layer_03": breaking}
    )
    assert len(lines) == 1
    assert "qkv/layer_03" in lines[0] and "step 2100" in lines[0]
    assert "layer_00" not in lines[0]
    assert scalars[-1]["monitor/kurtosis_trend_ratio/qkv"] > 3


def test_one_line_per_step_worst_first_and_warmup_ignored():
    steps = list(range(10, 301, 10))
    tags = {}
    for layer in range(6):
        base = [3 + 0.3 * math.log(s) for s in steps]
        # Every layer departs at step 200, layer 5 the most; a wild warmup before step 50.
        tags[f"kurtosis/ffn_out/layer_{layer:02d}"] = [
            v * (5.0 if s < 50 else 1.0) * (1.0 if s < 200 else 2.0 + layer)
            for s, v in zip(steps, base, strict=True)
        ]
    _, lines = feed(KurtosisMonitor(start_step=50), steps, tags)
    assert len(lines) == 1 and "step 210" in lines[0]
    assert lines[0].index("layer_05") < lines[0].index("layer_04")  # worst first
    assert "and 2 more" in lines[0]
    # Fitted through the warmup, the trend slopes down and undershoots: a false alarm at step 120,
    # after which the real departure at step 200 raises no new line.
    _, lines = feed(KurtosisMonitor(), steps, tags)
    assert len(lines) == 1 and "step 120" in lines[0]


def test_ignores_non_kurtosis_tags_and_bad_settings():
    monitor = KurtosisMonitor()
    out, lines = monitor.update(10, {"train/loss": 2.0, "kurtosis/qkv/avg": 3.0})
    assert out == {} and lines == []
    with pytest.raises(ValueError, match="kurtosis_alarm_ratio"):
        KurtosisMonitor(threshold=0.9)


# --- The bounded state against the pre-bound implementation ----------------------------------
#
# _ReferenceKurtosisMonitor is KurtosisMonitor as it was before its state was bounded (commit
# 7c9b002: every (step, value) point kept, the trend fitted by np.polyfit on each update), kept
# here unchanged as the oracle: the bounded monitor must raise the same warnings at the same steps.

_REFERENCE_TAG = re.compile(r"^kurtosis/(?P<tensor>[^/]+)/(?P<layer>layer_\d+)$")


@dataclasses.dataclass
class _ReferenceSeries:
    steps: list[float] = dataclasses.field(default_factory=list)
    values: list[float] = dataclasses.field(default_factory=list)
    above: int = 0  # consecutive points above the threshold
    warned: bool = False


class _ReferenceKurtosisMonitor:
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
        self._series: dict[tuple[str, str], _ReferenceSeries] = {}
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
            self._series[(tensor, layer)] = _ReferenceSeries(**fields)
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
            match = _REFERENCE_TAG.match(tag)
            if match is None or not math.isfinite(value) or step < max(1, self.start_step):
                continue
            key = (match["tensor"], match["layer"])
            series = self._series.setdefault(key, _ReferenceSeries())
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


def random_stream(seed, stats_steps=400, every=25):
    """(step, scalars) of a seeded run: 3 tensors x 4 layers on noisy log trends of their own,
    with injected departures of random size and length (some shorter than any patience), NaNs,
    layers missing on some steps, and tags the monitor ignores."""
    rng = np.random.default_rng(seed)
    series = [(t, layer) for t in ("qkv", "ffn_out", "attn_out") for layer in range(4)]
    base = {k: (rng.uniform(2, 6), rng.uniform(0.05, 1.0)) for k in series}
    factor = {k: np.ones(stats_steps) for k in series}
    for k in series:
        for _ in range(rng.integers(0, 5)):
            start, length = rng.integers(0, stats_steps), rng.integers(1, 12)
            factor[k][start : start + length] *= rng.uniform(1.2, 4.0)
    stream = []
    for i in range(stats_steps):
        step = every * (i + 1)
        scalars = {"train/loss": float(rng.normal()), "kurtosis/qkv/avg": 3.0}
        for k in series:
            if rng.random() < 0.03:
                continue  # not reported this step
            a, b = base[k]
            value = (a + b * math.log(step)) * factor[k][i] * (1 + rng.normal(0, 0.05))
            scalars[f"kurtosis/{k[0]}/layer_{k[1]:02d}"] = (
                math.nan if rng.random() < 0.01 else float(value)
            )
        stream.append((step, scalars))
    return stream


def run_monitor(monitor, stream):
    """[(step, warning lines, trend ratios)] for every step of ``stream``."""
    return [(step, *reversed(monitor.update(step, scalars))) for step, scalars in stream]


def assert_same_reports(got, want):
    assert [(s, lines) for s, lines, _ in got] == [(s, lines) for s, lines, _ in want]
    for (_, _, ratios), (_, _, expected) in zip(got, want, strict=True):
        assert ratios.keys() == expected.keys()
        for tag, ratio in ratios.items():
            assert ratio == pytest.approx(expected[tag], rel=1e-9, abs=1e-12)


SETTINGS = [
    {},
    {"threshold": 1.3, "patience": 1, "min_history": 3},
    {"threshold": 2.0, "patience": 3, "min_history": 10, "start_step": 1000},
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("settings", SETTINGS)
def test_bounded_state_warns_exactly_as_the_reference(seed, settings):
    stream = random_stream(seed)
    want = run_monitor(_ReferenceKurtosisMonitor(**settings), stream)
    monitor = KurtosisMonitor(**settings)
    got = run_monitor(monitor, stream)
    assert_same_reports(got, want)
    # Not vacuous: the stream raises several warnings, some series more than once.
    wheres = [w for ws in monitor.warnings for w in ws["where"]]
    assert len(monitor.warnings) >= 3 and len(set(wheres)) < len(wheres)


def test_repeated_steps_fall_back_to_the_mean_like_the_reference():
    # Every point at one step: no slope can be fitted; both predict the mean of the values.
    stream = [(50, {"kurtosis/qkv/layer_00": v}) for v in [3.0, 3.2, 2.9, 3.1, 3.0, 3.05, 9.0, 9.5]]
    want = run_monitor(_ReferenceKurtosisMonitor(), stream)
    got = run_monitor(KurtosisMonitor(), stream)
    assert_same_reports(got, want)
    assert got[-1][1] and "step 50" in got[-1][1][0]


def test_resume_mid_stream_from_new_and_old_state_warns_as_uninterrupted():
    stream = random_stream(seed=2)
    want = run_monitor(_ReferenceKurtosisMonitor(), stream)
    cut = len(stream) // 2
    # Resumed from the bounded format, through JSON as in a checkpoint's metadata.
    first = KurtosisMonitor()
    head = run_monitor(first, stream[:cut])
    resumed = KurtosisMonitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same_reports(head + run_monitor(resumed, stream[cut:]), want)
    # Resumed from a checkpoint written before the bound (every point in steps/values lists).
    reference = _ReferenceKurtosisMonitor()
    run_monitor(reference, stream[:cut])
    old_state = json.loads(json.dumps(reference.state_dict()))
    assert "steps" in next(iter(old_state["series"].values()))
    converted = KurtosisMonitor()
    converted.load_state_dict(old_state)
    assert converted.warnings == reference.warnings
    assert "steps" not in next(iter(converted.state_dict()["series"].values()))
    assert_same_reports(head + run_monitor(converted, stream[cut:]), want)
    assert len(want[-1]) and sum(bool(lines) for _, lines, _ in want[cut:]) >= 1


def smooth_stream(stats_steps, layers=4):
    return [
        (25 * i, {f"kurtosis/qkv/layer_{k:02d}": 3 + 0.4 * math.log(25 * i) for k in range(layers)})
        for i in range(1, stats_steps + 1)
    ]


def test_state_size_does_not_grow_with_the_run():
    def size(monitor, stats_steps):
        run_monitor(monitor, smooth_stream(stats_steps))
        assert monitor.warnings == []
        return len(json.dumps(monitor.state_dict()))

    short, long = size(KurtosisMonitor(), 10), size(KurtosisMonitor(), 10_000)
    # 4 series; per series the count gains 3 digits and a float's repr may vary by a few chars.
    assert abs(long - short) <= 4 * 16
    # The reference grows with every point: the measure above would have seen it (1,000 points,
    # not 10,000: its fit is refitted to every point on every update).
    assert size(_ReferenceKurtosisMonitor(), 1000) > 50 * size(_ReferenceKurtosisMonitor(), 10)
