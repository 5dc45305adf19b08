"""Data: token shards on disk, and the grain pipeline that batches them.

    info = load_dataset_info(config.data.path)          # 'embedded' or a prepared folder
    it = make_train_iterator(info, seq_len=T, global_batch_size=B, seed=s,
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                                     # int32 [B // process_count, T + 1]
    state = it.get_state(); it.set_state(state)          # JSON-able; saved with checkpoints
    for batch in eval_batches(info, seq_len=T, batch_size=B, num_batches=n): ...

Prepare a corpus with ``python -m fogjax.data.prepare`` (see :mod:`fogjax.data.prepare`).

The names below are imported on first use: ``fogjax.data.prepare``'s worker processes import
``fogjax.data.shards`` and must not pay for grain (3-4 s per process on a small machine).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetInfo": "fogjax.data.shards",
    "read_dataset_info": "fogjax.data.shards",
    "token_dtype": "fogjax.data.shards",
    "load_tokenizer": "fogjax.data.tokenizer",
    "load_dataset_info": "fogjax.data.datasets",
    "TokenWindows": "fogjax.data.pipeline",
    "eval_batches": "fogjax.data.pipeline",
    "make_train_iterator": "fogjax.data.pipeline",
    "Mixture": "fogjax.data.mixture",
    "load_mixture": "fogjax.data.mixture",
    "eval_dataset_info": "fogjax.data.mixture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fogjax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
