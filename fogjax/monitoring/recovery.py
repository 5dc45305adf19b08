"""Where to resume a diverged run from, and how: the advice of every divergence message.

The loss reported at step ``k`` is computed from the parameters after step ``k - 1``, which the
checkpoint of step ``k - 1`` holds. A divergence whose onset is step ``k`` therefore shows that
checkpoint ``k - 1`` already holds a diverged model; the newest checkpoint from before the
onset is the newest at step ``k - 2`` or earlier. The "last good checkpoint" used to be simply
the latest one, which at LR 1000 was saved after the collapse: following the advice trained the
dead model to 'completed'. Since a run resumes from its latest checkpoint, the later ones must
be moved aside first; the advice gives the command (moved, never deleted).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence


def newest_before(steps: Sequence[int], onset: int) -> int | None:
    """The newest of ``steps`` whose parameters predate a divergence with this ``onset``."""
    good = [s for s in steps if s <= onset - 2]
    return max(good) if good else None


def aside_folder(directory: str) -> str:
    return str(directory).rstrip("/") + ".diverged"


def move_aside_command(directory: str, steps: Sequence[int]) -> str:
    """``mkdir -p D.diverged && mv D/6 D/8 D.diverged/``: the shell command that moves ``steps``
    out of the way of a resume (kept, not deleted)."""
    aside = aside_folder(directory)
    paths = " ".join(shlex.quote(os.path.join(str(directory), str(s))) for s in sorted(steps))
    return f"mkdir -p {shlex.quote(aside)} && mv {paths} {shlex.quote(aside)}/"


def advice(directory: str, steps: Sequence[int], onset: int) -> str:
    """'Last good checkpoint: step S in D ...' and what to run to resume from it, for a
    divergence whose onset is step ``onset`` among the kept checkpoint ``steps``."""
    good = newest_before(steps, onset)
    if good is None:
        kept = f"kept: {sorted(steps)}" if steps else "none kept"
        return (
            f"Last good checkpoint: none in {directory} (none from before the divergence at "
            f"step {onset}; {kept}). Start again with a lower optim.peak_lr in another "
            f"--workdir, or move {directory} aside first."
        )
    later = [s for s in steps if s > good]
    head = (
        f"Last good checkpoint: step {good} in {directory} (the newest from before the "
        f"divergence at step {onset})."
    )
    if not later:
        return f"{head} Rerun on this workdir with a lower optim.peak_lr to resume from it."
    return (
        f"{head} To resume from it, move the later ones aside: "
        f"{move_aside_command(directory, later)} ; then rerun on this workdir with a lower "
        "optim.peak_lr."
    )
