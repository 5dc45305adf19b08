"""data.mixture: weighted draws from several prepared datasets, deterministic and resumable."""

from __future__ import annotations

import numpy as np
import pytest
import test_data_pipeline as tdp

from fogjax import data
from fogjax.data import prepare
from fogjax.data.mixture import Mixture, check_same_tokenizer, load_mixture, parse_mixture

SEQ = 8


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Dataset A: ids 1..2000, dataset B: ids 100000..100600 (a window's first id says whose)."""
    root = tmp_path_factory.mktemp("mix")
    tok = tdp.RangeTokenizer()
    a = prepare.prepare_documents(["1 2001"], root / "a", tok, val_fraction=0)
    b = prepare.prepare_documents(["100000 100601"], root / "b", tok, val_fraction=0)
    return a, b


def _config(spec, path="embedded"):
    import ml_collections

    return ml_collections.ConfigDict({"path": path, "mixture": spec})


def test_three_to_one_within_two_percent_and_resumes_exactly(two):
    a, b = two
    mixture = load_mixture(_config(f"{a.dir}=3,{b.dir}=1"))
    kw = {"seq_len": SEQ, "global_batch_size": 10, "seed": 7}
    it = data.make_train_iterator(mixture, **kw)
    batches = [next(it) for _ in range(100)]  # 1,000 windows.
    from_a = int(sum((batch[:, 0] < 100000).sum() for batch in batches))
    assert abs(from_a / 1000 - 0.75) <= 0.02
    # Every window is a window of its dataset (contiguous ids; the last may end in EOS = 0),
    # each dataset shuffled.
    flat = np.concatenate(batches)
    assert (np.diff(flat[:, :-1], axis=1) == 1).all()
    assert len({int(w[0]) for w in flat if w[0] < 100000}) > 200  # A's windows (250), not one.
    # Resume mid-run from the state: the same batches, on 2 processes too.
    state = {"batches_consumed": 37}
    resumed = data.make_train_iterator(mixture, **kw)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(20)]), batches[37:57])
    halves = [data.make_train_iterator(mixture, **kw, process_index=p, process_count=2)
              for p in (0, 1)]  # fmt: skip
    for h in halves:
        h.set_state(state)
    np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), batches[37])
    again = data.make_train_iterator(mixture, **kw)
    np.testing.assert_array_equal(next(again), batches[0])  # Deterministic by the seed.


def test_one_dataset_reads_as_before(two):
    a, _ = two
    kw = {"seq_len": SEQ, "global_batch_size": 4, "seed": 1}
    alone = data.make_train_iterator(a, **kw)
    as_mixture = data.make_train_iterator(load_mixture(_config("", path=str(a.dir))), **kw)
    for _ in range(5):
        np.testing.assert_array_equal(next(alone), next(as_mixture))


def test_bad_mixtures_are_refused(two, tmp_path):
    a, _ = two
    assert parse_mixture("/x=3, embedded:bytes=0.5") == [("/x", 3.0), ("embedded:bytes", 0.5)]
    for spec in ("/x", "/x=0", "/x=-1", "=2", "/x=three"):
        with pytest.raises(ValueError, match="is not PATH=WEIGHT.*--config.data.mixture="):
            parse_mixture(spec)
    other = prepare.prepare_documents(["some text"] * 3, tmp_path / "c", data.load_tokenizer(
        "bytes"), val_fraction=0)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"c was prepared with another tokenizer.*same --tokenizer"
    ):
        check_same_tokenizer((a, other))
    described = Mixture(((a, 3.0), (other, 1.0))).describe()
    assert "75.0%" in described and str(other.dir) in described
