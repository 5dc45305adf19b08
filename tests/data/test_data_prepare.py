"""`python -m fogjax.data.prepare`: readers, tokenizers, round trip, dtype choice, clear errors.

Parallel, multi-host and resumed preparation: test_prepare_parallel.py, test_prepare_resume.py;
bad inputs from the command line: test_prepare_errors.py."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fogjax.data import prepare, shards
from fogjax.data.prepare import __main__ as prepare_cli
from fogjax.data.tokenizer import load_tokenizer, train_byte_level_bpe

DOCS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Ünïcödé — snow ☃ and emoji 🦊 survive the round trip.",
    "def f(x):\n    return x + 1\n",
    "A fourth document, in a .jsonl.gz file.",
    "Fifth: a parquet row.",
    "Sixth: another parquet row, a little longer than the fifth one.",
]


def _write_inputs(d):
    """DOCS spread over the four input formats, in the order `expand_inputs` sorts them."""
    d.mkdir()
    (d / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (d / "b.jsonl").write_text(
        json.dumps({"text": DOCS[1]}) + "\n\n" + json.dumps({"text": DOCS[2], "id": 7}) + "\n"
    )
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": DOCS[3]}) + "\n" + json.dumps({"text": ""}) + "\n")
    pq.write_table(pa.table({"text": DOCS[4:], "n": [1, 2]}), d / "d.parquet")
    return d


def _documents(info, split, tok):
    """The documents of a split: its token stream cut after each EOS, decoded."""
    stream = np.concatenate([np.load(p) for p in info.shards(split)])
    assert stream[-1] == info.eos_id, "every document ends with EOS"
    pieces = np.split(stream, np.flatnonzero(stream == info.eos_id) + 1)[:-1]
    return [tok.decode(p[:-1]) for p in pieces]


class RangeTokenizer:
    """'a b' encodes to arange(a, b): a stand-in with a vocabulary too large for uint16."""

    spec, eos_token, eos_id = "range", "<eos>", 0

    def __init__(self, vocab_size=2**20):
        self.vocab_size = vocab_size

    def encode_batch(self, texts):
        return [np.arange(*map(int, t.split())) for t in texts]


def test_round_trip_all_formats_bytes(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    info = prepare.prepare([inputs], tmp_path / "out", "bytes", val_tokens=0, shard_tokens=50).info
    tok = info.load_tokenizer()
    assert _documents(info, "train", tok) == DOCS  # The empty jsonl document is skipped.
    assert info.train_documents == len(DOCS) and info.val_tokens == 0
    assert info.train_tokens == sum(len(d.encode()) + 1 for d in DOCS)
    assert len(info.train_shards) == -(-info.train_tokens // 50)  # Cut into 50-token shards.
    assert (info.vocab_size, info.eos_id, info.dtype) == (257, 256, "uint16")
    meta = json.loads((info.dir / shards.METADATA).read_text())
    assert meta["splits"]["train"]["tokens"] == info.train_tokens and len(meta["sources"]) == 4


def test_round_trip_tokenizer_json_with_validation_split(tmp_path):
    bpe = train_byte_level_bpe(DOCS * 3, vocab_size=300, eos_token="<|endoftext|>")
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    inputs = _write_inputs(tmp_path / "in")
    first = len(bpe.encode(DOCS[0])) + 1  # Its tokens and EOS.
    info = prepare.prepare(
        [inputs], tmp_path / "out", str(tmp_path / "tokenizer.json"), val_tokens=first + 1
    ).info
    # The folder carries its own copy, the very file.
    assert (info.dir / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    tok = info.load_tokenizer()
    train, val = _documents(info, "train", tok), _documents(info, "val", tok)
    assert val == DOCS[:2] and train == DOCS[2:]  # The first documents, past val_tokens.
    assert (info.vocab_size, info.eos_id) == (tok.vocab_size, tok.eos_id) == (300, 0)


def test_tokenizer_shipped_in_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fogjax_test_tokpkg"
    (pkg / "assets").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    train_byte_level_bpe(DOCS, 280, "</s>").backend.save(str(pkg / "assets" / "tokenizer.json"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    tok = load_tokenizer("fogjax_test_tokpkg:assets/tokenizer.json")
    assert tok.decode(tok.encode(DOCS[1])) == DOCS[1] and tok.eos_token == "</s>"
    assert load_tokenizer("fogjax_test_tokpkg:assets").vocab_size == tok.vocab_size
    with pytest.raises(FileNotFoundError, match="PACKAGE:RESOURCE"):
        load_tokenizer("fogjax_test_tokpkg:assets/missing.json")


def test_bytes_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    ids = np.concatenate([tok.encode(DOCS[1]), [tok.eos_id], tok.encode(DOCS[2])])
    assert tok.decode(ids) == DOCS[1] + "<|endoftext|>" + DOCS[2]


def test_dtype_choice(tmp_path):
    assert shards.token_dtype(257) == np.uint16
    assert shards.token_dtype(2**16) == np.uint16  # Ids 0..65535 all fit.
    assert shards.token_dtype(2**16 + 1) == np.uint32
    assert shards.token_dtype(100, "uint32") == np.uint32
    small = prepare.prepare_documents(
        ["1 9"], tmp_path / "a", RangeTokenizer(2**16), val_fraction=0
    )
    large = prepare.prepare_documents(
        ["1 9"], tmp_path / "b", RangeTokenizer(2**20), val_fraction=0
    )
    assert np.load(small.train_shards[0]).dtype == np.uint16 and small.dtype == "uint16"
    assert np.load(large.train_shards[0]).dtype == np.uint32 and large.dtype == "uint32"
    assert np.load(large.train_shards[0]).tolist() == list(range(1, 9)) + [0]


def test_error_vocabulary_too_large_for_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"1048576 tokens does not fit uint16.*--dtype uint32"):
        prepare.prepare_documents(["1 9"], tmp_path / "o", RangeTokenizer(), dtype="uint16")
    with pytest.raises(ValueError, match="does not fit uint32.*smaller vocabulary"):
        shards.token_dtype(2**32 + 1)
    assert not (tmp_path / "o").exists()


def test_error_missing_input(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*does not exist.*--input"):
        prepare.prepare([missing], tmp_path / "out")


def test_error_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match=r"No text found in 2 input file.*--text-field"):
        prepare.prepare([tmp_path / "empty.txt", tmp_path / "blank.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out" / shards.METADATA).exists()  # Not a dataset.


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.csv", "a,b", r"unsupported format.*\.jsonl"),
        ("x.jsonl", '{"body": "hi"}\n', r"x\.jsonl:1 has no string 'text' field.*--text-field"),
        ("x.jsonl", "not json\n", r"x\.jsonl:1 is not valid JSON"),
    ],
)
def test_error_malformed_input(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        prepare.prepare([tmp_path / name], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # Refused before anything was written.


def test_error_no_training_document_then_a_smaller_val_tokens(tmp_path):
    (tmp_path / "one.txt").write_text("a single document of 100 bytes".ljust(100, "."))
    with pytest.raises(ValueError, match="leaves no training document.*smaller --val-tokens"):
        prepare.prepare([tmp_path / "one.txt"], tmp_path / "out")  # 5% takes the one document.
    # --val-tokens may change until the dataset is finished: nothing is prepared again.
    result = prepare.prepare([tmp_path / "one.txt"], tmp_path / "out", val_tokens=0)
    assert result.prepared == 0 and result.info.train_documents == 1
    with pytest.raises(ValueError, match="other settings: --val-tokens: 0 before, 5 now"):
        prepare.prepare([tmp_path / "one.txt"], tmp_path / "out", val_tokens=5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="already holds other files.*new --output"):
        prepare.prepare([tmp_path / "one.txt"], tmp_path / "other", val_tokens=0)
    with pytest.raises(FileNotFoundError, match="'bytes', a path to a tokenizer.json"):
        prepare.prepare([tmp_path / "one.txt"], tmp_path / "o2", "no/such/tokenizer.json")


def test_in_memory_validation_split_follows_character_fraction():
    split = prepare.ValidationSplit(0.1)
    lengths = [(7 * i) % 23 + 1 for i in range(2000)]
    held = [n for n in lengths if split.is_validation("x" * n)]
    assert held and abs(sum(held) / sum(lengths) - 0.1) < 0.01


def test_cli(tmp_path, capsys):
    inputs = _write_inputs(tmp_path / "in")
    out = str(tmp_path / "o")
    prepare_cli.main(["--input", str(inputs), "--output", out, "--val-tokens", "40", "--workers=0"])
    assert "train tokens" in capsys.readouterr().out
    info = shards.read_dataset_info(tmp_path / "o")
    assert info.val_documents == 1 and info.tokenizer == "bytes"  # DOCS[0]: 45 bytes + EOS.
    with pytest.raises(SystemExit) as exit_info:
        prepare_cli.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o3")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_token_ids_beyond_the_shard_dtype_are_refused(tmp_path):
    from fogjax.data.shards import ShardWriter

    writer = ShardWriter(tmp_path, "train", np.uint16, shard_tokens=100)
    writer.add_document(np.array([1, 2, 65535]), eos_id=0)
    with pytest.raises(ValueError, match="Token id 70000 does not fit the uint16 shards"):
        writer.add_document(np.array([5, 70000]), eos_id=0)


def test_hosts_from_a_slurm_job_array():
    array = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert prepare_cli.hosts_from_env(None, None, array) == (4, 2)  # --array=5-8
    assert prepare_cli.hosts_from_env(2, 1, array) == (2, 1)  # The flags win.
    assert prepare_cli.hosts_from_env(None, None, {}) == (1, 0)


def test_the_same_tokenizer_file_moved_is_not_a_change(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    bpe = train_byte_level_bpe(DOCS, vocab_size=280, eos_token="<|endoftext|>")
    (tmp_path / "a").mkdir()
    bpe.backend.save(str(tmp_path / "a" / "tokenizer.json"))
    first = prepare.prepare([inputs], tmp_path / "out", str(tmp_path / "a"), val_tokens=0)
    (tmp_path / "a").rename(tmp_path / "b")
    again = prepare.prepare([inputs], tmp_path / "out", str(tmp_path / "b"), val_tokens=0)
    assert again.prepared == 0 and again.info == first.info
    other = train_byte_level_bpe(DOCS, vocab_size=290, eos_token="<|endoftext|>")
    other.backend.save(str(tmp_path / "b" / "tokenizer.json"))
    with pytest.raises(ValueError, match="--tokenizer \\(the file's contents, sha256\\)"):
        prepare.prepare([inputs], tmp_path / "out", str(tmp_path / "b"), val_tokens=0)
