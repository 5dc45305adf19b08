"""End to end: the real CLI in subprocesses — events, checkpoints, resume after SIGTERM, NaN stop,
evaluation, learning."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import sys

import numpy as np
import pytest
from helpers.cli import run, scalars, sigterm_after, train_cmd

pytestmark = pytest.mark.slow  # module fixtures train or run commands


# The module's one straight run (fixture ``trained``); the resume test repeats it with a SIGTERM.
TRAINED = (
    "--config.train.steps=10",
    "--config.train.ckpt_every=5",
    "--config.train.eval_every=10",
    "--config.log.peak_tflops=1.0",
    "--config.train.stats_every=2",  # both step variants, and the statistics cadence checked
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("entry") / "run")
    out = run(train_cmd(workdir, *TRAINED))
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_entry_writes_every_tag_and_a_checkpoint(trained):
    workdir, out = trained
    acc, values = scalars(workdir)
    tags = set(values)
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/param_norm",
        "train/update_norm",
        "perf/step_time",
        "perf/tokens_per_sec_per_device",
        "perf/mfu",
        "eval/loss",
        "eval/perplexity",
        "kurtosis/qkv/avg",
        "kurtosis/qkv/layer_00",
        "kurtosis/ffn_act/layer_03",
        "kurtosis/block_out/avg",
    ]:
        assert tag in tags, tag
    fp8 = [t for t in tags if t.startswith("fp8/")]
    assert any("scale" in t for t in fp8) and any("amax" in t for t in fp8), fp8[:10]
    assert sorted(values["train/loss"]) == list(range(1, 11))
    assert set(values["kurtosis/qkv/avg"]) <= {1, 2, 4, 6, 8, 10}  # first and every stats_every
    assert all(np.isfinite(v) for v in values["train/loss"].values())
    text_tags = acc.Tags()["tensors"]
    assert any("provenance" in t for t in text_tags) and any("config" in t for t in text_tags)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [5, 10]
    assert "step 10/10 | loss" in out.stdout
    config = json.loads(pathlib.Path(workdir, "config.json").read_text())
    assert config["precision"]["recipe"] == "fp8dpa"


def test_evaluate_prints_json_for_a_checkpoint(trained):
    workdir, _ = trained
    out = run([sys.executable, "-m", "fogjax.evaluate", f"--workdir={workdir}", "--step=5"])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"step", "loss", "perplexity", "tokens"}
    assert result["step"] == 5
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-6)
    assert result["tokens"] == 2 * 8 * 64
    _, values = scalars(workdir)
    # Beside a live trainer (its lock held by this process, a save of step 9 in flight), the
    # evaluating process reads the latest finished step and writes, moves or deletes nothing:
    # a reader used to delete the in-flight folder and kill the trainer.
    checkpoints = pathlib.Path(workdir, "checkpoints")
    in_flight = checkpoints / "13.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(checkpoints / "10", in_flight)
    lock = pathlib.Path(workdir, "trainer.lock")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": 0}))
    before = _snapshot(workdir)
    try:
        latest = run([sys.executable, "-m", "fogjax.evaluate", f"--workdir={workdir}"])
        assert latest.returncode == 0, latest.stderr[-2000:]
        assert _snapshot(workdir) == before
    finally:
        shutil.rmtree(in_flight)
        lock.unlink()
    final = json.loads(latest.stdout.strip().splitlines()[-1])
    assert final["step"] == 10
    # The trainer's own eval at step 10 used the same batches.
    assert final["loss"] == pytest.approx(values["eval/loss"][10], rel=1e-6)


def _snapshot(root):
    """{path: (size, mtime_ns)} of every file and folder under ``root``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_resume_after_sigterm_matches_straight_run_bitwise(trained, tmp_path):
    straight, _ = trained  # the same command, uninterrupted
    resumed = str(tmp_path / "resumed")
    stopped = sigterm_after(train_cmd(resumed, *TRAINED), "step 3/10")
    assert 3 <= stopped < 10
    out = run(train_cmd(resumed, *TRAINED))
    assert out.returncode == 0, out.stderr[-3000:]

    _, a = scalars(straight)
    _, b = scalars(resumed)
    assert sorted(b["train/loss"]) == list(range(1, 11))
    for step in range(1, 11):
        assert a["train/loss"][step] == b["train/loss"][step], step  # bitwise (float32 events)
        assert a["train/grad_norm"][step] == b["train/grad_norm"][step], step
        assert a["train/param_norm"][step] == b["train/param_norm"][step], step
    # Same batches consumed: identical data-iterator states in the final checkpoints.
    data_file = ("checkpoints", "10", "data", "process_0-of-1.json")
    assert (
        pathlib.Path(straight, *data_file).read_text()
        == pathlib.Path(resumed, *data_file).read_text()
    )


def test_nan_stops_with_step_checkpoint_and_kurtosis(tmp_path):
    workdir = str(tmp_path / "nan")
    out = run(
        train_cmd(
            workdir,
            "--config.train.steps=12",
            "--config.train.ckpt_every=1",
            "--config.train.eval_every=0",
            "--config.train.stats_every=1",  # one compiled step, not two; kurtosis every step
            "--config.precision.recipe=bf16",
            "--config.optim.peak_lr=1e30",
            # A one-layer d_model 64 model compiles in a few seconds; it diverges all the same.
            "--config.model.num_layers=1",
            "--config.model.d_model=64",
            "--config.model.ffn_dim=192",
        )
    )
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    err = out.stderr
    assert "NaN/inf at step" in err and "kurtosis/qkv/avg" in err
    bad_step = int(err.split("NaN/inf at step ")[1].split(" ")[0])
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert all(s < bad_step for s in saved)  # nothing after the divergence was saved
    # The NaN at step k came from checkpoint k - 1's parameters: k - 2 is the last good one.
    assert f"Last good checkpoint: step {bad_step - 2} in" in err, err[-2000:]


@pytest.mark.slow
def test_tiny_model_learns_on_embedded_corpus(tmp_path):
    workdir = str(tmp_path / "learn")
    out = run(
        train_cmd(
            workdir,
            "--config.train.steps=100",
            "--config.train.batch_size=8",
            "--config.train.seq_len=64",
            # Statistics on every step: one compiled step instead of two (~10 s less on 2
            # cores); statistics do not change the numbers.
            "--config.train.stats_every=1",
            "--config.train.ckpt_every=100",
            "--config.train.eval_every=100",
            "--config.train.log_every=10",
            "--config.optim.warmup_steps=10",
            "--config.optim.cooldown_steps=20",
        ),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _, v = scalars(workdir)
    first = np.mean([v["train/loss"][s] for s in (1, 2, 3)])
    last = np.mean([v["train/loss"][s] for s in (98, 99, 100)])
    assert first > 7.5  # ~ln(4096) = 8.3 at initialisation
    assert last < first - 2.5, (first, last)
    assert v["eval/loss"][100] < first - 2.0


def test_bad_config_fails_clearly_and_writes_nothing(tmp_path):
    workdir = str(tmp_path / "bad")
    out = run(train_cmd(workdir, "--config.train.micro_batches=3"))
    assert out.returncode == 2
    assert "train.batch_size=8 is not divisible by train.micro_batches=3" in out.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    out = run(train_cmd(workdir, "--config.data.path=/nonexistent/shards"))
    assert out.returncode != 0 and "/nonexistent/shards" in out.stderr
    # A dataset without a validation split, with evaluation on: refused before training.
    from fogjax.data import load_tokenizer, prepare

    no_val = str(tmp_path / "no_val")
    docs = ["a first document. " * 80, "a second one. " * 80]
    prepare.prepare_documents(docs, no_val, load_tokenizer("bytes"), val_fraction=0.0)
    out = run(train_cmd(workdir, f"--config.data.path={no_val}", "--config.train.eval_every=2"))
    assert out.returncode == 2 and "--config.train.eval_every=0" in out.stderr


def test_checkpoint_of_another_model_is_refused(trained, tmp_path):
    import shutil

    workdir = str(tmp_path / "other")
    shutil.copytree(trained[0], workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    out = run(train_cmd(workdir, "--config.train.steps=12", "--config.model.d_model=512",
                        "--config.model.num_heads=4"))  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "different model" in out.stderr and "--workdir" in out.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
