"""Checkpoint round trip, retention, corruption fallback, crash mid-save, mismatch, resharding."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fogjax.checkpoint import Checkpointer, CheckpointMismatchError

# The corruption tests make orbax's reads fail on purpose; tensorstore's asyncio callbacks that
# outlive the failed read then report "Event loop is closed" when collected. Harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int = 0, width: int = 8):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": jax.random.normal(k1, (4, width)),
        "b": jax.random.normal(k2, (width,)).astype(jnp.bfloat16),
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    _, opt_state = tx.update(params, opt_state, params)  # Non-zero moments, count 1.
    fp8 = {"amax_history": jax.random.uniform(k3, (2, 16)), "scale": jnp.array([1.5, 448.0])}
    return {"params": params, "opt_state": opt_state, "fp8": fp8, "step": jnp.int32(7 + seed)}


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _bytes(x):
    return np.asarray(x).reshape(-1).view(np.uint8)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bytes(x), _bytes(y))


def _save(ckpt, step, seed=0, width=8):
    assert ckpt.save(step, _state(seed, width), {"pos": step}, {"tokens_seen": step * 100})


def _snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def test_round_trip_is_bitwise(tmp_path):
    state = _state()
    data_state = {"epoch": 1, "index": 4097, "blob": b"\x00\xffgrain", "nested": [b"a", 2]}
    metadata = {"tokens_seen": 123456, "elapsed_s": 12.5, "config": {"model": {"d": 256}}}
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        assert ckpt.save(10, state, data_state, metadata)
    # A fresh instance, as after a restart.
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        assert ckpt.latest_step() == 10
        restored, data, meta = ckpt.restore(_abstract(state))
    _assert_bitwise_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert data == data_state
    assert meta == metadata


def test_state_may_be_donated_once_save_returns(tmp_path):
    state = _state()
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(str(tmp_path), keep=1) as ckpt:
        ckpt.save(1, state, {}, {})
        for x in jax.tree.leaves(state):
            x.delete()  # What donation to the next train step does to the buffers.
        restored, _, _ = ckpt.restore(_abstract(_state()))
    _assert_bitwise_equal(jax.tree.map(np.asarray, restored), expected)


def test_data_state_of_another_process_count_is_not_applied(tmp_path, caplog):
    with Checkpointer(str(tmp_path), keep=1) as ckpt:
        _save(ckpt, 1)
    data_dir = tmp_path / "1" / "data"
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
    with Checkpointer(str(tmp_path), keep=1) as ckpt, caplog.at_level(logging.WARNING):
        restored, data, meta = ckpt.restore(_abstract(_state()))
    assert data is None and "process_0-of-2.json" in caplog.text
    assert meta == {"tokens_seen": 100}


def test_keep_two_keeps_the_two_latest(tmp_path):
    with Checkpointer(str(tmp_path), keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            _save(ckpt, step)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert not ckpt.save(4, _state(), {}, {})  # Already saved: nothing to do.
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_saving_behind_the_latest_step_is_refused(tmp_path):
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        assert ckpt.latest_step() is None
        _save(ckpt, 1)
        _save(ckpt, 2)
        ckpt.restore(_abstract(_state()), step=1)  # Explicit: newer steps are left alone.
        assert not ckpt.save(1, _state(), {}, {})  # Already on disk: nothing to do.
        with pytest.raises(ValueError, match=r"step 0.*newer step 2.*--workdir"):
            ckpt.save(0, _state(), {}, {})
        assert ckpt.all_steps() == [1, 2]


def test_save_every_and_force(tmp_path):
    with Checkpointer(str(tmp_path), keep=5, save_every=10) as ckpt:
        assert not ckpt.save(5, _state(), {}, {})
        assert ckpt.save(10, _state(), {}, {})
        assert ckpt.save(13, _state(), {}, {}, force=True)  # E.g. SIGTERM.
        ckpt.wait()
        assert ckpt.all_steps() == [10, 13]


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        _save(ckpt, 1, seed=1)
        _save(ckpt, 2, seed=2)
    for f in (tmp_path / "2" / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:10])  # Truncated, as by a full disk.
    with Checkpointer(str(tmp_path), keep=3) as ckpt, caplog.at_level(logging.WARNING):
        restored, data, meta = ckpt.restore(_abstract(_state()))
        assert "step 2" in caplog.text and "unreadable" in caplog.text
        _assert_bitwise_equal(restored, _state(1))
        assert (data, meta) == ({"pos": 1}, {"tokens_seen": 100})
        # Training goes on from step 1; the broken step 2 is moved aside (never deleted: the read
        # error may have been transient) and replaced by the next save of it.
        _save(ckpt, 2, seed=5)
        ckpt.wait()
        restored, _, _ = ckpt.restore(_abstract(_state()))
    _assert_bitwise_equal(restored, _state(5))
    (kept,) = list((tmp_path.parent / (tmp_path.name + ".unreadable")).iterdir())
    assert kept.name.startswith("2-") and (kept / "state").is_dir()


def test_abstract_state_without_sharding_is_refused(tmp_path):
    with Checkpointer(str(tmp_path), keep=1) as ckpt:
        _save(ckpt, 1)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
        with pytest.raises(ValueError, match=r"'fp8/amax_history' has no sharding"):
            ckpt.restore(abstract)


def test_explicit_unreadable_step_raises(tmp_path):
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        _save(ckpt, 1)
    shutil.rmtree(tmp_path / "1" / "state" / "d")
    with Checkpointer(str(tmp_path), keep=3) as ckpt, pytest.raises(Exception):  # noqa: B017
        ckpt.restore(_abstract(_state()), step=1)
    with (
        Checkpointer(str(tmp_path), keep=3) as ckpt,
        pytest.raises(FileNotFoundError, match="No readable checkpoint"),
    ):
        ckpt.restore(_abstract(_state()))


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        _save(ckpt, 1, seed=1)
    # What a process killed during a save leaves: a partial temporary directory.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "1", partial)
    shutil.rmtree(partial / "state" / "d")
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        assert ckpt.latest_step() == 1
        restored, _, _ = ckpt.restore(_abstract(_state()))
        _assert_bitwise_equal(restored, _state(1))
        _save(ckpt, 2, seed=2)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # The partial directory is gone.
        _assert_bitwise_equal(ckpt.restore(_abstract(_state()))[0], _state(2))


def test_shape_mismatch_is_a_clear_error_and_changes_nothing(tmp_path):
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        _save(ckpt, 1, width=8)
    before = _snapshot(tmp_path)
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        with pytest.raises(
            CheckpointMismatchError,
            match=r"'opt_state/0/mu/b' has saved shape \(8,\), expected \(16,\) \(and 5 more",
        ) as e:
            ckpt.restore(_abstract(_state(width=16)))
        assert "--workdir" in str(e.value)
        other = _state()
        other["params"]["extra"] = jnp.zeros((3,))
        with pytest.raises(CheckpointMismatchError, match=r"params/extra.*not in the checkpoint"):
            ckpt.restore(_abstract(other))
    assert _snapshot(tmp_path) == before


def test_restore_onto_a_two_device_mesh(tmp_path):
    state = _state()
    with Checkpointer(str(tmp_path), keep=1) as ckpt:
        _save(ckpt, 3)
        mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
        replicated = NamedSharding(mesh, P())
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
        )
        row = NamedSharding(mesh, P("data", None))
        abstract["params"]["w"] = jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=row)
        restored, _, _ = ckpt.restore(abstract)
    w = restored["params"]["w"]
    assert w.sharding == row
    assert {s.data.shape for s in w.addressable_shards} == {(2, 8)}
    assert restored["fp8"]["scale"].sharding == replicated
    _assert_bitwise_equal(restored, state)


@pytest.mark.slow
def test_changed_bytes_fail_the_checksum_and_fall_back(tmp_path, caplog):
    """One flipped bit in an array file: orbax and zstd read it without complaint."""
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        _save(ckpt, 1, seed=1, width=1024)
        _save(ckpt, 2, seed=2, width=1024)
    files = [f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)  # Holds params/w's chunk.
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10
    largest.write_bytes(bytes(data))
    with Checkpointer(str(tmp_path), keep=3) as ckpt, caplog.at_level(logging.WARNING):
        restored, _, meta = ckpt.restore(_abstract(_state(width=1024)))
    assert "step 2" in caplog.text and "checksum mismatch" in caplog.text, caplog.text
    _assert_bitwise_equal(restored, _state(1, width=1024))
    assert meta == {"tokens_seen": 100}  # The checksums stay internal.


def test_checksum_matches_a_numpy_rederivation_on_any_mesh():
    from fogjax.checkpoint.checksums import array_checksum

    x = jax.random.normal(jax.random.key(3), (8, 6)).astype(jnp.bfloat16)
    bits = np.asarray(x).view(np.uint16).astype(np.uint64).reshape(-1)
    expected = int((bits * (2 * np.arange(bits.size, dtype=np.uint64) + 1)).sum() % 2**32)
    assert int(array_checksum(x)) == expected
    mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    assert int(jax.jit(array_checksum)(sharded)) == expected
    assert int(array_checksum(x.at[7, 5].set(1.0))) != expected


def test_a_reader_never_deletes_a_save_in_flight(tmp_path):
    """fogjax.evaluate beside a live trainer used to delete its <step>.orbax-checkpoint-tmp."""
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        _save(ckpt, 1, seed=1)
    in_flight = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "1", in_flight)
    before = _snapshot(tmp_path)
    with Checkpointer(str(tmp_path), keep=1, read_only=True) as reader:
        assert reader.latest_step() == 1
        _assert_bitwise_equal(reader.restore(_abstract(_state()))[0], _state(1))
        with pytest.raises(ValueError, match="read_only"):
            reader.save(3, _state(), {}, {})
    assert _snapshot(tmp_path) == before
    missing = tmp_path / "absent"
    with Checkpointer(str(missing), keep=1, read_only=True) as reader:
        assert reader.latest_step() is None
    assert not missing.exists()
