"""Bad inputs to python -m fogjax.data.prepare: exit 2, the file named, the fix named, no
traceback, and nothing of the user's deleted (a pre-existing empty --output folder survives)."""

from __future__ import annotations

import gzip
import resource
import signal
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, corpora

from fogjax.data.prepare import __main__ as cli

RECORDS = [{"text": corpora.text(i, 40)} for i in range(40)]


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def user_output(tmp_path):
    """The user's own, pre-existing, empty output folder."""
    out = tmp_path / "mine"
    out.mkdir()
    return out


def test_junk_jsonl_gz_is_refused_before_anything_is_written(tmp_path, capsys, user_output):
    junk = tmp_path / "junk.jsonl.gz"
    junk.write_bytes(b"this is not gzip at all\n" * 10)
    code, err = _run(capsys, "--input", str(junk), "--output", str(user_output))
    assert code == 2 and str(junk) in err and "not a readable gzip file" in err
    assert "Download or compress it again" in err
    assert user_output.is_dir() and not any(user_output.iterdir())


@pytest.mark.parametrize("workers", ["0", "2"])
def test_truncated_jsonl_gz_names_the_file_and_keeps_the_folder(
    tmp_path, capsys, user_output, workers
):
    good = corpora.write_jsonl(tmp_path / "a.jsonl.gz", RECORDS)
    whole = corpora.write_jsonl(tmp_path / "b.jsonl.gz", RECORDS * 20).read_bytes()
    cut = tmp_path / "b.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # Its head reads; its end is missing.
    argv = ["--input", str(good), str(cut), "--output", str(user_output), "--unit-bytes", "1"]
    code, err = _run(capsys, *argv, "--workers", workers)
    assert code == 2 and f"{cut} is truncated" in err and "Download or compress it again" in err
    assert user_output.is_dir() and not (user_output / "metadata.json").exists()
    if workers == "0":  # In order: a.jsonl.gz was finished first, and is kept.
        assert [p.name for p in user_output.glob("u000000_*.npy")] == ["u000000_00000.npy"]
    cut.write_bytes(whole)  # Downloaded again: the same command continues.
    cli.main([*argv, "--workers", workers])
    assert "wrote" in capsys.readouterr().out


def test_corrupt_tokenizer_json(tmp_path, capsys, user_output):
    data = corpora.write_jsonl(tmp_path / "a.jsonl", RECORDS)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')  # Cut off.
    code, err = _run(capsys, "--input", str(data), "--output", str(user_output),
                     "--tokenizer", str(bad))  # fmt: skip
    assert code == 2 and f"Tokenizer file {bad} cannot be read" in err
    assert "saved by the Hugging Face `tokenizers` library" in err
    assert user_output.is_dir() and not any(user_output.iterdir())


def test_corrupt_parquet(tmp_path, capsys, user_output):
    path = corpora.write_parquet(tmp_path / "a.parquet", RECORDS)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])  # The footer is gone.
    code, err = _run(capsys, "--input", str(path), "--output", str(user_output))
    assert code == 2 and f"{path} is not a readable parquet file" in err
    assert "Download or write it again" in err
    assert user_output.is_dir() and not any(user_output.iterdir())


def test_missing_text_field_names_the_flag(tmp_path, capsys, user_output):
    data = corpora.write_parquet(tmp_path / "a.parquet", RECORDS)
    code, err = _run(capsys, "--input", str(data), "--output", str(user_output),
                     "--text-field", "content")  # fmt: skip
    assert code == 2 and f"{data} has no 'content' column" in err and "--text-field" in err
    bad_filter = ["--input", str(data), "--output", str(user_output), "--filter", "score=>3"]
    code, err = _run(capsys, *bad_filter)
    assert code == 2 and "--filter 'score=>3' is not FIELD OP VALUE" in err


def _file_size_limit(limit: int):
    def set_limit():
        # A full disk, as a process sees it: writes past the limit fail (EFBIG) instead of
        # killing the process (SIGXFSZ ignored; the setting is inherited by the workers).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_full_disk(tmp_path, user_output):
    data = corpora.write_jsonl(tmp_path / "a.jsonl", RECORDS * 40)
    cmd = [sys.executable, "-m", "fogjax.data.prepare", "--input", str(data), "--output",
           str(user_output), "--workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                          preexec_fn=_file_size_limit(20_000))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"Writing u000000 into {user_output} failed" in done.stderr
    assert "Free disk space" in done.stderr and "finished units are kept" in done.stderr
    assert user_output.is_dir()
    assert not list(user_output.glob(".*.tmp.*"))  # The half-written shard was removed.


def test_gzip_of_a_non_json_file(tmp_path, capsys, user_output):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("plain text, not JSON\n")
    code, err = _run(capsys, "--input", str(path), "--output", str(user_output))
    assert code == 2 and f"{path}:1 is not valid JSON" in err and "Fix or drop that line" in err


def test_bad_host_index_is_refused_before_anything_is_written(tmp_path, capsys, user_output):
    data = corpora.write_jsonl(tmp_path / "a.jsonl", RECORDS)
    argv = ["--input", str(data), "--output", str(user_output), "--num-hosts", "2"]
    code, err = _run(capsys, *argv, "--host-index", "2")
    assert code == 2 and "--host-index 2 is not in [0, --num-hosts 2)" in err
    assert not any(user_output.iterdir())


def test_disk_full_at_the_last_step_then_the_same_command_finishes(
    tmp_path, capsys, user_output, monkeypatch
):
    import errno

    from fogjax.data import shards

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    data = corpora.write_jsonl(tmp_path / "a.jsonl", RECORDS)
    argv = ["--input", str(data), "--output", str(user_output), "--workers", "0"]
    with monkeypatch.context() as patch:
        patch.setattr(shards, "write_metadata", full)
        code, err = _run(capsys, *argv)
    assert code == 2 and f"Writing {user_output}/metadata.json failed" in err
    assert "No space left on device" in err and "Every unit is done" in err
    cli.main(argv)
    assert "wrote" in capsys.readouterr().out
