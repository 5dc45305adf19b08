"""LR 1000, end to end through the CLI (issue 21). The loss blew up for one step and the model
collapsed to uniform predictions; the detector missed it, the later NaN error named a "last good
checkpoint" saved after the collapse, and following its advice trained the dead model to
'completed' with ``diverged: false`` in summary.json. Now: the blow-up stops the run at once
(exit 3) naming the checkpoint from before it and the command that moves the later ones aside;
a rerun that does not move them is refused without writing anything; one that does resumes from
the good checkpoint, and summary.json keeps the divergence."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest
from helpers.cli import run, train_cmd

pytestmark = pytest.mark.slow

FLAGS = ("--config.train.steps=4", "--config.train.ckpt_every=1", "--config.train.eval_every=0",
         "--config.optim.warmup_steps=1", "--config.optim.cooldown_steps=1",
         "--config.precision.recipe=bf16")  # fmt: skip


def snapshot(workdir):
    out = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), workdir)] = (
                stat.st_size,
                stat.st_mtime_ns,
            )
    return out


def summary(workdir):
    return json.loads(pathlib.Path(workdir, "summary.json").read_text())


@pytest.mark.slow
def test_a_blow_up_stops_at_once_and_its_record_survives_the_resume(tmp_path):
    workdir = str(tmp_path / "run")
    checkpoints = os.path.join(workdir, "checkpoints")
    # LR 0 at step 1 (warm-up), 1000 at step 2: step 3's loss comes from blown-up parameters.
    out = run(train_cmd(workdir, *FLAGS, "--config.optim.peak_lr=1000"))
    assert out.returncode == 3, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "Training diverged (loss_blowup) at step 3 (confirmed at step 3)" in out.stderr
    assert f"Last good checkpoint: step 1 in {checkpoints}" in out.stderr, out.stderr
    move = re.search(r"move the later ones aside: (mkdir -p .*?) ; then rerun", out.stderr)
    assert move and move.group(1) == (
        f"mkdir -p {checkpoints}.diverged && mv {checkpoints}/2 {checkpoints}.diverged/"
    )
    assert sorted(os.listdir(checkpoints)) == ["1", "2"]  # Step 3's state was never written.
    diverged = summary(workdir)
    assert diverged["status"] == "diverged" and diverged["diverged"] is True
    assert (diverged["divergence"]["reason"], diverged["divergence"]["step"]) == ("loss_blowup", 3)

    # The old advice: rerun on this workdir with a lower LR. It would resume checkpoint 2, the
    # blown-up model: refused, and nothing is written.
    lower_lr = train_cmd(workdir, *FLAGS, "--config.optim.peak_lr=0.003")
    before = snapshot(workdir)
    out = run(lower_lr)
    assert out.returncode == 3, out.stderr[-3000:]
    for needle in ("This run diverged at step 3 (loss_blowup", "checkpoint step 2, which this "
                   "start would resume", move.group(1), "on_divergence=continue",
                   "Nothing was changed"):  # fmt: skip
        assert needle in out.stderr, (needle, out.stderr)
    assert snapshot(workdir) == before

    # The advice followed: checkpoint 2 moved aside (kept), the rerun resumes from step 1.
    subprocess.run(move.group(1), shell=True, check=True)
    out = run(lower_lr)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 1" in out.stdout and "Done: step 4" in out.stdout
    assert os.listdir(f"{checkpoints}.diverged") == ["2"]
    done = summary(workdir)
    assert done["status"] == "completed" and done["diverged"] is False
    assert done["earlier_divergences"] == [diverged["divergence"]]  # Not lost.
