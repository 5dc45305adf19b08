"""python -m fogjax.evaluate / fogjax.generate on bad input (issue 21): one clean line naming the
flag or the checkpoint and the fix, exit 2, and the run's workdir left exactly as it was."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from helpers.cli import run, train_cmd

from fogjax.evaluate.loss import evaluate_checkpoint

pytestmark = pytest.mark.slow


def snapshot(workdir):
    """{relative path: (size, mtime)} of every file and folder under ``workdir``."""
    found = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, workdir)] = (stat.st_size, stat.st_mtime_ns)
    return found


def assert_clean_error(out, *needles):
    assert out.returncode == 2, out.stderr[-3000:]
    for noise in ("Traceback", "Event loop is closed"):
        assert noise not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4. Its train step is test_faults' (and
    test_divergence_resume's lower-LR run's): the suite's shared compilation cache compiles it
    once for all three."""
    workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
    flags = ["--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.eval_every=0",
             "--config.optim.warmup_steps=1", "--config.optim.cooldown_steps=1",
             "--config.precision.recipe=bf16"]  # fmt: skip
    out = run(train_cmd(workdir, *flags))
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    return workdir


def evaluate(workdir, *flags):
    return run([sys.executable, "-m", "fogjax.evaluate", f"--workdir={workdir}", *flags])


def test_batches_below_one_are_refused(trained):
    """--batches=-1 exited 0 with loss 0.0 and perplexity 1.0; --batches=0 silently used 4."""
    before = snapshot(trained)
    out = evaluate(trained, "--batches=-1")
    assert_clean_error(out, "--batches=-1 must be >= 1", "train.eval_batches")
    assert '"loss"' not in out.stdout
    with pytest.raises(ValueError, match=r"--batches=0 must be >= 1"):  # Before loading anything.
        evaluate_checkpoint(trained, batches=0)
    assert snapshot(trained) == before


def test_explicit_step_that_is_truncated_or_missing_names_it_and_the_steps_kept(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    state = os.path.join(workdir, "checkpoints", "2", "state")
    largest = max(
        (os.path.join(root, f) for root, _, files in os.walk(state) for f in files),
        key=os.path.getsize,
    )
    with open(largest, "r+b") as f:
        f.truncate(1000)
    before = snapshot(workdir)
    out = evaluate(workdir, "--step=2")
    assert_clean_error(
        out, "Checkpoint step 2 in", "cannot be read", "truncated", "holds steps [2, 4]", "--step"
    )
    out = run([sys.executable, "-m", "fogjax.generate", f"--workdir={workdir}", "--step=3",
               "--prompt=The"])  # fmt: skip
    assert_clean_error(out, "No checkpoint step 3 in", "holds steps [2, 4]", "Leave out --step")
    assert snapshot(workdir) == before


# The real CLI with lm_eval unimportable, as on a machine without requirements-eval.txt.
WITHOUT_LM_EVAL = """
import runpy, sys
sys.modules["lm_eval"] = None  # import lm_eval -> ModuleNotFoundError(name='lm_eval')
sys.argv = ["fogjax.evaluate", *sys.argv[1:]]
runpy.run_module("fogjax.evaluate", run_name="__main__")
"""


def test_tasks_without_lm_eval_names_the_requirements_file(tmp_path):
    workdir = tmp_path / "never-read"
    out = run([sys.executable, "-c", WITHOUT_LM_EVAL, f"--workdir={workdir}",
               "--tasks=fog_downstream"])  # fmt: skip
    assert_clean_error(out, "--tasks needs lm-evaluation-harness", "requirements-eval.txt")
    assert not workdir.exists()
