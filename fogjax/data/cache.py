"""The user's fogjax cache folder: ``$FOGJAX_CACHE``, default ``~/.cache/fogjax``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FOGJAX_CACHE`` or ``~/.cache/fogjax`` (not created here)."""
    return Path(os.environ.get("FOGJAX_CACHE") or Path.home() / ".cache" / "fogjax").expanduser()
