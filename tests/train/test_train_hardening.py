"""Nothing lost, nothing hangs: each test reproduces a defect the trainer had (issue 10).

Checks before any write (numeric fields, shards, vocabulary, workdir), the workdir lock with a
second process, a TensorBoard writer that fails mid-run (a fake full disk inside the real CLI),
refused and accepted model-config changes on resume, Ctrl-C during the first compile, a
profiler trace, and clean CLI errors.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers.cli import ENV, ROOT, run, scalars
from helpers.cli import train_cmd as _train_cmd

from fogjax import config_lib
from fogjax.data import load_dataset_info, load_tokenizer, prepare
from fogjax.train import preflight
from fogjax.train.workdir import LOCK_FILE, WorkdirLock, WorkdirLockedError

pytestmark = pytest.mark.slow  # module fixtures train or run commands


def train_cmd(workdir, *overrides):
    """test_train's short run, with a schedule that fits 2-3 steps."""
    schedule = ("--config.optim.warmup_steps=1", "--config.optim.cooldown_steps=1")
    return _train_cmd(workdir, *schedule, *overrides)


def _config(**train):
    config = config_lib.get_config("fog_flash", "tiny")
    for key, value in train.items():
        section, field = key.split("__")
        setattr(config[section], field, value)
    return config


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"train__keep_checkpoints": 0}, "train.keep_checkpoints=0 must be >= 1"),
        ({"optim__peak_lr": 0.0}, "optim.peak_lr=0.0 must be > 0"),
        ({"optim__min_lr": 1.0}, "optim.min_lr=1.0 must be in [0, optim.peak_lr=0.003]"),
        ({"optim__warmup_steps": 150, "optim__cooldown_steps": 60}, "exceeds train.steps=200"),
        ({"train__eval_batches": 0}, "train.eval_batches=0 must be >= 1"),
        ({"train__eval_every": -1}, "train.eval_every=-1 must be >= 0"),
        ({"optim__b2": 1.0}, "optim.b2=1.0 must be in [0, 1)"),
        ({"train__profile_steps": "5"}, "train.profile_steps='5' must be 'FIRST,LAST'"),
        ({"train__profile_steps": "9,3"}, "0 <= FIRST <= LAST"),
    ],
)
def test_numeric_fields_are_validated(overrides, needle):
    with pytest.raises(ValueError) as e:
        preflight.validate_train_config(_config(**overrides))
    assert needle in str(e.value)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data"
    docs = [f"document {i}: " + "some text to train on. " * 40 for i in range(12)]
    prepare.prepare_documents(docs, path, load_tokenizer("bytes"), val_fraction=0.25)
    return path


def _check(path, **overrides):
    config = _config(**{"model__vocab_size": 257, "train__seq_len": 32, **overrides})
    preflight.check_dataset(load_dataset_info(str(path)), config)


def test_bad_shards_fail_at_start_up_naming_the_file(dataset):
    _check(dataset)  # The intact dataset passes.
    meta = json.loads((dataset / "metadata.json").read_text())
    assert meta["max_token_id"] == int(max(np.load(p).max() for p in dataset.glob("*.npy")))
    shard = dataset / meta["splits"]["train"]["shards"][0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # Truncated: the header promises more.
    with pytest.raises(ValueError, match=rf"Shard {shard} .*unreadable or truncated"):
        _check(dataset)
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"Shard {shard} \(0 bytes\)"):
        _check(dataset)
    np.save(shard, np.load(dataset / meta["splits"]["val"]["shards"][0]))  # Well-formed, short.
    with pytest.raises(ValueError, match=rf"Shard {shard} holds .* tokens but metadata.json"):
        _check(dataset)


def test_short_validation_split_and_ids_beyond_vocab(dataset):
    meta = json.loads((dataset / "metadata.json").read_text())
    with pytest.raises(ValueError, match="no usable validation split"):
        _check(dataset, train__seq_len=meta["splits"]["val"]["tokens"])
    _check(dataset, train__seq_len=meta["splits"]["val"]["tokens"], train__eval_every=0)
    # An id the tokenizer's vocab_size does not cover (it used to train into NaN and read as a
    # divergence), in a shard edited after preparation: metadata.json still says 256, but the
    # shard's mtime no longer matches the scan cache, so it is scanned again and named.
    shard = dataset / meta["splits"]["train"]["shards"][0]
    ids = np.load(shard)
    ids[5] = 300
    np.save(shard, ids)
    with pytest.raises(ValueError, match=rf"Shard {shard} holds token id 300, beyond model.vocab"):
        _check(dataset)
    cache = json.loads((dataset / ".shard_scan.json").read_text())["shards"]
    assert cache[shard.name]["max_token_id"] == 300  # Scanned once, cached by size and mtime.
    _check(dataset, model__vocab_size=301)


def test_unusable_workdirs_fail_at_start_up(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        preflight.check_workdir(str(a_file))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(ValueError, match="checkpoints is a file"):
        preflight.check_workdir(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="/sys is not writable"):  # Read-only even for root.
        preflight.check_workdir("/sys")
    with pytest.raises(ValueError, match="Cannot create --workdir=/sys/fogjax-run"):
        preflight.check_workdir("/sys/fogjax-run")


def test_one_trainer_per_workdir_and_stale_locks(tmp_path):
    workdir = str(tmp_path / "locked")
    os.makedirs(workdir)
    with WorkdirLock(workdir):
        out = run(train_cmd(workdir, "--config.train.steps=2"))
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"process {os.getpid()} on host" in out.stderr and "another trainer" in out.stderr
        assert sorted(os.listdir(workdir)) == [LOCK_FILE]  # Nothing else was written.
        with pytest.raises(WorkdirLockedError, match=str(os.getpid())):
            WorkdirLock(workdir).acquire()
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))  # Released.
    # A trainer killed without releasing (SIGKILL, OOM) leaves a lock naming a dead pid.
    code = f"from fogjax.train.workdir import WorkdirLock; WorkdirLock({workdir!r}).acquire()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, check=True)
    dead = json.loads(pathlib.Path(workdir, LOCK_FILE).read_text())["pid"]
    with WorkdirLock(workdir) as lock:
        assert (
            lock.held
            and json.loads(pathlib.Path(lock.path).read_text())["pid"] == os.getpid() != dead
        )


# The real CLI with tensorboardX's file writes failing after the first few (a disk filling up).
FULL_DISK = """
import errno, runpy, sys
import tensorboardX.record_writer as rw
original, calls = rw.RecordWriter.write, [0]
def write(self, data):
    calls[0] += 1
    if calls[0] > 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, data)
rw.RecordWriter.write = write
sys.argv = ["fogjax.train", *sys.argv[1:]]
runpy.run_module("fogjax.train", run_name="__main__")
"""


# A one-layer d_model 64 model for the run below and its resumes: each compiles in a few seconds;
# the size is not what these tests test.
SMALL_MODEL = ("--config.model.num_layers=1", "--config.model.d_model=64",
               "--config.model.ffn_dim=192")  # fmt: skip


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("hardening") / "run")
    args = train_cmd(
        workdir,
        "--config.train.steps=2",
        "--config.train.ckpt_every=2",
        "--config.train.eval_every=0",
        "--config.train.profile_steps=1,2",
        "--config.precision.recipe=bf16",  # Compiles faster; FP8 is not what these tests test.
        *SMALL_MODEL,
    )[3:]  # Drop "python -m fogjax.train".
    out = run([sys.executable, "-c", FULL_DISK, *args])
    return workdir, out


def test_failing_writer_warns_once_and_the_run_completes(full_disk_run):
    workdir, out = full_disk_run
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("TensorBoard events can no longer be written") == 1, out.stdout
    assert "No space left on device" in out.stdout and "Done: step 2" in out.stdout
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces


def test_shape_compatible_model_change_is_refused_then_allowed(full_disk_run):
    workdir, _ = full_disk_run
    before = pathlib.Path(workdir, "config.json").read_text()
    changed = train_cmd(
        workdir,
        "--config.train.steps=3",
        "--config.precision.recipe=bf16",
        *SMALL_MODEL,
        "--config.model.rope_base=10000.0",
    )
    out = run(changed)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.rope_base: 500000.0 -> 10000.0" in out.stderr
    assert "--config.train.allow_config_change=True" in out.stderr
    for noise in ("Traceback", "Event loop is closed", "cannot schedule new futures"):
        assert noise not in out.stderr, out.stderr[-2000:]
    assert pathlib.Path(workdir, "config.json").read_text() == before
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]

    out = run([*changed, "--config.train.allow_config_change=True"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resumed from" in out.stdout and "Done: step 3" in out.stdout
    history = os.path.join(workdir, "config_history")
    assert sorted(os.listdir(history)) == ["step_0.json", "step_2.json"]
    bases = [json.loads(pathlib.Path(history, f).read_text())["model"]["rope_base"] for f in
             ("step_0.json", "step_2.json")]  # fmt: skip
    assert bases == [500000.0, 10000.0]
    _, values = scalars(workdir)
    assert sorted(values["train/loss"]) == [3]  # Events resumed (the first run had none).


def test_ctrl_c_during_the_first_compile_aborts(tmp_path):
    workdir = str(tmp_path / "compile")
    proc = subprocess.Popen(
        train_cmd(workdir, "--config.train.steps=2"), cwd=ROOT,
        env={**ENV, "JAX_ENABLE_COMPILATION_CACHE": "false"},  # A real compile to interrupt.
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("Compiling the train step"):
                sent = time.monotonic()
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    assert time.monotonic() - sent < 20  # Not after the compile: it takes longer under load.
    assert "Interrupted during the first compilation" in rest
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))
    checkpoints = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)


def test_cli_errors_are_one_clean_line():
    cases = {
        "--config=configs/nope.py": "Config file configs/nope.py does not exist. Configs in",
        "--config=configs/fog_flash.py:70b": "Unknown size '70b'; choose one of",
        "--config.train.stepz=3": "Unknown config field 'stepz'. Did you mean \"steps\"",
    }
    for arg, needle in cases.items():
        out = run([sys.executable, "-m", "fogjax.train", arg])
        assert out.returncode == 2 and needle in out.stderr, (arg, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
    out = run([sys.executable, "-m", "fogjax.train", "-h"])
    for needle in ("configs/ARCH.py:SIZE", "fog_flash", "1.5b", "--config.SECTION.FIELD=VALUE",
                   "fogjax/config_lib.py", "--workdir"):  # fmt: skip
        assert needle in out.stdout, (needle, out.stdout[-2000:])


def test_the_compile_thread_sees_the_mesh_and_logical_rules():
    """The first compile runs in a worker thread (so Ctrl-C works); the mesh and flax's logical
    rules are thread-local, and without them the step lowers with no sharding constraints."""
    import threading

    import jax

    from fogjax import sharding
    from fogjax.train import run as state_lib
    from fogjax.train.control import StopRequest, interruptible

    c = config_lib.get_config("llama3", "tiny")
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.vocab_size = 1, 64, 2, 1, 256
    m.ffn_base_dim = 128
    c.train.seq_len, c.train.batch_size = 16, 8
    c.mesh.data, c.mesh.fsdp = 2, jax.device_count() // 2
    run = state_lib.build_run(c)
    batch = jax.ShapeDtypeStruct((8, 17), np.int32, sharding=sharding.batch_sharding(run.mesh))

    def lower():
        return run.train_steps[False].lower(run.abstract, batch).as_text()

    with sharding.sharding_context(run.mesh):
        expected = lower()
    assert interruptible(lower, run.mesh, StopRequest()) == expected
    bare = {}  # A plain thread, as the first version of the compile thread was.
    worker = threading.Thread(target=lambda: bare.setdefault("text", lower()))
    worker.start()
    worker.join()
    assert bare["text"] != expected


def test_out_of_memory_at_compile_names_what_to_reduce():
    """XLA's RESOURCE_EXHAUSTED at compile becomes a ValueError (the CLI's clean exit 2) naming
    the config's sizes and what to lower; any other compile error is re-raised untouched."""
    import types

    import jax

    from fogjax.train.control import CompiledSteps, StopRequest

    config = _config(train__batch_size=64, train__seq_len=4096, train__micro_batches=2)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    steps = CompiledSteps(types.SimpleNamespace(config=config, mesh=mesh), StopRequest(), None)

    def oom():
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.50GiB."
        )

    with pytest.raises(ValueError) as error:
        steps._compile(oom)
    message = str(error.value)
    needles = ["does not fit in device memory", "batch_size=64", "seq_len=4096"]
    needles += ["micro_batches=2", "train.micro_batches", "remat=full", "mesh.fsdp"]
    for needle in needles:
        assert needle in message, (needle, message)
    assert error.value.__cause__ is None  # No chained XLA traceback in the message.

    def other():
        raise jax.errors.JaxRuntimeError("INTERNAL: ptxas exited with non-zero error code")

    with pytest.raises(jax.errors.JaxRuntimeError, match="ptxas"):
        steps._compile(other)
