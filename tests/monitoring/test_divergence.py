"""Divergence detection on synthetic curves: real spikes at the right step, noise and warm-up
transients left alone, state that survives a restart, and the config checks."""

import math

import numpy as np
import pytest

from fogjax import config_lib
from fogjax.monitoring.divergence import DivergenceDetector, detector_from_config
from fogjax.train import preflight


def loss_curve(steps, rng, noise=0.15):
    """A pretraining-like loss: ln(4096) falling to ~4, with per-batch noise."""
    s = np.arange(1, steps + 1)
    return 4.0 + 4.3 * np.exp(-s / 60.0) + rng.normal(0, noise, steps)


def grad_curve(steps, rng):
    s = np.arange(1, steps + 1)
    return (0.3 + 2.0 * np.exp(-s / 30.0)) * np.exp(rng.normal(0, 0.25, steps))


def run(detector, losses, grads):
    for step, (loss, grad) in enumerate(zip(losses, grads, strict=True), start=1):
        found = detector.update(step, float(loss), float(grad))
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("seed", range(5))
def test_noise_and_warmup_transients_are_not_flagged(seed):
    rng = np.random.default_rng(seed)
    losses, grads = loss_curve(600, rng), grad_curve(600, rng)
    # A warm-up transient: the loss jumps by 2 nats and the grad norm by 50x around step 20-35,
    # then recovers, all within the 40 warm-up steps.
    losses[19:35] += 2.0
    grads[19:35] *= 50.0
    # Isolated bad batches after warm-up: one loss outlier, one 100x grad-norm outlier.
    losses[300] += 3.0
    grads[400] *= 100.0
    assert run(DivergenceDetector(start_step=40), losses, grads) is None
    # Without the warm-up window, the same transient is a divergence: the test can fail.
    found = run(DivergenceDetector(start_step=0), losses, grads)
    assert found is not None and found.step == 20


def test_loss_spike_is_found_at_its_onset():
    rng = np.random.default_rng(1)
    losses, grads = loss_curve(500, rng), grad_curve(500, rng)
    losses[349:] += np.linspace(1.5, 5.0, 151)  # Diverges from step 350 on.
    found = run(DivergenceDetector(start_step=40, loss_patience=10), losses, grads)
    assert found.reason == "loss_spike"
    assert found.step == 350 and found.detected_at == 359
    assert "running minimum" in found.detail
    # A spike shorter than the patience is not a divergence.
    losses = loss_curve(500, rng)
    losses[349:357] += 3.0
    assert run(DivergenceDetector(start_step=40, loss_patience=10), losses, grads) is None


def test_a_blow_up_inside_the_warmup_is_found_right_after_it():
    """The running minimum starts at the first loss: a loss that exploded during the warm-up and
    stays above where it started diverged, though it may be falling from 1e8 (the tiny OP block
    in BF16 at LR 3e-2); one that recovers below its initial loss + margin did not."""
    rng = np.random.default_rng(2)
    losses, grads = loss_curve(300, rng), grad_curve(300, rng)
    exploded = losses.copy()
    exploded[5:] = 10.0 ** np.interp(np.arange(5, 300), [5, 20, 300], [1.0, 8.0, 1.5])
    # The running-minimum rule alone (the blow-up rule, next test, finds it at once).
    only_spikes = {"start_step": 40, "grad_ratio": 0.0, "blowup_ratio": 0.0}
    found = run(DivergenceDetector(**only_spikes), exploded, grads)
    assert found.reason == "loss_spike" and found.step == 41 and found.detected_at == 50
    recovered = losses.copy()
    recovered[5:35] += 30.0  # Within the warm-up, then back on its curve.
    assert run(DivergenceDetector(**only_spikes), recovered, grads) is None


def test_a_single_blow_up_counts_at_once_even_when_the_loss_falls_back():
    """LR 1000 on the tiny model: one step at 1.2e7, then uniform predictions (the loss back at
    about its first value, ln V). The spike rules never fire on it (it does not stay up); the
    blow-up rule does, at that step, warm-up or not."""
    rng = np.random.default_rng(4)
    losses, grads = loss_curve(200, rng), grad_curve(200, rng)
    collapsed = losses.copy()
    collapsed[2] = 1.2e7  # Step 3.
    collapsed[3:] = losses[0] + rng.normal(0, 0.01, 197)  # Uniform from then on.
    spikes_only = DivergenceDetector(start_step=1, grad_ratio=0.0, blowup_ratio=0.0)
    assert run(spikes_only, collapsed, grads) is None
    found = run(DivergenceDetector(start_step=40), collapsed, grads)
    assert found.reason == "loss_blowup" and found.step == found.detected_at == 3
    assert "1.2e+07 is above 2x the first step's loss" in found.detail
    # A healthy run's worst warm-up transient stays well below twice the first loss.
    transient = losses.copy()
    transient[10:20] += 3.0
    assert run(DivergenceDetector(start_step=40), transient, grads) is None
    # The first loss survives a restart (a resumed run judges against the same one).
    first = DivergenceDetector()
    assert run(first, losses[:50], grads[:50]) is None
    resumed = DivergenceDetector()
    resumed.load_state_dict(first.state_dict())
    found = resumed.update(51, 2.01 * float(losses[0]), 1.0)
    assert found is not None and found.reason == "loss_blowup"


def test_grad_norm_spike_is_found_at_its_onset():
    rng = np.random.default_rng(2)
    losses, grads = loss_curve(500, rng), grad_curve(500, rng)
    grads[249:] *= 40.0  # The grad norm blows up at step 250; the loss has not moved yet.
    found = run(DivergenceDetector(start_step=40, grad_patience=5), losses, grads)
    assert found.reason == "grad_spike"
    assert found.step == 250 and found.detected_at == 254
    # Disabled detectors stay quiet on the same curves.
    assert run(DivergenceDetector(start_step=40, grad_ratio=0.0), losses, grads) is None


def test_non_finite_is_immediate_and_only_the_first_divergence_counts():
    detector = DivergenceDetector()
    assert detector.update(1, 8.0, 1.0) is None
    found = detector.update(2, math.nan, 1.0)
    assert found.reason == "non_finite" and found.step == found.detected_at == 2
    assert detector.update(3, math.inf, math.inf) is None
    assert detector.found == found


def test_state_round_trip_gives_the_same_detection():
    rng = np.random.default_rng(3)
    losses, grads = loss_curve(400, rng), grad_curve(400, rng)
    losses[299:] += 2.0
    straight = run(DivergenceDetector(start_step=20), losses, grads)
    first = DivergenceDetector(start_step=20)
    assert run(first, losses[:304], grads[:304]) is None  # Interrupted mid-spike.
    resumed = DivergenceDetector(start_step=20)
    resumed.load_state_dict(first.state_dict())
    found = None
    for step in range(305, 401):
        found = found or resumed.update(step, float(losses[step - 1]), float(grads[step - 1]))
    assert found == straight and found.step == 300


def test_config_fields_are_validated_and_default_to_the_warmup():
    config = config_lib.get_config("fog_flash", "tiny")
    assert detector_from_config(config).start_step == config.optim.warmup_steps
    config.log.divergence_start_step = 7
    assert detector_from_config(config).start_step == 7
    for field, value, needle in [
        ("on_divergence", "ignore", "log.on_divergence='ignore' must be 'stop' or 'continue'"),
        ("grad_spike_ratio", 0.5, "log.grad_spike_ratio=0.5 must be > 1"),
        ("loss_spike_patience", 0, "log.loss_spike_patience=0 must be >= 1"),
        ("loss_spike_margin", -1.0, "log.loss_spike_margin=-1.0 must be >= 0"),
        ("loss_blowup_ratio", 0.5, "log.loss_blowup_ratio=0.5 must be > 1 (or 0 = off)"),
    ]:
        bad = config_lib.get_config("fog_flash", "tiny")
        setattr(bad.log, field, value)
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            preflight.validate_train_config(bad)
