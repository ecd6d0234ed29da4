"""Where the project keeps what it builds once and reuses (synthetic data, the tiny base,
latent caches): ``$CATVTON_CACHE``, else ``~/.cache/catvton``. Nothing is created at import."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    env = os.environ.get("CATVTON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "catvton"
