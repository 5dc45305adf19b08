"""The grain pipeline: windows, shuffle, per-process slices, iterator state, evaluation batches."""

import json

import numpy as np
import pytest

from fogjax import data
from fogjax.data import prepare

SEQ = 8


class RangeTokenizer:
    """'a b' encodes to arange(a, b), so every window is identified by its first token."""

    spec, eos_token, eos_id, vocab_size = "range", "<eos>", 0, 2**20

    def encode_batch(self, texts):
        return [np.arange(*map(int, t.split())) for t in texts]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Train: ids 1..779 + EOS in shards of 300, 300, 180 tokens -> 37 + 37 + 22 = 96 windows of 9
    (12 batches of 8 per epoch). Val: ids 100000..100299 + EOS -> 37 windows."""
    out = tmp_path_factory.mktemp("ds") / "data"
    # The split goes by characters: the padded first text trains, the shorter second is held out.
    docs = ["1" + " " * 20 + "780", "100000 100300"]
    return prepare.prepare_documents(
        docs, out, RangeTokenizer(), val_fraction=0.4, shard_tokens=300
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _iterator(ds, **kw):
    kw = {"seq_len": SEQ, "global_batch_size": 8, "seed": 0, **kw}
    return data.make_train_iterator(ds, **kw)


def test_windows(dataset):
    windows = data.TokenWindows(dataset.train_shards, SEQ)
    assert len(windows) == 96 and len(dataset.train_shards) == 3
    w = windows[0]
    assert w.dtype == np.int32 and w.tolist() == list(range(1, SEQ + 2))
    assert windows[1][0] == w[-1]  # Consecutive windows share one token: each target once.
    assert windows[37][0] == 301  # Windows stay inside a shard: the second starts at its start.


def test_batch_shape_and_dtype(dataset):
    batch = next(_iterator(dataset))
    assert batch.shape == (8, SEQ + 1) and batch.dtype == np.int32
    assert (np.diff(batch[:, :-1], axis=1) == 1).all()  # Rows are contiguous text windows.


def test_shuffle_is_deterministic_by_seed(dataset):
    a = np.stack(_take(_iterator(dataset, seed=3), 30))
    b = np.stack(_take(_iterator(dataset, seed=3), 30))
    c = np.stack(_take(_iterator(dataset, seed=4), 30))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    n = len(data.TokenWindows(dataset.train_shards, SEQ))  # 96: 12 batches per epoch.
    starts = a[:, :, 0].reshape(-1)
    first, second = starts[:n], starts[n : 2 * n]
    assert sorted(first) == sorted(second) and len(set(first)) == n  # Each epoch is a permutation,
    assert not np.array_equal(first, second)  # and reshuffled.


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_assemble_the_single_process_batch(dataset, process_count):
    steps = 15  # Crosses the epoch boundary at 12 batches.
    single = _take(_iterator(dataset), steps)
    local = [
        _take(_iterator(dataset, process_index=p, process_count=process_count), steps)
        for p in range(process_count)
    ]
    for step in range(steps):
        parts = [local[p][step] for p in range(process_count)]
        assert parts[0].shape == (8 // process_count, SEQ + 1)
        np.testing.assert_array_equal(np.concatenate(parts), single[step])
    # One epoch (12 global batches): slices are disjoint and together hold every window once.
    starts = [np.stack(local[p][:12])[:, :, 0].reshape(-1).tolist() for p in range(process_count)]
    flat = sum(starts, [])
    assert len(flat) == len(set(flat)) == len(data.TokenWindows(dataset.train_shards, SEQ))
    for p in range(1, process_count):
        assert not set(starts[0]) & set(starts[p])


def test_iterator_state_round_trip(dataset):
    it = _iterator(dataset, seed=1)
    _take(it, 10)
    state = json.loads(json.dumps(it.get_state()))  # Checkpoints store it as JSON.
    expected = _take(it, 5)  # Crosses the epoch boundary.
    fresh = _iterator(dataset, seed=1)
    fresh.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(fresh, 5)), np.stack(expected))


@pytest.mark.slow
def test_iterator_state_round_trip_with_workers(dataset):
    it = _iterator(dataset, num_workers=1)
    try:
        np.testing.assert_array_equal(
            np.stack(_take(it, 3)), np.stack(_take(_iterator(dataset), 3))
        )
        state = it.get_state()
        expected = np.stack(_take(it, 3))
    finally:
        it.close()
    fresh = _iterator(dataset, num_workers=1)
    try:
        fresh.set_state(state)
        np.testing.assert_array_equal(np.stack(_take(fresh, 3)), expected)
    finally:
        fresh.close()


def test_state_restores_across_worker_counts_and_process_counts(dataset):
    it = _iterator(dataset, num_workers=1)
    try:
        _take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    assert state == {"batches_consumed": 4}
    straight = _iterator(dataset)
    _take(straight, 4)
    expected = np.stack(_take(straight, 3))
    in_process = _iterator(dataset)  # num_workers=0 reads a state written with a worker
    in_process.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(in_process, 3)), expected)
    # A state written by a 2-process run resumes a 1-process run at the same global batches.
    halves = [_iterator(dataset, process_index=p, process_count=2) for p in range(2)]
    for half in halves:
        half.set_state(state)
    joined = np.concatenate([np.stack(_take(h, 3)) for h in halves], axis=1)
    np.testing.assert_array_equal(joined, expected)


def test_unrecognised_state_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match="Unrecognised data-iterator state"):
        _iterator(dataset).set_state({"next_index": 3})


def test_error_batch_not_divisible_by_processes(dataset):
    with pytest.raises(
        ValueError, match=r"train\.batch_size=6 is not divisible .* process count 4"
    ):
        _iterator(dataset, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match=r"train\.batch_size=6 is not divisible"):
        data.eval_batches(dataset, seq_len=SEQ, batch_size=6, num_batches=1, process_count=4)


def test_error_seq_len_longer_than_data(dataset):
    with pytest.raises(
        ValueError, match=r"too few .* train\.seq_len \+ 1 = 1001.*Lower train\.seq_len"
    ):
        _iterator(dataset, seq_len=1000)
    with pytest.raises(ValueError, match=r"val split .* 301 tokens.*Lower train\.seq_len"):
        data.eval_batches(dataset, seq_len=400, batch_size=2, num_batches=1)


def test_error_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a prepared dataset.*fogjax\.data\.prepare"):
        _iterator(tmp_path)


def test_eval_batches(dataset):
    kw = {"seq_len": SEQ, "batch_size": 4, "num_batches": 3}
    single = list(data.eval_batches(dataset, **kw))
    assert len(single) == 3 and single[0].shape == (4, SEQ + 1) and single[0].dtype == np.int32
    np.testing.assert_array_equal(single[0][0], np.arange(100000, 100000 + SEQ + 1))  # In order.
    np.testing.assert_array_equal(
        np.stack(single), np.stack(list(data.eval_batches(dataset, **kw)))
    )
    halves = [
        list(data.eval_batches(dataset, **kw, process_index=p, process_count=2)) for p in (0, 1)
    ]
    for g in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][g], halves[1][g]]), single[g])
    many = list(data.eval_batches(dataset, seq_len=SEQ, batch_size=8, num_batches=6))
    np.testing.assert_array_equal(many[0][0], many[4][5])  # 37 windows are cycled to fill 48.


def test_eval_without_validation_split(tmp_path):
    info = prepare.prepare_documents(["1 100"], tmp_path / "d", RangeTokenizer(), val_fraction=0)
    with pytest.raises(ValueError, match="no validation split.*--val-tokens > 0"):
        data.eval_batches(info, seq_len=SEQ, batch_size=2, num_batches=1)
