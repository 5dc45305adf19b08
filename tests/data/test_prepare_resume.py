"""fogjax.data.prepare survives being stopped: SIGKILL mid-way and rerun gives the bytes of an
uninterrupted run (a killed worker's partial shards are discarded and redone); Ctrl-C and SIGTERM
keep every finished unit; a changed command line on a started output is refused, naming it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO_ROOT, corpora

from fogjax.data import prepare, shards
from fogjax.data.prepare.ledger import Ledger

FILES = 8
FLAGS = ["--unit-bytes", "1", "--shard-tokens", "3000", "--val-tokens", "5000", "--log-every", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 .jsonl files (one unit each, several shards each), a BPE tokenizer, and the output of
    an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    inputs = root / "in"
    inputs.mkdir()
    for f in range(FILES):
        records = [{"text": corpora.text(f * 1000 + i, 200)} for i in range(150)]
        corpora.write_jsonl(inputs / f"part{f}.jsonl", records)
    tok = corpora.tokenizer_json(root / "tokenizer.json")
    kw = {"unit_bytes": 1, "shard_tokens": 3000, "val_tokens": 5000}
    prepare.prepare([inputs], root / "reference", str(tok), workers=0, **kw)
    return inputs, tok, root / "reference"


def _cmd(inputs, tok, out, workers=1, tokenizer=None):
    where = ["--input", str(inputs), "--output", str(out), "--tokenizer", str(tokenizer or tok)]
    return [sys.executable, "-m", "fogjax.data.prepare", *where, "--workers", str(workers), *FLAGS]


# Runs the CLI with Ctrl-C restored to Python's default: a process inherits an ignored SIGINT
# (a background job of a non-interactive shell has one, so may the test runner), and CPython then
# installs no KeyboardInterrupt handler, so the prepare run would sail through the Ctrl-C below.
_AS_FOREGROUND_JOB = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['fogjax.data.prepare', *sys.argv[1:]]; "
    "runpy.run_module('fogjax.data.prepare', run_name='__main__', alter_sys=True)"
)


def _start(cmd):
    # Its own process group, as a shell job: a signal to the group reaches parent and workers.
    assert cmd[1:3] == ["-m", "fogjax.data.prepare"], cmd
    cmd = [cmd[0], "-c", _AS_FOREGROUND_JOB, *cmd[3:]]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def _wait_until(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]  # Finished too early.
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _finished_files(out):
    """{finished unit: the bytes of its shards}."""
    ledger = Ledger(out)
    return {
        u: {s["name"]: (out / s["name"]).read_bytes() for s in ledger.record(u)["shards"]}
        for u in ledger.done_units()
    }


def test_sigkill_midway_then_rerun_is_bit_identical(corpus, tmp_path):
    inputs, tok, reference = corpus
    out = tmp_path / "out"
    proc = _start(_cmd(inputs, tok, out))
    ledger = Ledger(out)

    def partial_unit_on_disk():
        done = ledger.done_units() if ledger.plan_path.exists() else set()
        names = [p.name for p in out.glob("u*_*.npy")] if done else []
        return any(int(n[1:7]) not in done for n in names)

    _wait_until(partial_unit_on_disk, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # The parent and its worker, mid-unit.
    proc.wait()
    done = ledger.done_units()
    assert 0 < len(done) < FILES and not (out / shards.METADATA).exists()
    rerun = subprocess.run(_cmd(inputs, tok, out), cwd=REPO_ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    corpora.assert_same_dataset(reference, out)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert not leftovers


def test_ctrl_c_and_sigterm_keep_finished_units_and_a_changed_tokenizer_is_refused(
    corpus, tmp_path
):
    inputs, tok, reference = corpus
    out = tmp_path / "out"
    ledger = Ledger(out)
    kept: dict = {}
    for sig, code, name in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        proc = _start(_cmd(inputs, tok, out, workers=2))
        before = len(kept)
        more_done = lambda n=before: ledger.plan_path.exists() and len(ledger.done_units()) > n  # noqa: E731
        _wait_until(more_done, proc)
        os.killpg(proc.pid, sig)  # Ctrl-C in a terminal signals the whole foreground group.
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err[-3000:]
        assert f"Stopped by {name}. Finished units are kept" in err and "Traceback" not in err
        now = _finished_files(out)
        assert all(now[u] == files for u, files in kept.items())  # Nothing finished was lost.
        kept = now
    assert len(kept) < FILES and not (out / shards.METADATA).exists()
    changed = subprocess.run(
        _cmd(inputs, tok, out, tokenizer="bytes"), cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "other settings: --tokenizer:" in changed.stderr and "'bytes' now" in changed.stderr
    assert "new --output" in changed.stderr
    assert _finished_files(out) == kept  # The refusal touched nothing.
    rerun = subprocess.run(_cmd(inputs, tok, out), cwd=REPO_ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    corpora.assert_same_dataset(reference, out)
