"""Checkpoints of a run with orbax: :mod:`.manager` (save / restore of train state, data-iterator
state and metadata), :mod:`.compatibility` (does a checkpoint fit this run?), :mod:`.checksums`
(per-array checksums recorded at save, verified at restore)."""

from fogjax.checkpoint.compatibility import CheckpointMismatchError, StatePrecisionMismatchError
from fogjax.checkpoint.manager import Checkpointer

__all__ = ["CheckpointMismatchError", "Checkpointer", "StatePrecisionMismatchError"]
