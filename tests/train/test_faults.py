"""Faults a run survives (issue 21): its disk filling up, and a SIGKILL after a checkpoint. Each
one resumes with the same losses bit for bit, and nothing checkpointed is lost (TensorBoard
events included)."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from helpers.cli import run, scalars, train_cmd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fogjax.train.workdir import LOCK_FILE

pytestmark = pytest.mark.slow

FAST = ("--config.train.eval_every=0", "--config.precision.recipe=bf16",
        "--config.optim.warmup_steps=1", "--config.optim.cooldown_steps=1")  # fmt: skip


def losses_per_file(workdir):
    """[{step: train/loss}] of each TensorBoard event file, oldest first (one per start)."""
    files = sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")),
                   key=os.path.getmtime)  # fmt: skip
    out = []
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        out.append({e.step: e.value for e in acc.Scalars("train/loss")} if "train/loss" in tags
                   else {})  # fmt: skip
    return out


@pytest.fixture
def small_disk(tmp_path):
    """An 80 MiB tmpfs: room for one checkpoint of the tiny model (~50 MiB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_exits_4_naming_the_disk_writes_the_summary_and_resumes(small_disk):
    """It used to print ~400 lines of orbax tracebacks, exit 2 ('bad input') and leave no
    summary; the save of step 4 is now refused before orbax writes anything (the fallback, a
    disk that fills up during a save, is converted the same way: test_disk_space.py)."""
    workdir = str(small_disk / "run")
    cmd = train_cmd(workdir, "--config.train.steps=4", "--config.train.ckpt_every=2", *FAST)
    out = run(cmd)
    assert out.returncode == 4, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stderr.startswith("ERROR: "), out.stderr[-3000:]
    for needle in ("Checkpoint step 4 was not written", f"mounted at {small_disk}", "MiB free",
                   "The latest checkpoint is step 2", "run the same command again"):  # fmt: skip
        assert needle in out.stderr, (needle, out.stderr)
    summary = json.loads(pathlib.Path(workdir, "summary.json").read_text())
    assert summary["status"] == "disk_full" and summary["last_checkpoint"] == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    out = run(cmd)  # Space is back: the same command resumes from step 2.
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 2" in out.stdout and "Done: step 4" in out.stdout
    first, resumed = losses_per_file(workdir)
    assert sorted(first) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert {s: first[s] for s in (3, 4)} == resumed  # Bit for bit.
    summary = json.loads(pathlib.Path(workdir, "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 4


# The real CLI, killed the way the OOM killer would do it, right after checkpoint 2 is on disk
# and step 3 was reported (a watcher polling the run from outside would race its steps).
KILLED_AFTER_CHECKPOINT_2 = """
import os, runpy, signal, sys
from fogjax.checkpoint import manager
save = manager.Checkpointer.save
def save_or_die(self, step, *args, **kwargs):
    if step == 3:
        self.wait()  # Checkpoint 2 committed.
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, step, *args, **kwargs)
manager.Checkpointer.save = save_or_die
sys.argv = ["fogjax.train", *sys.argv[1:]]
runpy.run_module("fogjax.train", run_name="__main__")
"""


@pytest.mark.slow
def test_after_a_sigkill_tensorboard_has_every_checkpointed_step(tmp_path):
    """Events were flushed only at close: a run killed after checkpointing step N lost the
    events of steps before N for good (the resumed run starts after N). They are now flushed
    with every checkpoint."""
    workdir = str(tmp_path / "run")
    cmd = train_cmd(workdir, "--config.train.steps=4", "--config.train.ckpt_every=1", *FAST)
    out = run([sys.executable, "-c", KILLED_AFTER_CHECKPOINT_2, *cmd[3:]])
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    (killed,) = losses_per_file(workdir)
    assert {1, 2} <= set(killed), sorted(killed)

    time.sleep(1.1)  # The resumed run's event file is named by the second it starts in.
    out = run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 2" in out.stdout and "Done: step 4" in out.stdout
    _, values = scalars(workdir)
    assert sorted(values["train/loss"]) == [1, 2, 3, 4]  # Every step, nothing lost.
    killed, resumed = losses_per_file(workdir)
    assert sorted(resumed) == [3, 4] and killed[3] == resumed[3]  # Step 3 again, bit for bit.
