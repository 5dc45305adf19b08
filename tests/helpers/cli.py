"""Running fogjax's command lines in subprocesses, as a user would, and reading what they wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO_ROOT

ROOT = str(REPO_ROOT)
# One CPU device per run (the test process itself uses 8 fake devices).
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}

SHORT = [
    "--config=configs/default.py",
    "--config.train.batch_size=8",
    "--config.train.seq_len=64",
    "--config.train.log_every=1",
    # Statistics on every step: one compiled step variant per process, not two (~9 s less on 2
    # cores for the tiny model); statistics do not change the numbers.
    "--config.train.stats_every=1",
    "--config.train.eval_batches=2",
    "--config.optim.warmup_steps=2",
    "--config.optim.cooldown_steps=2",
]


def train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "fogjax.train", f"--workdir={workdir}", *SHORT, *overrides]


def run(cmd, timeout=400):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def sigterm_after(cmd, prefix, timeout=300):
    """Runs ``cmd``, sends SIGTERM once it prints a line starting with ``prefix``, checks that it
    saved and exited cleanly, and returns the step it stopped at."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Stopped by signal at step" in rest, rest[-3000:]
    return int(rest.split("Stopped by signal at step ")[1].split(":")[0])


def scalars(workdir):
    acc = EventAccumulator(os.path.join(workdir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc, {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
