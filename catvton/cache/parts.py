"""A latent cache built in parts, so that a build killed halfway resumes where it stopped.

The pids are cut into ``num_parts`` parts by a stable hash (:func:`part_of`): every row of a pid
lands in the same part whatever file holds it (the hub's shards do not promise that a pid stays in
one file). Each part is one run of the pipeline over its pids only. The work folder, beside the
cache and named after it (``<cache root>/latents-<key>.parts/``, so a rerun of the same config
finds it), holds::

    progress.json        {"num_parts": K, "done": {"3": {"pids", "rows", "valid", "pairs", "seconds"}}}
    part-00003/          one complete part: split=train/ split=val/ split=test/ split=_stats/
    part-00004.tmp/      a part being written (deleted by the next run)

A part is written into ``part-NNNNN.tmp``, renamed when complete and then recorded in
``progress.json`` (replaced atomically); a rerun computes only the parts not recorded. When every
part is done, their files are hard-linked into the cache's temporary folder (:func:`link_parts`),
so a clean build and a resumed one assemble the same files the same way; the work folder is
deleted once the cache is published.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from catvton.data.pairs import pid_unit
from catvton.data.source import Source, iter_rows

PROGRESS = "progress.json"

PART_BYTES = 512 << 20
"""Source parquet bytes per part when the caller does not choose: smaller parts lose less to a
crash, but every part reads the source files again (only the columns used, only its pids kept)."""

MAX_PARTS = 32


def work_dir(final: Path) -> Path:
    """The resumable state of the cache ``final``: ``<final>.parts`` beside it."""
    return final.parent / f"{final.name}.parts"


def part_of(pid: str, num_parts: int) -> int:
    """The part (0..num_parts-1) of a pid: a hash of the pid alone, the same on every run."""
    return int(pid_unit(pid, 0, "cache-part") * num_parts)


def source_bytes(source: Source) -> int:
    """The size of the source's parquet files (local, or listed on the hub)."""
    fs = source.filesystem
    return sum(fs.size(f) if fs is not None else os.path.getsize(f) for f in source.files)


def default_num_parts(source: Source) -> int:
    """One part per :data:`PART_BYTES` of source files, 1 to :data:`MAX_PARTS`."""
    return max(1, min(MAX_PARTS, math.ceil(source_bytes(source) / PART_BYTES)))


def pids_by_part(source: Source, num_parts: int) -> list[list[str]]:
    """The source's pids (read from the ``pid`` column only), sorted, in their parts."""
    pids = sorted({r["pid"] for r in iter_rows(source, ["pid"], batch_size=8192)})
    parts: list[list[str]] = [[] for _ in range(num_parts)]
    for pid in pids:
        parts[part_of(pid, num_parts)].append(pid)
    return parts


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def load_progress(work: Path, num_parts: int, log: Callable[[str], None] = print) -> dict[int, dict]:
    """The parts recorded complete in ``work`` (part -> its record). Parts cut for another
    ``num_parts`` do not fit this build: the work folder is emptied and the build starts over."""
    path = work / PROGRESS
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved["num_parts"] != num_parts:
        log(f"latent cache: {work} holds parts of a {saved['num_parts']}-part build, this one has "
            f"{num_parts}: starting over")
        shutil.rmtree(work)
        return {}
    return {int(k): v for k, v in saved["done"].items()}


def _save_progress(work: Path, num_parts: int, done: dict[int, dict]) -> None:
    tmp = work / f"{PROGRESS}.tmp"
    tmp.write_text(json.dumps({"num_parts": num_parts, "done": {str(k): done[k] for k in sorted(done)}}, indent=1))
    os.replace(tmp, work / PROGRESS)


def build_parts(work: Path, parts: list[list[str]], run_part: Callable[[list[str], Path], dict[str, Any]],
                log: Callable[[str], None] = print) -> dict[int, dict]:
    """Compute every part of ``parts`` (the pids of each) not yet recorded in ``work``:
    ``run_part(pids, folder)`` writes one part's files into ``folder`` and returns its record
    (with ``pairs``). Logs pairs/s and the ETA after each part; returns every part's record."""
    done = load_progress(work, len(parts), log)
    work.mkdir(parents=True, exist_ok=True)
    todo = [p for p in range(len(parts)) if p not in done]
    log(f"latent cache: {len(done)} of {len(parts)} parts already complete in {work}; computing {len(todo)}")
    t0, pairs = time.time(), 0
    for k, part in enumerate(todo):
        folder = work / part_name(part)
        tmp = work / f"{folder.name}.tmp"
        for stale in (tmp, folder):  # left by a crash (a renamed but unrecorded part is redone)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        t = time.time()
        record = {"pids": len(parts[part]), **(run_part(parts[part], tmp) if parts[part] else {"pairs": 0})}
        record["seconds"] = round(time.time() - t, 1)
        os.rename(tmp, folder)
        done[part] = record
        _save_progress(work, len(parts), done)
        pairs += record["pairs"]
        spent = time.time() - t0
        eta = spent / (k + 1) * (len(todo) - k - 1)
        log(f"latent cache: part {part} complete ({record['pairs']} pairs, {record['seconds']:.0f} s); "
            f"{len(done)}/{len(parts)} parts, {pairs / max(spent, 1e-9):.1f} pairs/s, ETA {eta:.0f} s")
    return done


def link_parts(work: Path, num_parts: int, out: Path) -> None:
    """Every part's files into ``out``, in the same ``split=<name>/`` folders, named
    ``part-NNNNN-<file>``: hard links (the parts stay intact until the cache is published), or
    copies where the filesystem has none."""
    for part in range(num_parts):
        folder = work / part_name(part)
        for f in sorted(folder.rglob("*.parquet")):
            target = out / f.parent.relative_to(folder) / f"{folder.name}-{f.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
