"""The tiny base and the tiny alpha that ``configs/tiny.yaml`` resolves to, committed to the
repository so that a fresh clone skips their ~10 CPU minutes of training (issue 12).

Each sub-folder is named by its cache key (``tiny-base-<hash>``, ``tiny-alpha-<hash>``): the hash of
everything that decides the weights, the builder's source included. A folder is used only when the
key the code computes *now* names it, so a changed builder, preset or base never picks up a stale
file: it builds from scratch as before. ``CATVTON_PREBUILT=0`` turns shipping off (the default path
must still build them).

Each folder also holds ``digests.json``, the sha256 of every other file in it, written by
``ship --refresh``; a shipped folder is used only when its files still have those digests (a few
milliseconds for the ~10 MB), so a damaged or hand-edited file is refused, not trained on.

    python -m catvton.offline.ship --refresh   # rebuild both from scratch and replace these folders
    python -m catvton.offline.ship --check     # rebuild from scratch and compare with these folders
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWITCH = "CATVTON_PREBUILT"
"""Environment variable: ``0`` (or ``false``/``no``/``off``) builds instead of copying."""


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


DIGESTS = "digests.json"
"""In each shipped folder: ``{relative path: sha256}`` of every other file in it."""


class DamagedShippedModel(RuntimeError):
    """A shipped folder whose files are not the ones ``ship --refresh`` recorded."""


def shipped(key: str) -> Path | None:
    """The committed folder for cache key ``key`` once :func:`verify` passed, or None (not shipped,
    or shipping turned off)."""
    folder = HERE / key
    if not (enabled() and folder.is_dir()):
        return None
    verify(folder)
    return folder


def file_digests(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file in ``folder`` but :data:`DIGESTS`."""
    folder = Path(folder)
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != DIGESTS}


def record_digests(folder: Path) -> None:
    """Write :data:`DIGESTS` for ``folder`` (``ship --refresh`` does, after copying a build)."""
    (Path(folder) / DIGESTS).write_text(json.dumps(file_digests(folder), indent=2, sort_keys=True) + "\n")


def verify(folder: Path) -> None:
    """Raise :class:`DamagedShippedModel` unless every file of ``folder`` has its recorded digest
    (and no file is missing or added)."""
    folder = Path(folder)
    record = folder / DIGESTS
    fix = (f"restore it (`git checkout -- {folder.name}` in catvton/offline/prebuilt), rebuild it with "
           f"`python -m catvton.offline.ship --refresh`, or set {SWITCH}=0 to train it instead")
    if not record.is_file():
        raise DamagedShippedModel(f"shipped model {folder} has no {DIGESTS}, so its files cannot be checked: {fix}")
    want, got = json.loads(record.read_text()), file_digests(folder)
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if bad:
        what = ", ".join(f"{k} ({'missing' if k not in got else 'not recorded' if k not in want else 'changed'})"
                         for k in bad[:5])
        raise DamagedShippedModel(f"shipped model {folder} is not what was shipped: {what}; {fix}")


def folders() -> list[Path]:
    """Every shipped folder."""
    return sorted(p for p in HERE.iterdir() if p.is_dir() and p.name.startswith("tiny-"))


def copy_into(src: Path, dst: Path) -> None:
    """Copy a shipped folder's files into ``dst`` (a build's temporary folder) and check the copy."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    verify(dst)
