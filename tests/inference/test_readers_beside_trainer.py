"""Readers of a run beside a live trainer: ``fogjax.generate``, ``fogjax.evaluate`` and
``fogjax.evaluate --tasks`` load through :func:`fogjax.inference.load.load_run`, read-only, so
against a trainer saving every step they never delete its in-flight
``<step>.orbax-checkpoint-tmp`` (a writable orbax manager cleans those at start-up: the trainer then
dies, or that checkpoint loses its step metadata), and on a workdir without checkpoints they create
nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from helpers.cli import ENV, ROOT, run, train_cmd
from helpers.lm_eval_tasks import write_multiple_choice_task

from fogjax.inference.load import NoCheckpointError, load_run

pytestmark = pytest.mark.slow  # a real trainer and the command lines in subprocesses

# A one-layer bf16 model: one step variant (stats_every=1) compiles in seconds, and a step with
# its checkpoint takes ~0.2 s on 2 idle CPU cores, most of it the save, so an in-flight
# ``<step>.orbax-checkpoint-tmp`` exists most of the time.
TINY = [
    "--config.model.num_layers=1",
    "--config.model.d_model=64",
    "--config.model.ffn_dim=192",
    "--config.precision.recipe=bf16",
    "--config.train.stats_every=1",
    "--config.train.eval_every=0",
    "--config.train.eval_batches=1",
]
STEPS = 60
PROMPT = "The module"

DOCS = [
    {"question": "2 + 2 =", "choices": ["4", "five"], "label": 0},
    {"question": "The sky is", "choices": ["green", "blue"], "label": 1},
]

# Checks every checkpoint step of a workdir, read-only, in one process. First each step's orbax
# metadata: a save whose tmp directory was deleted under it can still complete, its arrays written
# into a recreated directory, but without the step metadata written when the save started (item
# handlers, init timestamp). Then restores: the first step through load_run, the latest through
# Checkpointer.restore, and every step with restore()'s own checks and reads (structure, arrays,
# data state, metadata, checksums) minus the directory re-listing restore() does first, which
# makes N restores O(N^2) in orbax's metadata reads (~0.3 s each at 200 steps on 2 cores).
VERIFY = """
import json, os, sys
import orbax.checkpoint as ocp
from fogjax import checkpoint, sharding
from fogjax.inference.load import load_run
workdir = sys.argv[1]
directory = os.path.join(workdir, "checkpoints")
steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
damaged, restored = {}, {}
options = ocp.CheckpointManagerOptions(read_only=True, create=False)
with ocp.CheckpointManager(directory, options=options) as manager:
    for s in steps:
        meta = manager.metadata(s)
        handlers = meta.item_handlers or {}
        if sorted(handlers) != ["data", "meta", "state"] or None in handlers.values() or (
            meta.init_timestamp_nsecs is None
        ):
            damaged[s] = repr(meta)[:300]
first = load_run(workdir, step=steps[0])
ckpt = checkpoint.Checkpointer(directory, keep=1, read_only=True)
with sharding.sharding_context(first.run.mesh):
    latest = int(ckpt.restore(first.run.abstract)[0]["step"])
    for s in steps:
        try:
            ckpt._check_structure(s, first.run.abstract)
            restored[s] = int(ckpt._restore_step(s, first.run.abstract)[0]["step"])
        except Exception as e:
            restored[s] = f"{type(e).__name__}: {e}"[:300]
ckpt.close()
print("CHECKED " + json.dumps({"first": first.step, "latest": latest, "steps": restored,
                               "damaged": damaged}))
"""


# A reader that loads again and again (what building the harness's FogjaxLM does), for many
# more loads beside the trainer than one process per load allows: until ``stop`` exists.
RELOAD = """
import json, os, sys
from fogjax.inference.load import load_model
workdir, stop = sys.argv[1:]
steps = []
while not os.path.exists(stop):
    steps.append(load_model(workdir).step)
print("LOADED " + json.dumps(steps))
"""


def _py(*args):
    return [sys.executable, *args]


def _reader_commands(workdir, tmp_path):
    """(name, argv, env) of each kind of reader."""
    commands = [
        ("generate", _py("-m", "fogjax.generate", f"--workdir={workdir}",
                         f"--prompt={PROMPT}", "--max-new-tokens=4"), ENV),
        ("evaluate", _py("-m", "fogjax.evaluate", f"--workdir={workdir}", "--batches=1"), ENV),
    ]  # fmt: skip
    if importlib.util.find_spec("lm_eval") is not None:
        tasks = tmp_path / "tasks"
        tasks.mkdir()
        write_multiple_choice_task(tasks, "fogjax_readers_toy", DOCS)
        env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}  # fmt: skip
        harness = _py("-m", "fogjax.evaluate", f"--workdir={workdir}",
                      "--tasks=fogjax_readers_toy", f"--include_path={tasks}", "--limit=2",
                      "--batch_size=4")  # fmt: skip
        commands.append(("evaluate --tasks", harness, env))
    else:  # Without lm-eval: the harness model's loading alone (fogjax.evaluate.harness needs it).
        code = "from fogjax.inference.load import load_model; load_model(sys.argv[1])"
        commands.append(("load_model", _py("-c", "import sys; " + code, workdir), ENV))
    return commands


def _saved_steps(workdir):
    try:
        names = os.listdir(os.path.join(workdir, "checkpoints"))
    except FileNotFoundError:
        return []
    return sorted(int(d) for d in names if d.isdigit())


def _reader_loop(trainer, command, repeat, results):
    """Runs ``command`` (again and again if ``repeat``) while the trainer runs."""
    name, argv, env = command
    while trainer.poll() is None:
        started = time.monotonic()
        try:
            out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            results.append((name, "timeout", time.monotonic() - started, str(e.stderr)[-3000:]))
            return
        rc = out.returncode
        if rc == 0 and name == "generate" and not out.stdout.startswith(PROMPT):
            rc = f"0 but printed {out.stdout[:200]!r}"
        results.append((name, rc, time.monotonic() - started, out.stderr[-3000:]))
        if not repeat:
            return


@pytest.mark.slow
def test_readers_beside_a_trainer_saving_every_step_lose_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    commands = _reader_commands(workdir, tmp_path)
    every_step = ["--config.train.ckpt_every=1", "--config.train.keep_checkpoints=1000"]
    argv = train_cmd(workdir, *TINY, f"--config.train.steps={STEPS}", *every_step)
    results: list[tuple] = []
    threads: list[threading.Thread] = []
    verify = reload = None
    stop = str(tmp_path / "stop")
    with open(tmp_path / "train.log", "w+") as log:
        trainer = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not _saved_steps(workdir):
                assert trainer.poll() is None, "the trainer exited before its first checkpoint"
                assert time.monotonic() < deadline, "no first checkpoint in 240 s"
                time.sleep(0.05)
            first_seen = _saved_steps(workdir)[-1]
            # Every kind of reader at once, each in a loop (the harness's, ~4x slower than the
            # others, once, lest it run long after the trainer), and one process loading again and
            # again. Every reader starts after a checkpoint exists, so each must succeed.
            for command in commands:
                args = (trainer, command, command[0] != "evaluate --tasks", results)
                threads.append(threading.Thread(target=_reader_loop, args=args))
                threads[-1].start()
            reload = subprocess.Popen(_py("-c", RELOAD, workdir, stop), cwd=ROOT, env=ENV,
                                      text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)  # fmt: skip
            trainer.wait(timeout=300)
            open(stop, "w").close()
            reloaded, reload_err = reload.communicate(timeout=300)
            # Check every checkpoint while the last readers finish.
            verify = subprocess.Popen(_py("-c", VERIFY, workdir), cwd=ROOT, env=ENV, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            for t in threads:
                t.join()
            verified, verify_err = verify.communicate(timeout=300)
        finally:
            for proc in (trainer, reload, verify):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            for t in threads:
                t.join()
        log.seek(0)
        train_log = log.read()

    # The trainer: exit 0 at the last step, with a complete summary.
    assert trainer.returncode == 0, train_log[-4000:]
    assert f"Done: step {STEPS}" in train_log, train_log[-4000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and summary["step"] == STEPS, summary
    # orbax warns when a step's tmp directory vanishes under a save ("Metadata file does not
    # exist: .../40.orbax-checkpoint-tmp/_CHECKPOINT_METADATA").
    vanished = [line for line in train_log.splitlines() if "orbax-checkpoint-tmp" in line]
    assert not vanished, vanished

    # The readers: every one succeeded, every kind ran, and they overlapped many saves.
    failed = [r for r in results if r[1] != 0]
    assert not failed, "\n\n".join(f"{n} exited {rc}:\n{err}" for n, rc, _, err in failed)
    assert {r[0] for r in results} == {c[0] for c in commands}, results
    assert reload.returncode == 0, reload_err[-3000:]
    loaded = json.loads(reloaded.split("LOADED ", 1)[1])
    assert loaded == sorted(loaded) and first_seen <= loaded[0], loaded
    assert len(set(loaded)) >= 5 and first_seen < STEPS // 4, (loaded, first_seen)

    # Every step was saved, nothing half-written is left, and each checkpoint restores.
    directory = os.path.join(workdir, "checkpoints")
    leftovers = [d for d in os.listdir(directory) if "orbax-checkpoint-tmp" in d]
    assert not leftovers, leftovers
    assert _saved_steps(workdir) == list(range(1, STEPS + 1)), sorted(os.listdir(directory))
    assert verify.returncode == 0, verify_err[-3000:]
    checked = json.loads(verified.split("CHECKED ", 1)[1])
    assert not checked["damaged"], checked["damaged"]
    wrong = {s: r for s, r in checked["steps"].items() if r != int(s)}
    assert not wrong, wrong
    assert checked["first"] == 1 and checked["latest"] == STEPS, checked


# A finished tiny run, shared by the fast tests below.


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("readers") / "run")
    short = ["--config.optim.warmup_steps=1", "--config.optim.cooldown_steps=1"]
    out = run(train_cmd(workdir, *TINY, "--config.train.steps=2", "--config.train.ckpt_every=1",
                        *short))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _tree(path):
    """Every path under ``path`` with its size and modification time."""
    entries = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            entries[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return entries


def _generate_cmd(workdir):
    return _py("-m", "fogjax.generate", f"--workdir={workdir}", "--prompt=x", "--max-new-tokens=2")


def _generate(workdir):
    return run(_generate_cmd(workdir), timeout=300)


def _one_line_error(out):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in lines if line.startswith("ERROR: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


def test_generate_on_a_workdir_without_a_run_exits_2_and_creates_nothing(tmp_path, finished):
    empty = tmp_path / "empty"
    empty.mkdir()
    error = _one_line_error(_generate(empty))
    assert str(empty) in error
    assert os.listdir(empty) == []
    # A run's config without its checkpoints/: the old writable loader created checkpoints/.
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(os.path.join(finished, "config.json"), config_only)
    error = _one_line_error(_generate(config_only))
    assert "No checkpoint in" in error and "python -m fogjax.train" in error
    assert os.listdir(config_only) == ["config.json"]


def test_generate_changes_nothing_in_a_finished_run(tmp_path, finished):
    workdir = str(tmp_path / "copy")
    shutil.copytree(finished, workdir)
    before = _tree(workdir)
    out = _generate(workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stdout.startswith("x")
    assert _tree(workdir) == before


def _permission_bits_enforced(directory):
    """A command prefix under which ``directory``'s missing write bits stop writes, or None.

    Root ignores permission bits (CAP_DAC_OVERRIDE); ``setpriv`` drops that capability from the
    bounding set of the command it starts, so even root cannot write there."""
    prefixes = [[]]
    if shutil.which("setpriv"):
        prefixes.append(["setpriv", "--bounding-set=-dac_override,-fowner"])
    for prefix in prefixes:
        probe = subprocess.run([*prefix, "touch", os.path.join(directory, "probe")],
                               capture_output=True)  # fmt: skip
        if probe.returncode != 0:
            return prefix
        os.unlink(os.path.join(directory, "probe"))
    return None


def test_generate_on_a_read_only_workdir(tmp_path, finished):
    workdir = tmp_path / "read_only"
    shutil.copytree(finished, workdir)
    dirs = [workdir] + [p for p in workdir.rglob("*") if p.is_dir()]
    files = [p for p in workdir.rglob("*") if p.is_file()]
    for p in files:
        p.chmod(0o444)
    for p in dirs:
        p.chmod(0o555)
    try:
        prefix = _permission_bits_enforced(workdir)
        if prefix is None:
            pytest.skip(
                "this user writes into a chmod 0o555 directory (root, and no setpriv to drop "
                "CAP_DAC_OVERRIDE), so no read-only workdir can be made here; "
                "test_generate_changes_nothing_in_a_finished_run checks that nothing is written"
            )
        before = _tree(workdir)
        out = run([*prefix, *_generate_cmd(workdir)], timeout=300)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.stdout.startswith("x")
        assert _tree(workdir) == before
    finally:
        for p in dirs:
            p.chmod(0o755)
        for p in files:
            p.chmod(0o644)


def test_load_run_of_a_missing_step_names_the_steps_it_holds(finished):
    with pytest.raises(NoCheckpointError, match=r"No checkpoint step 7 .* holds steps \[1, 2\]"):
        load_run(finished, step=7)
