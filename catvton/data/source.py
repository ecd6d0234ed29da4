"""Where DeepFashion rows come from: the hub dataset (parquet over ``HfFileSystem``), a local
folder in the hub layout (``data/train-*.parquet``), or the offline synthetic set.

The same parquet files feed Ray Data (``read_rows``) and plain pyarrow (``iter_rows``, for small
reads and tests), so the hub path and the offline path run the same code after this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from catvton.artifacts import cache_root, synthetic_dir
from catvton.config import DataConfig
from catvton.schema import COLUMNS

SYNTHETIC = "synthetic"


@dataclass
class Source:
    """Resolved parquet files and the filesystem to read them with."""

    name: str
    """What the user asked for: ``synthetic``, a hub id or a folder."""
    files: list[str]
    filesystem: Any = None
    """``HfFileSystem`` for the hub, None for local files."""


def _local_files(folder: Path) -> list[str]:
    files = sorted(folder.glob("data/*.parquet")) or sorted(folder.glob("*.parquet"))
    return [str(f) for f in files]


def resolve_source(cfg: DataConfig) -> Source:
    """Find the parquet files of ``cfg.source``. The synthetic set must have been built (entry
    points do it through :func:`catvton.offline.resolve`); this module only reads it."""
    if cfg.source == SYNTHETIC:
        folder = synthetic_dir(cache_root(), cfg.synthetic_pids, cfg.synthetic_image_size, cfg.seed)
        files = _local_files(folder)
        if not files:
            raise FileNotFoundError(
                f"the synthetic set {folder} is not built: entry points build it with catvton.offline.resolve(cfg); "
                f"by hand: python -m catvton.offline.synthetic --out {folder} --pids {cfg.synthetic_pids} "
                f"--size {cfg.synthetic_image_size} --seed {cfg.seed}")
        return Source(SYNTHETIC, files)
    local = Path(cfg.source).expanduser()
    if local.exists():
        files = _local_files(local)
        if not files:
            raise FileNotFoundError(
                f"{local} holds no parquet files: expected the hub layout {local}/data/train-*.parquet "
                "(or *.parquet directly in the folder)"
            )
        return Source(str(local), files)
    if cfg.source.count("/") != 1:
        raise FileNotFoundError(
            f"data source {cfg.source!r} is neither a folder nor a hub dataset id (owner/name); "
            "use 'synthetic' for the offline set"
        )
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    files = sorted(fs.glob(f"datasets/{cfg.source}/data/*.parquet"))
    if not files:
        raise FileNotFoundError(f"hub dataset {cfg.source} has no data/*.parquet files")
    return Source(cfg.source, files, fs)


def read_rows(source: Source, **kwargs: Any):
    """A Ray Dataset over the source's rows (``images`` and ``mask`` cells stay encoded bytes)."""
    import ray.data

    return ray.data.read_parquet(source.files, filesystem=source.filesystem, **kwargs)


def iter_rows(source: Source, columns: list[str] | None = None, batch_size: int = 64) -> Iterator[dict]:
    """Rows as plain dicts, read with pyarrow, without Ray."""
    import pyarrow.parquet as pq

    for f in source.files:
        handle = source.filesystem.open(f, "rb") if source.filesystem else f
        pf = pq.ParquetFile(handle)
        missing = [c for c in (columns or COLUMNS) if c not in pf.schema_arrow.names]
        if missing:
            raise KeyError(f"{f} lacks columns {missing}; the DeepFashion schema has {list(COLUMNS)}")
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def check_columns(source: Source) -> list[str]:
    """Columns of the schema missing from the first file (an empty list when all are there)."""
    import pyarrow.parquet as pq

    f = source.files[0]
    handle = source.filesystem.open(f, "rb") if source.filesystem else f
    names = pq.ParquetFile(handle).schema_arrow.names
    return [c for c in COLUMNS if c not in names]
