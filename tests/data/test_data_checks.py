"""What the trainer finds wrong with a dataset before it starts: a damaged or incomplete
metadata.json, shards edited after preparation (cheap scan cache), and a batch of one."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import test_data_pipeline as tdp

from fogjax import data
from fogjax.data import prepare, shard_scan, shards


@pytest.fixture
def dataset(tmp_path):
    return prepare.prepare_documents(
        ["1" + " " * 20 + "500", "600 800"], tmp_path / "d", tdp.RangeTokenizer(), val_fraction=0.3,
        shard_tokens=200,
    )  # fmt: skip


def test_damaged_metadata_names_the_file_and_the_fix(dataset):
    path = dataset.dir / shards.METADATA
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in meta.items() if k != "splits"}))
    with pytest.raises(ValueError, match=rf"{path} is incomplete: it has no 'splits' field.*"
                       r"Restore it from a copy, or prepare the dataset again"):  # fmt: skip
        shards.read_dataset_info(dataset.dir)
    path.write_text(json.dumps(meta)[:-20])
    with pytest.raises(ValueError, match=rf"{path} is damaged: not valid JSON"):
        shards.read_dataset_info(dataset.dir)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path} is format"):
        shards.read_dataset_info(dataset.dir)


def test_scan_cache_trusts_untouched_shards_and_rescans_edited_ones(dataset, monkeypatch):
    # Preparation primed the cache: nothing is scanned on the first start-up.
    scanned = []
    real_scan = shard_scan.scan
    monkeypatch.setattr(shard_scan, "scan", lambda p: scanned.append(p.name) or real_scan(p))
    first = shard_scan.shard_max_token_ids(dataset)
    assert scanned == [] and max(first.values()) == 799
    shard = dataset.train_shards[0]
    ids = np.load(shard)
    ids[3] = 70000
    np.save(shard, ids)  # Same size, new mtime.
    again = shard_scan.shard_max_token_ids(dataset)
    assert scanned == [shard.name] and again[shard] == 70000
    assert shard_scan.shard_max_token_ids(dataset)[shard] == 70000 and scanned == [shard.name]
    # A shard whose mtime is restored but whose size differs is scanned too.
    stat = shard.stat()
    np.save(shard, ids[:-1])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shard_scan.shard_max_token_ids(dataset)
    assert scanned == [shard.name] * 2


def test_read_only_dataset_caches_in_the_user_cache(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("FOGJAX_CACHE", str(tmp_path / "cache"))
    (dataset.dir / shard_scan.CACHE_FILE).unlink()
    real_write = shard_scan.write_text

    def read_only_dataset(path, text):  # chmod would not stop root, who runs CI containers.
        if path.parent == dataset.dir:
            raise PermissionError(13, "Read-only file system", str(path))
        real_write(path, text)

    monkeypatch.setattr(shard_scan, "write_text", read_only_dataset)
    assert max(shard_scan.shard_max_token_ids(dataset).values()) == 799
    (cached,) = (tmp_path / "cache" / "shard-scans").glob("*.json")
    assert len(json.loads(cached.read_text())["shards"]) == len(
        dataset.train_shards + dataset.val_shards
    )
    assert not (dataset.dir / shard_scan.CACHE_FILE).exists()


def test_a_batch_of_one(dataset):
    """grain's batch count of an endless stream overflowed for a batch of 1 (OverflowError)."""
    kw = {"seq_len": 8, "seed": 3}
    ones = data.make_train_iterator(dataset, global_batch_size=1, **kw)
    pairs = data.make_train_iterator(dataset, global_batch_size=2, **kw)
    first, second, pair = next(ones), next(ones), next(pairs)
    assert first.shape == (1, 9)
    np.testing.assert_array_equal(np.concatenate([first, second]), pair)


def test_start_up_checks_every_mixture_dataset_and_sets_the_eos_for_the_mask(dataset, tmp_path):
    from fogjax import config_lib
    from fogjax.data.mixture import load_mixture
    from fogjax.train import preflight

    other = prepare.prepare_documents(
        ["1 300", "400 500"], tmp_path / "o", tdp.RangeTokenizer(), val_fraction=0
    )
    config = config_lib.get_config("fog_flash", "tiny")
    config.model.vocab_size, config.train.seq_len = 2**20, 8
    config.data.mixture = f"{dataset.dir}=1,{other.dir}=1"
    config.data.document_mask = True
    mixture = load_mixture(config.data)
    preflight.check_data(mixture, config)  # The second has no validation split: not needed.
    assert config.data.eos_id == 0
    config.data.eos_id = 5
    with pytest.raises(ValueError, match=r"data.eos_id=5 but .* ends its documents with id 0"):
        preflight.check_data(mixture, config)
    config.data.eos_id, config.data.mixture = -1, f"{other.dir}=1,{dataset.dir}=1"
    with pytest.raises(ValueError, match=r"o has no usable validation split"):
        preflight.check_data(load_mixture(config.data), config)  # Now the first: evaluated.
