"""fogjax/train/workdir.py called directly: the config and its history, the model-defining
differences and their refusal, atomic writes under failure, and the lock cases that
tests/train/test_train_hardening.py (a live second trainer through the CLI, a dead pid's lock
taken over) does not reach."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from fogjax import config_lib
from fogjax.train import workdir as wd
from fogjax.train.workdir import LOCK_FILE, WorkdirLock, WorkdirLockedError


def tiny(**changes):
    """The tiny config with ``{'section__field': value}`` changed."""
    config = config_lib.get_config("fog_flash", "tiny")
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(config[section], field, value)
    return config


def history(workdir):
    return sorted(os.listdir(os.path.join(workdir, wd.HISTORY_DIR)))


def read(path):
    with open(path) as f:
        return f.read()


# --- The run config and its history ---------------------------------------------


def test_record_keeps_a_history_entry_only_when_the_config_changes(tmp_path):
    run = str(tmp_path)
    base, other_lr = tiny(), tiny(optim__peak_lr=1e-4)
    wd.record(run, base, 0)
    assert history(run) == ["step_0.json"]
    assert read(tmp_path / "config.json") == read(tmp_path / "config_history/step_0.json")
    assert wd.load_saved(run) == json.loads(base.to_json_best_effort())
    wd.record(run, base, 100)  # A resume with the same config: nothing new kept.
    assert history(run) == ["step_0.json"]
    wd.record(run, other_lr, 200)  # Any difference is kept, model-defining or not.
    assert history(run) == ["step_0.json", "step_200.json"]
    assert wd.load_saved(run)["optim"]["peak_lr"] == 1e-4
    wd.record(run, base, 300)  # Back to the first config: it differs from the last kept.
    wd.record(run, other_lr, 1000)
    assert history(run) == ["step_0.json", "step_1000.json", "step_200.json", "step_300.json"]
    # The last kept is step 1000's (numeric order, not step_300 as names sort): no new entry.
    wd.record(run, other_lr, 2000)
    assert "step_2000.json" not in history(run)
    assert wd.load_saved(run)["optim"]["peak_lr"] == 1e-4


def test_config_changes_lists_model_defining_fields_only(tmp_path):
    wd.record(str(tmp_path), tiny(), 0)
    saved = wd.load_saved(str(tmp_path))
    assert wd.load_saved(str(tmp_path / "none")) is None
    harmless = tiny(
        train__steps=5000,
        optim__peak_lr=1e-4,
        log__on_divergence="continue",
        train__allow_config_change=True,
    )
    assert wd.config_changes(saved, harmless) == []
    changed = tiny(model__rope_base=10000.0, train__seq_len=256, train__steps=5000)
    assert wd.config_changes(saved, changed) == [
        "model.rope_base: 500000.0 -> 10000.0",
        "train.seq_len: 128 -> 256",
    ]
    # A field the saved config lacks (written before the field existed) is a difference too.
    del saved["model"]["rope_base"]
    assert wd.config_changes(saved, tiny()) == ["model.rope_base: '(absent)' -> 500000.0"]


def test_refuse_changes_names_the_fields_the_flag_and_the_history(tmp_path):
    changes = ["model.rope_base: 500000.0 -> 10000.0", "train.seq_len: 128 -> 256"]
    with pytest.raises(ValueError) as raised:
        wd.refuse_changes(changes, str(tmp_path))
    message = str(raised.value)
    assert "model.rope_base: 500000.0 -> 10000.0; train.seq_len: 128 -> 256" in message
    assert "--config.train.allow_config_change=True" in message
    assert os.path.join(str(tmp_path), "config_history") in message


def test_load_run_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json not found"):
        wd.load_run_config(str(tmp_path))
    wd.record(str(tmp_path), tiny(model__rope_base=10000.0), 0)
    config = wd.load_run_config(str(tmp_path))
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.model.rope_base == 10000.0 and config.train.seq_len == 128
    assert config.to_dict() == json.loads(tiny(model__rope_base=10000.0).to_json_best_effort())


@pytest.mark.parametrize("damage", [b"", b'{"model": {"rope_b', b"[1, 2]", b"\xff\xfe"])
def test_a_corrupt_config_json_is_replaced_by_its_history_copy_or_named(tmp_path, caplog, damage):
    """A corrupt config.json used to fail with json's bare 'Expecting value: line 1 column 1',
    naming no file; the newest config_history entry is the same config, so it is used instead
    (with a warning naming both files), and only without one is it an error naming the file."""
    workdir = str(tmp_path)
    wd.record(workdir, tiny(), 0)
    wd.record(workdir, tiny(model__rope_base=10000.0), 40)  # The latest start's config.
    path = os.path.join(workdir, wd.CONFIG_FILE)
    with open(path, "wb") as f:
        f.write(damage)
    with caplog.at_level("WARNING"):
        assert wd.load_run_config(workdir).model.rope_base == 10000.0
    copy = os.path.join(workdir, wd.HISTORY_DIR, "step_40.json")
    assert f"{path} is unreadable" in caplog.text and f"cp {copy} {path}" in caplog.text
    with open(path, "rb") as f:
        assert f.read() == damage  # A reader changes nothing.
    # Its model-defining fields are compared as if config.json were intact.
    assert wd.config_changes(wd.load_saved(workdir), tiny(model__rope_base=10000.0)) == []
    os.remove(copy)  # The older entry is not the latest config: still the newest readable one.
    with open(os.path.join(workdir, wd.HISTORY_DIR, "step_0.json"), "w") as f:
        f.write("{")
    with pytest.raises(ValueError) as e:
        wd.load_saved(workdir)
    message = str(e.value)
    assert message.startswith(f"{path} is unreadable (") and "holds no readable copy" in message
    assert "another --workdir" in message


# --- Atomic writes ------------------------------------------------------------------


def test_write_atomic_replaces_and_leaves_no_tmp(tmp_path):
    path = str(tmp_path / "summary.json")
    wd.write_atomic(path, "first")
    wd.write_json(path, {"status": "done", "step": 3})
    assert json.loads(read(path)) == {"status": "done", "step": 3}
    assert os.listdir(tmp_path) == ["summary.json"]


class _FailingFile:
    """A file whose write stores half the text, then fails (a disk filling up mid-write)."""

    def __init__(self, path, mode):
        self._f = open(path, mode)  # noqa: SIM115 (closed in __exit__)

    partial = None  # The path a half was written to.

    def write(self, text):
        self._f.write(text[: len(text) // 2])
        _FailingFile.partial = self._f.name
        self._f.flush()
        raise OSError(28, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fail_replace(src, dst):
    raise OSError(5, "Input/output error")


@pytest.mark.parametrize("failure", ["write", "replace", "serialise"])
def test_a_failed_write_keeps_the_old_file_and_no_tmp(tmp_path, monkeypatch, failure):
    path = str(tmp_path / "config.json")
    wd.write_json(path, {"model": {"rope_base": 500000.0}})
    old = read(path)
    if failure == "write":
        monkeypatch.setattr(wd, "open", _FailingFile, raising=False)
    elif failure == "replace":
        monkeypatch.setattr(wd.os, "replace", _fail_replace)
    record = {("not", "a", "str", "key"): 1} if failure == "serialise" else {"long": "x" * 10000}
    error = TypeError if failure == "serialise" else OSError
    with pytest.raises(error, match="keys must be|No space left|Input/output error"):
        wd.write_json(path, record)
    assert read(path) == old
    assert os.listdir(tmp_path) == ["config.json"]
    if failure == "write":  # The failure came mid-write, into the temporary file.
        assert _FailingFile.partial == path + ".tmp"


# --- The lock --------------------------------------------------------------------


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    return int(child.stdout)


def _write_lock(workdir, **holder):
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"since": "2025-01-01 00:00:00 UTC", **holder}, f)
    return path


def test_a_live_holder_or_another_hosts_lock_is_refused_naming_host_and_pid(tmp_path):
    host = socket.gethostname()
    path = _write_lock(str(tmp_path), host=host, pid=os.getppid())  # Alive: pytest's parent.
    before = read(path)
    with pytest.raises(WorkdirLockedError) as raised:
        WorkdirLock(str(tmp_path)).acquire()
    assert f"process {os.getppid()} on host {host} (since 2025-01-01" in str(raised.value)
    assert read(path) == before  # Left as it was.
    # On another host a pid cannot be checked: refused even if it is dead here.
    dead = _dead_pid()
    path = _write_lock(str(tmp_path), host="other-node", pid=dead)
    with pytest.raises(WorkdirLockedError) as raised:
        WorkdirLock(str(tmp_path)).acquire()
    assert f"process {dead} on host other-node" in str(raised.value)
    assert f"delete {path}" in str(raised.value)
    # The same lock on this host is stale and taken over (control: the pid is really dead).
    _write_lock(str(tmp_path), host=host, pid=dead)
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.held and json.loads(read(path))["pid"] == os.getpid()


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_over_when_old(tmp_path):
    path = os.path.join(str(tmp_path), LOCK_FILE)
    with open(path, "w") as f:
        f.write('{"host": "trunc')  # A writer between create and write, or a crash's leftover.
    with pytest.raises(WorkdirLockedError, match="a process that left it unreadable"):
        WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    assert lock.held and json.loads(read(path))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(path)


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    # Meanwhile another trainer judged it stale and took it over.
    path = _write_lock(str(tmp_path), host="other-node", pid=12345)
    lock.release()
    assert json.loads(read(path))["host"] == "other-node"
    assert not lock.held


def test_hold_workdir_refuses_a_second_holder_and_releases_on_error(tmp_path):
    path = os.path.join(str(tmp_path), LOCK_FILE)
    with pytest.raises(RuntimeError, match="boom"), wd.hold_workdir(str(tmp_path)):
        assert json.loads(read(path))["pid"] == os.getpid()
        second = pytest.raises(WorkdirLockedError, match=f"process {os.getpid()} on host")
        with second, wd.hold_workdir(str(tmp_path)):
            pass
        assert os.path.exists(path)  # The refused second holder did not release ours.
        raise RuntimeError("boom")
    assert not os.path.exists(path)
