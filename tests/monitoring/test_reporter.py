"""The Reporter called directly (no training, no jit): one-step-late reporting, NaN and spike
handling, its state across a restart, and the run summary's numbers."""

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fogjax import config_lib
from fogjax.monitoring.reporter import Reporter, TrainingDiverged

LAYERS = 4  # The tiny config's.


class FakeCheckpointer:
    """What the Reporter asks of a Checkpointer: the saved steps and where they are."""

    def __init__(self, directory, latest=None, steps=None):
        self.directory = pathlib.Path(directory)
        self.steps = steps if steps is not None else ([] if latest is None else [latest])

    def latest_step(self):
        return self.steps[-1] if self.steps else None

    def all_steps(self):
        return list(self.steps)


def make_config(**log):
    config = config_lib.get_config("fog_flash", "tiny")
    config.optim.warmup_steps = 2  # Kurtosis points are ignored before this step.
    config.log.divergence_start_step = 0
    config.log.grad_spike_ratio = 0.0  # Only loss spikes, unless a test asks.
    config.log.loss_spike_patience = 3
    for key, value in log.items():
        setattr(config.log, key, value)
    return config


def raw_metrics(loss=3.0, grad_norm=1.0, kurtosis=None):
    """One step's device metrics as train/step.py returns them (numpy / jax scalars), with the
    per-layer activation statistics on statistics steps: ``kurtosis`` {tensor: [L] values}."""
    finite = bool(np.isfinite(loss) and np.isfinite(grad_norm))
    raw = {
        "loss": np.float32(loss),
        "lr": jnp.float32(1e-3),
        "grad_norm": np.float32(grad_norm),
        "param_norm": np.float32(20.0),
        "update_norm": np.float32(0.01),
        "finite": np.bool_(finite),
    }
    if kurtosis is not None:
        raw["kurtosis"] = {t: np.asarray(v, np.float32) for t, v in kurtosis.items()}
        raw["act_rms"] = {t: np.ones(LAYERS, np.float32) for t in kurtosis}
        raw["act_amax"] = {t: np.full(LAYERS, 8.0, np.float32) for t in kurtosis}
    return raw


def make_reporter(tmp_path, config, start_step=0, latest=None, name="run", steps=None):
    workdir = tmp_path / name
    ckpt = FakeCheckpointer(workdir / "checkpoints", latest, steps)
    return Reporter(config, str(workdir), 1e6, start_step, ckpt)


def scalars(workdir, prefix=""):
    """{tag: [(step, value)]} of the run's TensorBoard events."""
    ea = EventAccumulator(str(pathlib.Path(workdir) / "tb"))
    ea.Reload()
    return {
        tag: [(e.step, e.value) for e in ea.Scalars(tag)]
        for tag in ea.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def test_steps_are_reported_one_late_and_once(tmp_path):
    reporter = make_reporter(tmp_path, make_config())
    losses = {1: 5.0, 2: 4.5, 3: 4.25}
    reporter.step_done(1, raw_metrics(losses[1]))
    assert reporter.last == {} and reporter.last_step == 0  # Queued, not reported yet.
    reporter.step_done(2, raw_metrics(losses[2]))
    assert reporter.last_step == 1 and reporter.last["train/loss"] == losses[1]
    reporter.step_done(3, raw_metrics(losses[3]))
    assert reporter.last_step == 2 and reporter.last["train/loss"] == losses[2]
    reporter.flush()  # Before a save: the queued step now.
    assert reporter.last_step == 3 and reporter.last["train/loss"] == losses[3]
    reporter.flush()  # Nothing queued: nothing reported again.
    reporter.close()
    events = scalars(tmp_path / "run")
    assert events["train/loss"] == list(losses.items())
    assert [s for s, _ in events["train/grad_norm"]] == [1, 2, 3]
    assert events["train/finite"] == [(1, 1.0), (2, 1.0), (3, 1.0)]


def test_statistics_steps_write_per_layer_kurtosis_and_the_trend_ratio(tmp_path):
    reporter = make_reporter(tmp_path, make_config())
    for step in range(2, 21, 2):
        kurt = {"qkv": [3 + 0.5 * math.log(step)] * LAYERS}
        reporter.step_done(step, raw_metrics(kurtosis=kurt))
    reporter.flush()
    reporter.close()
    events = scalars(tmp_path / "run")
    assert [s for s, _ in events["kurtosis/qkv/layer_03"]] == list(range(2, 21, 2))
    assert events["kurtosis/qkv/avg"][-1][1] == pytest.approx(3 + 0.5 * math.log(20), rel=1e-6)
    assert "act_amax/qkv/layer_00" in events
    # A ratio once the trend has min_history (6) points: steps 14 to 20, all on the trend.
    ratios = events["monitor/kurtosis_trend_ratio/qkv"]
    assert [s for s, _ in ratios] == [14, 16, 18, 20]
    assert all(r == pytest.approx(1.0, rel=1e-5) for _, r in ratios)
    assert reporter.last_kurtosis == {"kurtosis/qkv/avg": round(3 + 0.5 * math.log(20), 3)}


@pytest.mark.parametrize("latest", [5, None])
def test_non_finite_loss_raises_naming_the_step_and_the_last_good_checkpoint(tmp_path, latest):
    reporter = make_reporter(tmp_path, make_config(on_divergence="continue"), latest=latest)
    for step in range(1, 7):
        reporter.step_done(step, raw_metrics(3.0))
    reporter.step_done(7, raw_metrics(math.nan))  # Queued: not looked at yet.
    with pytest.raises(TrainingDiverged) as raised:
        reporter.step_done(8, raw_metrics(3.0))
    message = str(raised.value)
    assert "NaN/inf at step 7" in message
    good = "step 5" if latest else "none"
    assert f"Last good checkpoint: {good} in {tmp_path / 'run' / 'checkpoints'}" in message
    assert reporter.last_step == 6  # The last finite step.
    summary = reporter.summary()
    assert summary["diverged"] and summary["divergence"]["reason"] == "non_finite"
    assert summary["divergence"]["step"] == 7


def spiking_run(reporter, steps=20):
    """Loss 3.0, then 6.0 from step 11 on (3 nats over the minimum, patience 3: confirmed at 13)."""
    for step in range(1, steps + 1):
        reporter.step_done(step, raw_metrics(3.0 if step <= 10 else 6.0))
    reporter.flush()


def test_loss_spike_stops_the_run_under_on_divergence_stop(tmp_path):
    reporter = make_reporter(tmp_path, make_config(on_divergence="stop"), steps=[8, 9, 10])
    with pytest.raises(
        TrainingDiverged, match=r"loss_spike\) at step 11 \(confirmed at step 13"
    ) as e:
        spiking_run(reporter)
    # Step 11's loss came from checkpoint 10's parameters: 9 is the newest from before it, and
    # 10 must be moved aside for a rerun to resume from 9.
    directory = tmp_path / "run" / "checkpoints"
    assert f"Last good checkpoint: step 9 in {directory}" in str(e.value)
    assert f"mkdir -p {directory}.diverged && mv {directory}/10 {directory}.diverged/" in str(
        e.value
    )
    assert "on_divergence=continue" in str(e.value)
    assert reporter.last_step == 13  # Raised as step 13 was reported, not later.


def test_nan_after_a_blow_up_trained_through_names_a_checkpoint_from_before_the_blow_up(
    tmp_path, capsys
):
    """LR 1000: a blow-up at step 3, then (trained through) NaN at step 6. The NaN error named
    the latest checkpoint, saved after the collapse; it now names one from before step 3."""
    reporter = make_reporter(tmp_path, make_config(on_divergence="continue"), steps=[1, 2, 4, 5])
    for step, loss in enumerate([8.4, 8.5, 1.2e7, 8.3, 8.3], start=1):
        reporter.step_done(step, raw_metrics(loss))
    reporter.flush()
    assert "WARNING: Training diverged (loss_blowup) at step 3" in capsys.readouterr().out
    with pytest.raises(TrainingDiverged) as e:
        reporter.step_done(6, raw_metrics(math.nan))
        reporter.flush()
    message, directory = str(e.value), tmp_path / "run" / "checkpoints"
    assert "NaN/inf at step 6" in message
    assert f"Last good checkpoint: step 1 in {directory}" in message
    assert f"mv {directory}/2 {directory}/4 {directory}/5 {directory}.diverged/" in message
    assert reporter.summary()["divergence"]["reason"] == "loss_blowup"


def test_loss_spike_only_warns_under_on_divergence_continue(tmp_path, capsys):
    reporter = make_reporter(tmp_path, make_config(on_divergence="continue"))
    spiking_run(reporter)
    out = capsys.readouterr().out
    assert "WARNING: Training diverged (loss_spike) at step 11 (confirmed at step 13)" in out
    assert "Training on (log.on_divergence=continue)" in out
    assert out.count("Training diverged") == 1  # Only the first divergence is reported.
    assert reporter.last_step == 20
    summary = reporter.summary()
    assert summary["diverged"] is True
    assert summary["divergence"]["step"] == 11 and summary["divergence"]["detected_at"] == 13
    assert summary["divergence"]["tokens"] == 11 * summary["tokens_per_step"]


def resumable_stream():
    """(step, raw) for steps 1-60: a loss that falls to 3.0 and jumps to 4.5 at step 31 (a spike
    only against the minimum seen before step 30), and kurtosis on even steps whose qkv layer 1
    leaves its trend from step 36 (2 points after step 30: too few for a fresh monitor)."""
    stream = []
    for step in range(1, 61):
        loss = 3.0 + 2.0 * math.exp(-step / 5) if step < 31 else 4.5
        kurt = None
        if step % 2 == 0:
            trend = 3 + 0.5 * math.log(step)
            kurt = {"qkv": [trend] * LAYERS, "ffn_out": [trend + 1] * LAYERS}
            if step >= 36:
                kurt["qkv"][1] = 3 * trend
        stream.append((step, raw_metrics(loss, kurtosis=kurt)))
    return stream


def feed(reporter, stream):
    for step, raw in stream:
        reporter.step_done(step, raw)
    reporter.flush()
    reporter.close()


def comparable(workdir, after):
    """The events after step ``after``, less the wall-clock speed (perf/*)."""
    return {
        tag: [(s, v) for s, v in points if s > after]
        for tag, points in scalars(workdir).items()
        if not tag.startswith("perf/")
    }


def test_state_round_trip_reports_as_an_uninterrupted_run(tmp_path, capsys):
    config = make_config(on_divergence="continue")
    stream, cut = resumable_stream(), 30
    whole = make_reporter(tmp_path, config, name="whole")
    feed(whole, stream)
    whole_out = capsys.readouterr().out
    first = make_reporter(tmp_path, config, name="resumed")
    feed(first, stream[:cut])  # flush() before the save, as the loop does.
    state = json.loads(json.dumps(first.state_dict()))  # Through the checkpoint's JSON metadata.
    capsys.readouterr()
    resumed = make_reporter(tmp_path, config, start_step=cut, name="resumed")
    resumed.load_state_dict(state)
    feed(resumed, stream[cut:])
    resumed_out = capsys.readouterr().out
    assert resumed.summary() == whole.summary()
    assert comparable(tmp_path / "resumed", cut) == comparable(tmp_path / "whole", cut)

    def warnings(out):  # The two runs' workdirs differ in name only.
        return [
            line.replace(str(tmp_path / "resumed"), "<workdir>").replace(
                str(tmp_path / "whole"), "<workdir>"
            )
            for line in out.splitlines()
            if line.startswith("WARNING")
        ]

    assert warnings(resumed_out) == warnings(whole_out)
    # Not vacuous: the uninterrupted run warns after the cut, which a restart that drops the
    # state misses (no kurtosis history, no loss minimum).
    summary = whole.summary()
    assert summary["first_qkv_warning_step"] == 38 and summary["divergence"]["step"] == 31
    forgetful = make_reporter(tmp_path, config, start_step=cut, name="forgetful")
    feed(forgetful, stream[cut:])
    lost = forgetful.summary()
    assert lost["first_qkv_warning_step"] is None and not lost["diverged"]


def test_load_state_dict_of_none_keeps_the_fresh_state(tmp_path):
    reporter = make_reporter(tmp_path, make_config())
    fresh = reporter.state_dict()
    reporter.load_state_dict(None)
    reporter.load_state_dict({})
    assert reporter.state_dict() == fresh


def test_summary_fields(tmp_path):
    config = make_config(on_divergence="continue")
    reporter = make_reporter(tmp_path, config)
    quiet = reporter.summary()
    tps = config.train.batch_size * config.train.seq_len
    assert quiet["tokens_per_step"] == tps
    assert quiet["diverged"] is False and quiet["divergence"] is None
    assert quiet["first_kurtosis_warning_step"] is None and quiet["kurtosis_warnings"] == []
    assert quiet["final_train_loss"] is None and quiet["max_qkv_kurtosis"] is None
    # ffn_out layer 2 leaves its trend from step 20 (warned at 22), qkv layer 0 from step 30
    # (warned at 32); the loss ends at 2.5.
    for step in range(2, 41, 2):
        trend = 3 + 0.5 * math.log(step)
        kurt = {"qkv": [trend] * LAYERS, "ffn_out": [trend] * LAYERS}
        if step >= 20:
            kurt["ffn_out"][2] = 4 * trend
        if step >= 30:
            kurt["qkv"][0] = 4 * trend
        reporter.step_done(step, raw_metrics(2.5, kurtosis=kurt))
    reporter.flush()
    reporter.on_eval(40, {"loss": 2.75, "perplexity": math.exp(2.75)})
    summary = reporter.summary()
    assert summary["first_kurtosis_warning_step"] == 22
    assert summary["first_kurtosis_warning_tokens"] == 22 * tps
    assert summary["first_qkv_warning_step"] == 32
    assert summary["first_qkv_warning_tokens"] == 32 * tps
    assert summary["kurtosis_warnings"] == [
        {"step": 22, "where": ["ffn_out/layer_02"]},
        {"step": 32, "where": ["qkv/layer_00"]},
    ]
    assert summary["diverged"] is False
    assert summary["final_train_loss"] == 2.5 and summary["final_eval_loss"] == 2.75
    assert summary["max_qkv_kurtosis"] == pytest.approx(4 * (3 + 0.5 * math.log(40)), rel=1e-6)
    json.dumps(summary)  # It goes to summary.json.
    reporter.close()
