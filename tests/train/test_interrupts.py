"""A second Ctrl-C aborts at once with a message that says so (issue 21: it printed only
'ERROR: '), exit 130, and the lock is released."""

from __future__ import annotations

import os
import sys

import pytest
from helpers.cli import run, train_cmd

from fogjax.train.control import SECOND_CTRL_C
from fogjax.train.workdir import LOCK_FILE

# The real CLI, real signal handling and lock, with the training loop replaced by two Ctrl-Cs:
# a real run finishes its step and saves between them, so whether the second one lands in
# time would be a race.
TWO_CTRL_C = """
import os, runpy, signal, sys, time
import fogjax.train.loop as loop
from fogjax.train.control import StopRequest
from fogjax.train.workdir import hold_workdir

def train_and_evaluate(config, workdir):
    with hold_workdir(workdir), StopRequest():
        os.kill(os.getpid(), signal.SIGINT)  # The first: stop at the next step boundary.
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # The second: abort now.
        time.sleep(60)
    raise AssertionError("the second Ctrl-C did not interrupt")

loop.train_and_evaluate = train_and_evaluate
sys.argv = ["fogjax.train", *sys.argv[1:]]
runpy.run_module("fogjax.train", run_name="__main__")
"""


@pytest.mark.slow
def test_a_second_ctrl_c_says_what_happened_and_how_to_resume(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    out = run([sys.executable, "-c", TWO_CTRL_C, *train_cmd(workdir)[3:]], timeout=120)
    assert out.returncode == 130, out.stderr[-3000:]
    assert out.stderr.strip() == f"ERROR: {SECOND_CTRL_C}", out.stderr[-3000:]
    assert "Run the same command again to resume" in SECOND_CTRL_C
    assert not os.path.exists(workdir / LOCK_FILE)
