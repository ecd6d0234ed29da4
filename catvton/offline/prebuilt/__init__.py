"""The tiny base and the tiny alpha that ``configs/tiny.yaml`` resolves to, committed to the
repository so that a fresh clone skips their ~10 CPU minutes of training (issue 12).

Each sub-folder is named by its cache key (``tiny-base-<hash>``, ``tiny-alpha-<hash>``): the hash of
everything that decides the weights, the builder's source included. A folder is used only when the
key the code computes *now* names it, so a changed builder, preset or base never picks up a stale
file: it builds from scratch as before. ``CATVTON_PREBUILT=0`` turns shipping off (the default path
must still build them).

    python -m catvton.offline.ship --refresh   # rebuild both from scratch and replace these folders
    python -m catvton.offline.ship --check     # rebuild from scratch and compare with these folders
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWITCH = "CATVTON_PREBUILT"
"""Environment variable: ``0`` (or ``false``/``no``/``off``) builds instead of copying."""


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def shipped(key: str) -> Path | None:
    """The committed folder for cache key ``key``, or None (not shipped, or shipping turned off)."""
    folder = HERE / key
    return folder if enabled() and folder.is_dir() else None


def folders() -> list[Path]:
    """Every shipped folder."""
    return sorted(p for p in HERE.iterdir() if p.is_dir() and p.name.startswith("tiny-"))


def copy_into(src: Path, dst: Path) -> None:
    """Copy a shipped folder's files into ``dst`` (a build's temporary folder)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
