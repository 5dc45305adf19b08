"""Where a dataset comes from: ``data.path`` names a prepared folder or the embedded corpus.

Kept apart from :mod:`fogjax.data.shards` (the on-disk format) so the modules form a line,
shards <- prepare <- corpus <- datasets, with no import circle.
"""

from __future__ import annotations

import os

from fogjax.data import corpus
from fogjax.data.shards import EMBEDDED, DatasetInfo, read_dataset_info


def load_dataset_info(path: str | os.PathLike | DatasetInfo) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``path``: a prepared folder, or 'embedded' (prepared and cached
    on first use, see :mod:`fogjax.data.corpus`; 'embedded:bytes' uses the byte tokenizer)."""
    if isinstance(path, DatasetInfo):
        return path
    if isinstance(path, str) and (path == EMBEDDED or path.startswith(EMBEDDED + ":")):
        _, _, tokenizer = path.partition(":")
        return read_dataset_info(corpus.embedded_dataset_dir(tokenizer or corpus.DEFAULT_TOKENIZER))
    return read_dataset_info(path)
