"""Training and evaluation batches from token shards: grain over memory-mapped windows.

A split is cut into windows of ``seq_len + 1`` tokens that start every ``seq_len`` tokens (so each
token is predicted exactly once per epoch; inputs are ``w[:-1]``, targets ``w[1:]``). Windows stay
inside one shard, losing at most ``seq_len`` tokens per shard.

Multi-process: the global batch ``g`` is the same ``global_batch_size`` windows whatever the
process count, and process ``p`` yields rows ``[p * B_local, (p + 1) * B_local)`` of it. So the
batches of all processes, concatenated in process order, equal the batch of one process, and a
run can change its process count and still see the same data.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags

from fogjax.data import datasets, shards
from fogjax.data.mixture import Mixture

# One background reader keeps a few batches ready. Reads are memory-mapped copies (cheap), so more
# threads would only contend for the GIL with the training loop on small CPU hosts.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
# Mixed into the seed so data order is not correlated with other uses of config.seed.
_DATA_ORDER_TAG = 0x5EED_DA7A


class TokenWindows:
    """A random-access source of windows: element i is int32 [seq_len + 1].

    Pickles by shard paths (the memory maps are reopened lazily), so grain worker processes
    can use it without copying the data.
    """

    def __init__(self, paths: Sequence[Path], seq_len: int):
        if seq_len < 1:
            raise ValueError(f"train.seq_len must be positive, got {seq_len}.")
        self._paths = tuple(Path(p) for p in paths)
        self._seq_len = seq_len
        lengths = [int(np.load(p, mmap_mode="r").shape[0]) for p in self._paths]
        self.num_tokens = sum(lengths)
        # starts[k]: index of shard k's first window; a shard of n tokens has (n - 1) // T windows.
        self._starts = np.cumsum([0] + [max(n - 1, 0) // seq_len for n in lengths]).tolist()
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r") for p in self._paths]
        shard = bisect.bisect_right(self._starts, index) - 1
        start = (index - self._starts[shard]) * self._seq_len
        return self._arrays[shard][start : start + self._seq_len + 1].astype(np.int32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __repr__(self) -> str:
        return (
            f"TokenWindows({len(self._paths)} shards, seq_len={self._seq_len}, {len(self)} windows)"
        )


def _windows(info: shards.DatasetInfo, split: str, seq_len: int) -> TokenWindows:
    windows = TokenWindows(info.shards(split), seq_len)
    if len(windows) == 0:
        raise ValueError(
            f"The {split} split of {info.dir} has {windows.num_tokens} tokens, too few for one "
            f"sequence of train.seq_len + 1 = {seq_len + 1} tokens. Lower train.seq_len or prepare "
            "more text" + (" (or a larger --val-tokens)." if split == "val" else ".")
        )
    return windows


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1:
        raise ValueError(f"train.batch_size must be positive, got {global_batch_size}.")
    if global_batch_size % process_count:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the process count "
            f"{process_count}: each process loads an equal share. Set train.batch_size to a "
            f"multiple of {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    return global_batch_size // process_count


def _order_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e, so seeds s and s + 1 would share all but one epoch's
    # order; hashing the seed keeps different seeds' orders unrelated.
    return int(np.random.SeedSequence([seed, _DATA_ORDER_TAG]).generate_state(1)[0])


def _component_seed(seed: int, component: int) -> int:
    # Component 0 of a mixture is not shuffled like a lone dataset: no reuse of the order.
    return int(np.random.SeedSequence([seed, _DATA_ORDER_TAG, component]).generate_state(1)[0])


def _train_windows(
    data: Mixture | str | os.PathLike | shards.DatasetInfo, seq_len: int, seed: int
) -> tuple[grain.MapDataset, int]:
    """(the endless shuffled stream of training windows, windows in one pass of the data)."""
    if isinstance(data, Mixture) and len(data.components) == 1:
        data = data.components[0][0]
    if not isinstance(data, Mixture):
        windows = _windows(datasets.load_dataset_info(data), "train", seq_len)
        stream = grain.MapDataset.source(windows).shuffle(seed=_order_seed(seed)).repeat()
        return stream, len(windows)
    sources = [_windows(info, "train", seq_len) for info in data.infos]
    parts = [
        grain.MapDataset.source(w).shuffle(seed=_component_seed(seed, i)).repeat()
        for i, w in enumerate(sources)
    ]
    weights = [w for _, w in data.components]
    return grain.MapDataset.mix(parts, weights), sum(map(len, sources))


def make_train_iterator(
    data_dir: Mixture | str | os.PathLike | shards.DatasetInfo,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> TrainBatches:
    """An endless iterator of this process's training batches, int32 [B_local, seq_len + 1].

    ``B_local = global_batch_size // process_count``. Windows are shuffled by ``seed``, every epoch
    in a different deterministic order; batches may span an epoch boundary. The iterator's
    ``get_state()`` is ``{"batches_consumed": n}``; ``set_state`` on an iterator built with the
    same data, seq_len, batch size and seed resumes exactly there, on any process count and any
    ``num_workers`` (:class:`TrainBatches`).

    Args:
      data_dir: a prepared dataset folder, 'embedded', a :class:`DatasetInfo`, or a
        :class:`~fogjax.data.mixture.Mixture` (several datasets drawn with weights).
      seq_len: train.seq_len, tokens per input sequence (windows hold one more).
      global_batch_size: train.batch_size, sequences per step over all processes.
      seed: data-order seed (0 <= seed).
      process_index, process_count: this process and the number of processes.
      num_workers: grain worker processes (0 reads in this process).

    Raises:
      ValueError: the batch is not divisible by the process count, or seq_len exceeds the data.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    ds, size = _train_windows(data_dir, seq_len, seed)
    if size < global_batch_size:
        logging.warning(
            "The training data has %d windows of %d tokens, fewer than one batch of %d: batches "
            "will repeat windows.",
            size,
            seq_len + 1,
            global_batch_size,
        )
    # The shuffled stream is cut into local batches; batches p, p + P, p + 2P, ... go to process p,
    # so global batch g (local batches gP .. gP + P - 1) holds the same windows whatever P is.
    # drop_remainder: the stream is endless (sys.maxsize windows) and grain computes the batch
    # count of a kept remainder in floating point, which for a batch of 1 exceeds sys.maxsize
    # (an OverflowError); with it the count is exact, and no batch changes.
    batches = ds.batch(local, drop_remainder=True)
    return TrainBatches(batches[process_index::process_count], num_workers)


class TrainBatches:
    """This process's endless training batches with a position-only state.

    ``get_state()`` is ``{"batches_consumed": n}``: global batch n comes next. Because global
    batch n is the same windows whatever the process count (see the module docstring) and
    whatever the number of reader workers, a state restores exactly on any process layout and
    any ``num_workers``. ``set_state`` rebuilds the reader from that batch on (random access).
    """

    def __init__(self, batches: grain.MapDataset, num_workers: int = 0, start: int = 0):
        self._batches = batches
        self._num_workers = num_workers
        self._consumed = start
        self._it = self._reader(start)

    def _reader(self, start: int) -> Iterator[np.ndarray]:
        it = self._batches[start:].to_iter_dataset(_READ_OPTIONS)
        if self._num_workers > 0:
            # grain's workers read absl flags; outside absl.app (tests, notebooks) none were
            # parsed, so take their defaults rather than fail in the worker.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        return iter(it)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> np.ndarray:
        batch = next(self._it)
        self._consumed += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"batches_consumed": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        try:
            start = int(state["batches_consumed"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"Unrecognised data-iterator state {state!r}: expected {{'batches_consumed': n}}. "
                "It was written by another version of fogjax.data; resume with that version or "
                "start a new --workdir."
            ) from None
        if start < 0:
            raise ValueError(f"Data-iterator state {state!r} has a negative position.")
        self.close()
        self._consumed = start
        self._it = self._reader(start)

    def close(self) -> None:
        """Stops reader worker processes, if any (a no-op for in-process reading)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def eval_batches(
    data_dir: str | os.PathLike | shards.DatasetInfo,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """This process's validation batches, int32 [batch_size // process_count, seq_len + 1].

    The first ``num_batches * batch_size`` validation windows in order, no shuffle: the same every
    call. Global batch g holds windows [g * batch_size, (g + 1) * batch_size), split across
    processes as in training. A split with fewer windows is cycled (with a warning) so every call
    yields ``num_batches`` batches.

    Raises:
      ValueError: as :func:`make_train_iterator`, or the validation split is empty.
    """
    local = _local_batch_size(batch_size, process_index, process_count)
    info = datasets.load_dataset_info(data_dir)
    if info.val_tokens == 0:
        raise ValueError(
            f"{info.dir} has no validation split (prepared with --val-tokens 0). Prepare it "
            "again with --val-tokens > 0."
        )
    windows = _windows(info, "val", seq_len)
    if len(windows) < num_batches * batch_size:
        logging.warning(
            "The validation split of %s has %d windows of %d tokens, fewer than %d batches of %d: "
            "evaluation repeats windows.",
            info.dir,
            len(windows),
            seq_len + 1,
            num_batches,
            batch_size,
        )
    # Checks above run at the call; only reading the windows is deferred to iteration.
    return _eval_rows(windows, batch_size, local, process_index * local, num_batches)


def _eval_rows(
    windows: TokenWindows, batch_size: int, local: int, first: int, num_batches: int
) -> Iterator[np.ndarray]:
    for g in range(num_batches):
        rows = [(g * batch_size + first + r) % len(windows) for r in range(local)]
        yield np.stack([windows[i] for i in rows])
