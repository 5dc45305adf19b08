"""Kurtosis early warning: quiet on a logarithmic trend, loud on a departure."""

import math

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
