"""A full-size offline stand-in for the hub dataset: the real row count (40,658) at 512x512, JPEG
photos and PNG masks, in the hub's shard names (``data/train-0000k-of-00004-<hash>.parquet``).

It is the input of ``bench/setup_scale.py`` (issue 13), not of the default tests: the rows are
the synthetic renderer's (:mod:`catvton.offline.synthetic`, same pids, poses and pixels for a
given seed), drawn pid by pid until ``rows`` rows and trimmed there (the last pid may lose views,
as a cut-off shard would). Shards are rendered in parallel processes (``workers``), each one
streamed to parquet in row groups of 100 rows, so a worker holds one row group, not a shard.

Build it by hand (a bar over rows; ~22 ms a row at 512 on one core: ~8 minutes with 2 workers)::

    python -m catvton.offline.standin --out /tmp/standin --rows 40658 --size 512 --workers 2

or once into the cache, as the bench does: :func:`ensure_standin`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from catvton.artifacts import build_once, source_digest
from catvton.schema import COLUMNS

BUILDER = "catvton.offline.standin"
"""This writer, named (not ``__name__``: ``python -m`` runs it as ``__main__``)."""

REAL_ROWS = 40_658
"""Rows of ``SaffalPoosh/deepFashion-with-masks`` (its 4 train shards together)."""
REAL_SIZE = 512
REAL_SHARDS = 4
JPEG_QUALITY = 90
ROW_GROUP_ROWS = 100
"""Rows per parquet row group, as ``datasets`` writes image datasets for the hub."""


def pid_row_starts(num_rows: int, seed: int) -> tuple[list[int], list[int]]:
    """(pid indices, the global row index of each pid's first row): pids in order until their
    views reach ``num_rows`` rows (the last pid may be cut)."""
    from catvton.offline.synthetic import plan_pid

    pids, starts, total, i = [], [], 0, 0
    while total < num_rows:
        pids.append(i)
        starts.append(total)
        total += len(plan_pid(seed, i).poses)
        i += 1
    return pids, starts


def standin_shard_names(num_rows: int, image_size: int, seed: int, num_shards: int) -> list[str]:
    """``train-0000k-of-0000n-<hash>.parquet``: the hub's names, hash suffix included (readers
    glob ``train-*.parquet``); the hash is of the build parameters."""
    tag = hashlib.sha1(f"{num_rows}-{image_size}-{seed}-{source_digest(BUILDER)}".encode()).hexdigest()[:16]
    return [f"train-{k:05d}-of-{num_shards:05d}-{tag}.parquet" for k in range(num_shards)]


def _jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _hub_row(row: dict) -> dict:
    """A rendered row as the hub stores it: photos and overlays JPEG, the mask PNG."""
    from catvton.offline.synthetic import encode_png

    out = dict(row)
    out["images"] = {"bytes": _jpeg(row["images"]), "path": None}
    out["mask_overlay"] = {"bytes": _jpeg(row["mask_overlay"]), "path": None}
    out["mask"] = {"bytes": encode_png(row["mask"]), "path": None}
    return {c: out[c] for c in COLUMNS}


def _shard_rows(lo: int, hi: int, pids: Sequence[int], starts: Sequence[int], image_size: int,
                seed: int, counter: Any = None) -> Iterator[dict]:
    """Rows ``lo..hi-1`` (global indices) in hub form; ``counter`` (a shared int) counts them."""
    from catvton.offline.synthetic import plan_pid, render_pid

    first = int(np.searchsorted(starts, lo, side="right")) - 1
    for j in range(first, len(pids)):
        start = starts[j]
        if start >= hi:
            break
        rows = render_pid(plan_pid(seed, pids[j]), image_size, seed)
        for k, row in enumerate(rows):
            if lo <= start + k < hi:
                yield _hub_row(row)
                if counter is not None:
                    with counter.get_lock():
                        counter.value += 1


def _write_shard(args: tuple) -> str:
    """Render rows ``lo..hi-1`` into ``path`` (temp name, then rename), row group by row group."""
    path, lo, hi, pids, starts, image_size, seed = args
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catvton.offline.synthetic import hub_features

    schema = hub_features().arrow_schema
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    chunk: list[dict] = []
    with pq.ParquetWriter(str(tmp), schema) as writer:
        for row in _shard_rows(lo, hi, pids, starts, image_size, seed, _COUNTER):
            chunk.append(row)
            if len(chunk) == ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                chunk = []
        if chunk:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
    os.replace(tmp, path)
    return str(path)


_COUNTER: Any = None


def _init_worker(counter: Any) -> None:
    global _COUNTER
    _COUNTER = counter


def write_standin(folder: str | Path, num_rows: int = REAL_ROWS, image_size: int = REAL_SIZE,
                  seed: int = 0, num_shards: int = REAL_SHARDS, workers: int = 2, *,
                  progress: bool = False) -> list[Path]:
    """Write exactly ``num_rows`` rows to ``folder/data/`` in ``num_shards`` near-equal shards,
    ``workers`` shards at a time (separate processes). ``progress``: a tqdm bar over rows."""
    if num_rows < 1 or num_shards < 1 or workers < 1:
        raise ValueError(f"num_rows={num_rows}, num_shards={num_shards}, workers={workers}: all must be >= 1")
    pids, starts = pid_row_starts(num_rows, seed)
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    names = standin_shard_names(num_rows, image_size, seed, num_shards)
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(num_rows), num_shards)])
    jobs = [(str(data / n), int(bounds[k]), int(bounds[k + 1]), pids, starts, image_size, seed)
            for k, n in enumerate(names)]
    from tqdm import tqdm

    ctx = mp.get_context("fork")  # nothing threaded is running yet: numpy and PIL only
    counter = ctx.Value("l", 0)
    with tqdm(total=num_rows, desc="stand-in rows", unit="row", disable=not progress) as bar, \
            ctx.Pool(min(workers, num_shards), initializer=_init_worker, initargs=(counter,)) as pool:
        result = pool.map_async(_write_shard, jobs, chunksize=1)
        while not result.ready():
            result.wait(1.0)
            bar.update(counter.value - bar.n)
        paths = result.get()
        bar.update(counter.value - bar.n)
    return [Path(p) for p in paths]


def standin_dir(root: str | Path, num_rows: int, image_size: int, seed: int) -> Path:
    """``<root>/standin-<rows>-<size>-<seed>-jpeg-<source digest of this writer and the renderer>``."""
    return Path(root) / f"standin-{num_rows}-{image_size}-{seed}-jpeg-{source_digest(BUILDER)}"


def ensure_standin(root: str | Path, num_rows: int = REAL_ROWS, image_size: int = REAL_SIZE, seed: int = 0,
                   workers: int = 2, *, progress: bool = False) -> Path:
    """Build the stand-in once under ``root`` (:func:`catvton.artifacts.build_once`) and return it."""
    final = standin_dir(root, num_rows, image_size, seed)
    return build_once(final, lambda tmp: write_standin(tmp, num_rows, image_size, seed, workers=workers,
                                                       progress=progress),
                      lambda f: len(list((Path(f) / "data").glob("train-*.parquet"))) == REAL_SHARDS,
                      log=lambda _: None, what="full-size stand-in")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m catvton.offline.standin --out DIR [--rows N] [--size S] [--workers W]``."""
    parser = argparse.ArgumentParser(prog="python -m catvton.offline.standin", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder to write (OUT/data/*.parquet); default: built once "
                                                 "in the cache ($CATVTON_CACHE/standin-...)")
    parser.add_argument("--rows", type=int, default=REAL_ROWS, help=f"rows (default {REAL_ROWS}, the hub's)")
    parser.add_argument("--size", type=int, default=REAL_SIZE, help=f"photo side in pixels (default {REAL_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=REAL_SHARDS)
    parser.add_argument("--workers", type=int, default=2, help="shards rendered at once (processes)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.out is None:
        from catvton.artifacts import cache_root

        if args.shards != REAL_SHARDS:
            parser.error("--shards other than 4 needs --out")
        folder = ensure_standin(cache_root(), args.rows, args.size, args.seed, args.workers, progress=True)
        paths = sorted((folder / "data").glob("*.parquet"))
    else:
        paths = write_standin(args.out, args.rows, args.size, args.seed, args.shards, args.workers, progress=True)
    import pyarrow.parquet as pq

    total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    print(f"{total} rows in {len(paths)} shards ({args.size}x{args.size}) in {time.perf_counter() - t0:.0f} s:")
    for p in paths:
        print(f"  {p}  ({p.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
