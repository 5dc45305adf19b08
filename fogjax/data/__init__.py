"""Data: token shards on disk, and the grain pipeline that batches them.

    info = load_dataset_info(config.data.path)          # 'embedded' or a prepared folder
    it = make_train_iterator(info, seq_len=T, global_batch_size=B, seed=s,
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                                     # int32 [B // process_count, T + 1]
    state = it.get_state(); it.set_state(state)          # JSON-able; saved with checkpoints
    for batch in eval_batches(info, seq_len=T, batch_size=B, num_batches=n): ...

Prepare a corpus with ``python -m fogjax.data.prepare`` (see :mod:`fogjax.data.prepare`).
"""

from fogjax.data.datasets import load_dataset_info
from fogjax.data.pipeline import TokenWindows, eval_batches, make_train_iterator
from fogjax.data.shards import DatasetInfo, read_dataset_info, token_dtype
from fogjax.data.tokenizer import load_tokenizer

__all__ = [
    "DatasetInfo",
    "TokenWindows",
    "eval_batches",
    "load_dataset_info",
    "load_tokenizer",
    "make_train_iterator",
    "read_dataset_info",
    "token_dtype",
]
