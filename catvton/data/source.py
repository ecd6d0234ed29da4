"""Where DeepFashion rows come from: the hub dataset (parquet over ``HfFileSystem``), a local
folder in the hub layout (``data/train-*.parquet``), or the offline synthetic set.

The same parquet files feed Ray Data (``read_rows``) and plain pyarrow (``iter_rows``, for small
reads and tests), so the hub path and the offline path run the same code after this module.

What can go wrong before a row is read is a :class:`SourceError`, with a message that names the
file and what to do: the hub cannot be reached (:class:`HubUnreachable`), a shard that the
listing's ``-of-0000N`` names announce is missing, a file is not readable parquet or lacks columns.
Entry points print the message and exit with code 2 (``catvton.cli.source_errors_exit``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from catvton.artifacts import cache_root, synthetic_dir
from catvton.config import DataConfig
from catvton.schema import COLUMNS

SYNTHETIC = "synthetic"

SHARD_NAME = re.compile(r"^(?P<split>\w+?)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<suffix>-[^.]+)?\.parquet$")
"""``train-00002-of-00004-<hash>.parquet``: the hub's shard names (``datasets`` adds the hash)."""


class SourceError(Exception):
    """The data source cannot be read as it is; the message says which file and what to do."""


class HubUnreachable(SourceError):
    """The Hugging Face Hub (or ``HF_ENDPOINT``) did not answer: no network, DNS, a proxy, a
    closed port or ``HF_HUB_OFFLINE=1``."""


@dataclass
class Source:
    """Resolved parquet files and the filesystem to read them with."""

    name: str
    """What the user asked for: ``synthetic``, a hub id or a folder."""
    files: list[str]
    filesystem: Any = None
    """``HfFileSystem`` for the hub (or a stand-in with its layout), None for local files."""


def _local_files(folder: Path) -> list[str]:
    files = sorted(folder.glob("data/*.parquet")) or sorted(folder.glob("*.parquet"))
    return [str(f) for f in files]


def missing_shards(files: list[str]) -> list[str]:
    """The shard names that files named ``<split>-0000k-of-0000N[-hash].parquet`` announce but the
    list lacks (``train-00002-of-00004-*.parquet``); files named otherwise are not checked."""
    seen: dict[tuple[str, int], set[int]] = {}
    for f in files:
        m = SHARD_NAME.match(f.rsplit("/", 1)[-1])
        if m:
            seen.setdefault((m["split"], int(m["count"])), set()).add(int(m["index"]))
    return [f"{split}-{k:05d}-of-{n:05d}-*.parquet" for (split, n), got in sorted(seen.items())
            for k in range(n) if k not in got]


def _download_hint(hub_id: str) -> str:
    folder = hub_id.rsplit("/", 1)[-1]
    return (f"hf download {hub_id} --repo-type dataset --include 'data/*' --local-dir {folder}\n"
            f"then pass the folder: --data {folder} (or set data.source: {folder} in the config)")


def _check_listing(where: str, files: list[str], hub_id: str | None) -> None:
    gone = missing_shards(files)
    if gone:
        fix = (f"download the dataset again:\n    {_download_hint(hub_id)}" if hub_id else
               "download the missing shards again (or the whole data/ folder)")
        raise SourceError(f"{where} lists {len(files)} parquet file(s) but their names announce more: "
                          f"missing {', '.join(gone)}. A partial copy would train on part of the data; {fix}")


def _unreachable(exc: BaseException) -> bool:
    """A transport failure (connect, DNS, timeout, proxy, offline mode), not an HTTP answer."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, HfHubHTTPError):  # the hub answered (404, 401, 500...)
            return False
        if isinstance(seen, (HTTPError, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def hub_unreachable_message(hub_id: str, endpoint: str, exc: BaseException) -> str:
    """What to print when the hub cannot be reached: the cause in one line, then the ways on."""
    cause = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return (f"cannot reach the Hugging Face Hub at {endpoint} to list hf://datasets/{hub_id} ({cause}).\n"
            "To go on without a network, download the dataset on a machine that has one:\n"
            f"    {_download_hint(hub_id)}\n"
            "To use a hub mirror, set HF_ENDPOINT to its address.")


def _hub_unreachable(hub_id: str, filesystem: Any, exc: BaseException) -> HubUnreachable:
    from huggingface_hub import constants

    endpoint = getattr(filesystem, "endpoint", None) or constants.ENDPOINT
    return HubUnreachable(hub_unreachable_message(hub_id, endpoint, exc))


def _hub_files(hub_id: str, filesystem: Any) -> tuple[list[str], Any]:
    if filesystem is None:
        from huggingface_hub import HfFileSystem

        filesystem = HfFileSystem()
    pattern = f"datasets/{hub_id}/data/*.parquet"
    try:
        files = sorted(filesystem.glob(pattern))
    except Exception as e:
        if _unreachable(e):
            raise _hub_unreachable(hub_id, filesystem, e) from e
        raise
    if not files:
        raise SourceError(f"hub dataset {hub_id} has no data/*.parquet files (listed {pattern})")
    return files, filesystem


def resolve_source(cfg: DataConfig, filesystem: Any = None) -> Source:
    """Find the parquet files of ``cfg.source``. The synthetic set must have been built (entry
    points do it through :func:`catvton.offline.resolve`); this module only reads it.

    ``filesystem``: what a hub id is listed and read with; None is ``HfFileSystem()`` (production).
    A test passes a stand-in with the hub's layout (``datasets/<owner>/<name>/data/*.parquet``).
    Raises :class:`SourceError` (a missing shard) or :class:`HubUnreachable`.
    """
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
        _check_listing(str(local), files, None)
        return Source(str(local), files)
    if cfg.source.count("/") != 1:
        raise FileNotFoundError(
            f"data source {cfg.source!r} is neither a folder nor a hub dataset id (owner/name); "
            "use 'synthetic' for the offline set"
        )
    files, fs = _hub_files(cfg.source, filesystem)
    _check_listing(f"hub dataset {cfg.source}", files, cfg.source)
    return Source(cfg.source, files, fs)


def read_rows(source: Source, **kwargs: Any):
    """A Ray Dataset over the source's rows (``images`` and ``mask`` cells stay encoded bytes)."""
    import ray.data

    return ray.data.read_parquet(source.files, filesystem=source.filesystem, **kwargs)


def iter_rows(source: Source, columns: list[str] | None = None, batch_size: int = 64) -> Iterator[dict]:
    """Rows as plain dicts, read with pyarrow, without Ray."""
    import pyarrow.parquet as pq

    for f in source.files:
        pf = pq.ParquetFile(_open(source, f))
        missing = [c for c in (columns or COLUMNS) if c not in pf.schema_arrow.names]
        if missing:
            raise KeyError(f"{f} lacks columns {missing}; the DeepFashion schema has {list(COLUMNS)}")
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def _open(source: Source, f: str):
    return source.filesystem.open(f, "rb") if source.filesystem else f


def check_files(source: Source) -> dict[str, int]:
    """Open every file's parquet footer (a few KB each, over the hub too) and return the rows per
    file. Raises :class:`SourceError` naming every file that is not readable parquet or lacks
    columns of the schema, all at once."""
    import pyarrow.parquet as pq

    rows: dict[str, int] = {}
    problems: list[str] = []
    for f in source.files:
        try:
            with pq.ParquetFile(_open(source, f)) as pf:
                names, rows[f] = pf.schema_arrow.names, pf.metadata.num_rows
        except Exception as e:  # pyarrow says ArrowInvalid / OSError; fsspec may add its own
            if source.filesystem is not None and _unreachable(e):
                raise _hub_unreachable(source.name, source.filesystem, e) from e
            problems.append(f"{f} is not a readable parquet file ({type(e).__name__}: {str(e)[:160]})")
            continue
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            problems.append(f"{f} lacks the columns {missing} of the DeepFashion-with-masks schema")
    if problems:
        fix = ("download those files again" + (f" (hf download {source.name} --repo-type dataset "
               "--include 'data/*' --local-dir FOLDER, then --data FOLDER)" if source.filesystem is not None else ""))
        raise SourceError("\n".join(problems) + f"\n{len(problems)} of {len(source.files)} file(s) cannot be used: {fix}")
    return rows
