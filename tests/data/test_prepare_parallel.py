"""fogjax.data.prepare at scale: workers and hosts write the same bytes as one process; the
options (--text-field, --filter, --bos, --val-tokens) against hand-counted inputs; progress."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT, corpora

from fogjax.data import prepare, shards
from fogjax.data.tokenizer import load_tokenizer

SMALL = {"unit_bytes": 500, "shard_tokens": 400, "val_tokens": 700}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two .jsonl.gz, a .jsonl and a parquet of 6 row groups; a BPE tokenizer.json."""
    root = tmp_path_factory.mktemp("corpus")
    inputs = root / "in"
    inputs.mkdir()
    records = [{"text": corpora.text(i, 20 + i % 17), "int_score": i % 5} for i in range(96)]
    corpora.write_jsonl(inputs / "a.jsonl.gz", records[:24])
    corpora.write_jsonl(inputs / "b.jsonl.gz", records[24:48])
    corpora.write_jsonl(inputs / "c.jsonl", records[48:72])
    corpora.write_parquet(inputs / "d.parquet", records[72:], row_group_size=4)
    tok = corpora.tokenizer_json(root / "tokenizer.json")
    one = prepare.prepare([inputs], root / "one", str(tok), workers=0, **SMALL)
    return inputs, tok, root / "one", one, records


def test_one_process_output_is_what_was_asked(corpus):
    inputs, tok_path, out, result, records = corpus
    info = result.info
    assert result.units > 4 and result.prepared == result.units  # Several units, all done here.
    assert len(info.val_shards) >= 1 and any(p.name.endswith("a.npy") for p in info.val_shards)
    tok = load_tokenizer(str(tok_path))
    docs = corpora.documents(info, "val") + corpora.documents(info, "train")
    assert [tok.decode(d) for d in docs] == [r["text"] for r in records]  # In input order.
    assert 700 <= info.val_tokens < 700 + max(len(d) + 1 for d in docs)  # Whole documents.
    assert info.val_tokens - len(docs[info.val_documents - 1]) - 1 < 700  # The last one crossed.
    assert max(len(np.load(p)) for p in info.train_shards) <= 400


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_write_the_same_bytes_as_one_process(corpus, tmp_path, workers):
    inputs, tok, one, _, _ = corpus
    result = prepare.prepare([inputs], tmp_path / "out", str(tok), workers=workers, **SMALL)
    assert result.prepared == result.units
    corpora.assert_same_dataset(one, tmp_path / "out")


def test_two_hosts_then_finalise_equal_one_host(corpus, tmp_path):
    inputs, tok, one, _, _ = corpus
    out = tmp_path / "out"
    first = prepare.prepare([inputs], out, str(tok), num_hosts=2, host_index=1, **SMALL)
    assert first.info is None and first.pending == first.units - first.host_units
    assert not (out / shards.METADATA).exists()
    second = prepare.prepare([inputs], out, str(tok), num_hosts=2, host_index=0, **SMALL)
    assert second.info is not None and second.pending == 0  # The last host finalises.
    corpora.assert_same_dataset(one, out)
    before = (out / shards.METADATA).read_bytes()
    again = prepare.prepare([inputs], out, str(tok), num_hosts=2, host_index=1, **SMALL)
    assert again.prepared == 0 and (out / shards.METADATA).read_bytes() == before  # Idempotent.


HAND = [
    {"body": "alpha", "score": 3},
    {"body": "beta", "score": 1},
    {"body": "gamma", "score": None},
    {"body": "", "score": 5},
    {"body": "delta", "score": 4},
    {"body": "epsilon", "score": 9},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_text_field_filter_and_val_tokens_hand_counted(tmp_path, suffix):
    path = tmp_path / f"in{suffix}"
    if suffix == ".parquet":
        corpora.write_parquet(path, HAND, row_group_size=2)
    else:
        corpora.write_jsonl(path, HAND)
    kw = {"text_field": "body", "filters": ["score>=3"], "val_tokens": 6}
    info = prepare.prepare([path], tmp_path / "out", **kw).info
    # Kept: alpha, delta, epsilon (beta fails, gamma's score is null, "" is empty).
    # 'alpha' + EOS is 6 tokens: exactly --val-tokens 6, so validation is that one document.
    assert [bytes(d.astype(np.uint8)) for d in corpora.documents(info, "val")] == [b"alpha"]
    train = [bytes(d.astype(np.uint8)) for d in corpora.documents(info, "train")]
    assert train == [b"delta", b"epsilon"] and info.train_tokens == 6 + 8
    meta = shards.read_dataset_info(info.dir)
    assert (meta.val_documents, meta.train_documents) == (1, 2)
    import json

    raw = json.loads((info.dir / shards.METADATA).read_text())
    assert (raw["documents_filtered"], raw["documents_empty"]) == (2, 1)
    assert raw["filters"] == ["score>=3"] and raw["text_field"] == "body"
    # One more token than 'alpha' holds: the first document crossing it is 'delta'.
    wider = prepare.prepare([path], tmp_path / "o7", **{**kw, "val_tokens": 7}).info
    assert (wider.val_documents, wider.train_documents) == (2, 1)


def _tokenizer_with_bos(path):
    """The test BPE with Llama 3's post-processor: <|begin_of_text|> before every text."""
    from tokenizers import processors

    tok = load_tokenizer(str(corpora.tokenizer_json(path)))
    backend = tok.backend
    backend.add_special_tokens(["<|begin_of_text|>"])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    backend.save(str(path))
    return bos


def test_bos_follows_the_tokenizer_or_the_flag(tmp_path):
    bos = _tokenizer_with_bos(tmp_path / "tokenizer.json")
    data = corpora.write_jsonl(tmp_path / "in.jsonl", [{"text": "the fox"}, {"text": "owls"}])
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    ids = [tok.encode("the fox").tolist(), tok.encode("owls").tolist()]
    spec = str(tmp_path / "tokenizer.json")
    auto = prepare.prepare([data], tmp_path / "auto", spec, val_tokens=0).info
    expected = [bos, *ids[0], tok.eos_id, bos, *ids[1], tok.eos_id]
    assert corpora.stream(auto, "train").tolist() == expected and auto.bos_id == bos
    off = prepare.prepare([data], tmp_path / "off", spec, val_tokens=0, bos="no").info
    assert corpora.stream(off, "train").tolist() == [*ids[0], 0, *ids[1], 0] and off.bos_id is None
    with pytest.raises(ValueError, match="'bytes' tokenizer has no BOS.*drop --bos yes"):
        prepare.prepare([data], tmp_path / "b", "bytes", bos="yes")


def test_special_token_text_inside_a_document_is_not_a_boundary(tmp_path):
    data = corpora.write_jsonl(tmp_path / "in.jsonl", [{"text": "a <|endoftext|> b"}])
    spec = str(corpora.tokenizer_json(tmp_path / "tokenizer.json"))
    info = prepare.prepare([data], tmp_path / "out", spec, val_tokens=0).info
    stream = corpora.stream(info, "train")
    assert (stream == info.eos_id).sum() == 1 and stream[-1] == info.eos_id


def test_progress_lines_when_stderr_is_a_file(corpus, tmp_path):
    inputs, tok, *_ = corpus
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "fogjax.data.prepare", "--input", str(inputs), "--output",
           str(tmp_path / "out"), "--tokenizer", str(tok), "--workers", "1", "--log-every", "0",
           "--unit-bytes", "500", "--val-tokens", "700"]  # fmt: skip
    with open(log, "w") as stderr:
        done = subprocess.run(cmd, cwd=REPO_ROOT, stderr=stderr, stdout=subprocess.PIPE, text=True)
    lines = log.read_text().splitlines()
    assert done.returncode == 0, lines[-5:]
    assert len(lines) >= 3 and all(line.startswith("prepare: ") for line in lines), lines
    last = lines[-1]
    for field in ("9/9 units,", "4/4 files,", "96 documents", "tokens,", "MB,", "MB/s", "ETA"):
        assert field in last, last
    assert "\r" not in log.read_text()  # No bar redrawn into a log.


def test_a_bar_on_a_terminal(corpus, tmp_path):
    inputs, tok, *_ = corpus
    screen = io.StringIO()
    prepare.prepare([inputs], tmp_path / "out", str(tok), progress_stream=screen, tty=True, **SMALL)
    assert "%|" in screen.getvalue() and "units" in screen.getvalue()
