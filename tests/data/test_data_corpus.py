"""The embedded corpus: prepared offline from pydoc_data and the stdlib, cached atomically."""

import socket

import numpy as np
import pytest
from helpers import REPO_ROOT

from fogjax import data
from fogjax.data import corpus


def _no_network(*args, **kwargs):
    raise AssertionError("the embedded corpus must not touch the network")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FOGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache folder, DatasetInfo) of one offline build of the BPE corpus, shared (it takes
    seconds); tests that use it set FOGJAX_CACHE to it again."""
    cache_dir = tmp_path_factory.mktemp("corpus") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOGJAX_CACHE", str(cache_dir))
        mp.setattr(socket.socket, "connect", _no_network)
        return cache_dir, data.load_dataset_info("embedded")


def load_default_config():
    import importlib.util
    import os

    path = os.path.join(REPO_ROOT, "configs", "default.py")
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _decoded_documents(info, split):
    tok = info.load_tokenizer()
    stream = np.concatenate([np.load(p) for p in info.shards(split)])
    pieces = np.split(stream, np.flatnonzero(stream == info.eos_id) + 1)[:-1]
    return [tok.decode(p[:-1]) for p in pieces]


def test_embedded_prepares_offline_and_is_cached(built, monkeypatch):
    cache, info = built
    monkeypatch.setenv("FOGJAX_CACHE", str(cache))
    assert info.dir.parent == cache and info.dir.name.startswith("embedded-bpe-")
    assert (info.vocab_size, info.eos_id, info.dtype) == (4096, 0, "uint16")
    assert info.val_tokens > 64 * 129  # Fills the tiny eval.
    # The default run sees each training token at most once (no memorisation to show).
    default = load_default_config()
    seen = default.train.steps * default.train.batch_size * default.train.seq_len
    windows = info.train_tokens // (default.train.seq_len + 1)
    assert seen <= info.train_tokens and default.train.steps * default.train.batch_size <= windows
    docs = corpus.documents()
    train, val = _decoded_documents(info, "train"), _decoded_documents(info, "val")
    assert sorted(train + val) == sorted(docs)  # Real text, exactly recoverable.
    assert 0.05 < sum(map(len, val)) / sum(map(len, docs)) <= corpus.VAL_FRACTION
    assert [p.name for p in cache.iterdir()] == [info.dir.name]  # No temporary folder is left.

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached corpus must not be tokenised again")

    monkeypatch.setattr(corpus, "_build", no_rebuild)
    assert data.load_dataset_info("embedded") == info


def test_embedded_is_deterministic(built, cache):
    first = built[1]
    second = data.load_dataset_info("embedded")
    assert first.dir.name == second.dir.name and first.dir != second.dir
    for name in ("tokenizer.json", "train_00000.npy", "val_00000.npy"):
        assert (first.dir / name).read_bytes() == (second.dir / name).read_bytes()


def test_embedded_race_and_crash_leave_one_complete_cache(cache, monkeypatch):
    build = corpus._build

    def crash(docs, tokenizer, output):
        build(docs, tokenizer, output)
        raise KeyboardInterrupt  # Killed after tokenising, before the rename.

    monkeypatch.setattr(corpus, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        corpus.embedded_dataset_dir("bytes")
    assert list(cache.iterdir()) == []  # No half cache.

    def lose_race(docs, tokenizer, output):
        build(docs, tokenizer, output)
        # Another process finishes first and renames its copy into place.
        final = cache / f"embedded-{tokenizer}-{corpus._fingerprint(docs, tokenizer)}"
        build(docs, tokenizer, final)
        (final / "winner").touch()

    monkeypatch.setattr(corpus, "_build", lose_race)
    path = corpus.embedded_dataset_dir("bytes")
    assert (path / "winner").exists() and [p.name for p in cache.iterdir()] == [path.name]
    info = data.load_dataset_info("embedded:bytes")
    assert info.dir == path and (info.vocab_size, info.eos_id) == (257, 256)
    with pytest.raises(ValueError, match="embedded:bytes"):
        data.load_dataset_info("embedded:wordpiece")


def test_embedded_trains_the_tiny_config_shapes(built, monkeypatch):
    monkeypatch.setenv("FOGJAX_CACHE", str(built[0]))
    it = data.make_train_iterator("embedded", seq_len=128, global_batch_size=16, seed=0)
    batch = next(it)
    assert batch.shape == (16, 129) and batch.dtype == np.int32 and batch.max() < 4096
    evals = list(data.eval_batches("embedded", seq_len=128, batch_size=16, num_batches=4))
    assert len(evals) == 4 and all(b.shape == (16, 129) for b in evals)
