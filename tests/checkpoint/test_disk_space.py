"""A full disk under the checkpoints (issue 21): refused before orbax writes when the free space
is short, and orbax's "No space left on device" from a save in flight (the disk filled up
meanwhile) turned into the same one-line DiskFullError naming the disk and the latest step.
The trainer's end to end (exit 4, summary, resume) is tests/train/test_faults.py."""

from __future__ import annotations

import errno
import logging
import os

import jax.numpy as jnp
import pytest

from fogjax.checkpoint import Checkpointer, disk_space
from fogjax.checkpoint.disk_space import DiskFullError

ORBAX_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "/x/": '
    "Failed to write 14819328 bytes to file 4: No space left on device [os_error_code='28']"
)


def state():
    return {"w": jnp.ones((256, 256), jnp.float32), "step": jnp.int32(0)}  # 256 KiB


def test_disk_full_errors_are_recognised_through_their_causes():
    assert disk_space.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_space.is_disk_full(ValueError(ORBAX_ENOSPC))
    try:
        try:
            raise ValueError(ORBAX_ENOSPC)
        except ValueError as inner:
            raise RuntimeError("Save Finalize thread failed") from inner
    except RuntimeError as outer:
        assert disk_space.is_disk_full(outer)
    for other in (OSError(errno.EACCES, "Permission denied"), ValueError("bad"), None):
        assert not disk_space.is_disk_full(other)
    assert disk_space.mount_point("/proc/self/status") == "/proc"
    assert disk_space.mount_point("/no/such/dir") == "/"


def test_a_save_without_room_is_refused_before_orbax_writes(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    with Checkpointer(directory, keep=3, async_save=False) as ckpt:
        assert ckpt.save(1, state(), {}, {})
        monkeypatch.setattr(disk_space, "fits", lambda where, need: need < 256 * 1024)
        with pytest.raises(DiskFullError) as e:
            ckpt.save(2, state(), {}, {})
        assert sorted(os.listdir(directory)) == ["1"]  # Not even a tmp folder.
    message = str(e.value)
    assert e.value.errno == errno.ENOSPC
    for needle in ("Checkpoint step 2 was not written", f"the disk of {directory} (mounted at",
                   "MiB free of", "needs up to 1.3 MiB", "The latest checkpoint is step 1",
                   "train.keep_checkpoints", "run the same command again"):  # fmt: skip
        assert needle in message, (needle, message)


def test_orbax_running_out_of_space_mid_save_is_the_same_one_line_error(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    assert ckpt.save(1, state(), {}, {})

    def fail(*args, **kwargs):  # What orbax raises when its background write hits ENOSPC.
        raise ValueError(ORBAX_ENOSPC)

    monkeypatch.setattr(ckpt._manager, "save", fail)
    with pytest.raises(
        DiskFullError, match=r"No space left on the disk of .* latest checkpoint is step 1"
    ):
        ckpt.save(2, state(), {}, {})
    monkeypatch.setattr(ckpt._manager, "wait_until_finished", fail)
    with pytest.raises(DiskFullError):
        ckpt.wait()
    # Leaving on an error, close's repeat of the same failure must not replace that error.
    with pytest.raises(KeyError, match="the error on its way up"), ckpt:
        raise KeyError("the error on its way up")


def test_orbax_logs_of_a_full_disk_are_dropped_by_the_commands_that_report_it(caplog):
    disk_space.quiet_disk_full_logs()
    disk_space.quiet_disk_full_logs()  # Once is enough: no second filter.
    absl = logging.getLogger("absl")
    assert sum(isinstance(f, disk_space._DiskFullRecords) for f in absl.filters) == 1
    with caplog.at_level(logging.ERROR):
        absl.error("[process=0] _SignalingThread.run() raised an exception: %s", ORBAX_ENOSPC)
        try:
            raise ValueError(ORBAX_ENOSPC)
        except ValueError:
            logging.getLogger("asyncio").exception("_GatheringFuture exception was never retrieved")
        absl.error("another error")
    assert [r.getMessage() for r in caplog.records] == ["another error"]
