"""fogjax/train/divergence_history.py on its own: which recorded divergences a start comes after,
which are earlier, and what the run's summary keeps (the CLI end to end is
test_divergence_resume.py)."""

from __future__ import annotations

import json

import pytest

from fogjax import config_lib
from fogjax.monitoring.reporter import Reporter, TrainingDiverged
from fogjax.train import divergence_history as history

A = {"reason": "loss_blowup", "step": 30, "detected_at": 30, "detail": "loss 1e7", "tokens": 60}
B = {"reason": "loss_spike", "step": 50, "detected_at": 59, "detail": "stayed up", "tokens": 100}


def write_summary(workdir, divergence, earlier=()):
    record = {"status": "diverged" if divergence else "stopped", "divergence": divergence,
              "earlier_divergences": list(earlier)}  # fmt: skip
    (workdir / "summary.json").write_text(json.dumps(record))


def test_a_start_after_the_onset_is_refused_under_stop_and_one_before_it_is_not(tmp_path):
    write_summary(tmp_path, A)
    config = config_lib.get_config("fog_flash", "tiny")
    assert history.classify(str(tmp_path), 0, None) == ([], [A])  # A fresh start.
    assert history.classify(str(tmp_path), 28, None) == ([], [A])  # Before the onset's params.
    after, earlier = history.classify(str(tmp_path), 29, None)  # Checkpoint 29 produced loss 30.
    assert (after, earlier) == ([A], [])
    with pytest.raises(TrainingDiverged) as e:
        history.refuse_diverged_resume(after, 29, config, "/w/checkpoints", [20, 28, 29], "/w")
    message = str(e.value)
    assert "diverged at step 30 (loss_blowup: loss 1e7" in message
    assert "Last good checkpoint: step 28" in message and "mv /w/checkpoints/29" in message
    config.log.on_divergence = "continue"
    history.refuse_diverged_resume(after, 29, config, "/w/checkpoints", [29], "/w")


def test_a_later_trajectory_remembers_the_earlier_divergence_in_its_checkpoints(tmp_path):
    """Trajectory B resumed from before A's onset; killed (no new summary), its checkpoint 40 is
    after A's step but knows A as earlier: nothing to refuse. Its own divergence B is then the
    run's, A stays earlier, and both reach the summary."""
    write_summary(tmp_path, A)
    config = config_lib.get_config("fog_flash", "tiny")
    config.log.on_divergence = "continue"
    reporter = Reporter(config, str(tmp_path), 1e6, 20, checkpointer=None)
    history.carry(*history.classify(str(tmp_path), 20, None), reporter)
    assert reporter.summary()["earlier_divergences"] == [A]
    assert reporter.divergence.found is None
    state = reporter.state_dict()  # What checkpoint 40 of trajectory B holds.
    assert history.classify(str(tmp_path), 40, state) == ([], [])

    write_summary(tmp_path, B, earlier=[A])  # B diverged at 50, trained through (continue).
    resumed = Reporter(config, str(tmp_path), 1e6, 55, checkpointer=None)
    resumed.load_state_dict(state)  # A checkpoint saved before B was detected.
    history.carry(*history.classify(str(tmp_path), 55, state), resumed)
    summary = resumed.summary()
    assert summary["diverged"] and summary["divergence"]["step"] == 50
    assert summary["earlier_divergences"] == [A]
    resumed.close()
    reporter.close()
