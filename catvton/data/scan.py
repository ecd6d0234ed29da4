"""The parallel validation scan behind ``easy_train.py setup``: each Ray Data task reads a few
parquet row groups of one file (about :data:`ROWS_PER_TASK` rows) and validates them, ``num_actors``
tasks at once, and only metadata (plus the pixels of a small sample of pids, for the grids) comes
back to the driver, task by task, while a progress bar counts rows.

Why row groups and not ``ray.data.read_parquet``: that reader makes one read task per *file*, so
the hub's 4 shards would be read (and, fused, validated) by at most 4 tasks however many CPUs
there are, each emitting its metadata only at its end (the bar would sit still for minutes).
Row groups are the parquet unit a reader can fetch alone (``HfFileSystem`` too, by range
requests); the hub's image datasets have 100-row row groups.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from catvton.config import Config
from catvton.data.source import Source
from catvton.data.validate import RowValidator

SAMPLE_PIDS = 60
"""About how many items keep their pixels for the sample grids."""
ROWS_PER_PID = 5
READ_COLUMNS = ["images", "mask", "gender", "pose", "cloth_type", "pid", "caption"]
"""``mask_overlay`` (a second photo per row) is never read: nothing in the report needs it."""
ROWS_PER_TASK = 500
"""Rows one task reads and validates: ~4 s of one CPU at 512x512, ~40 MB of encoded images."""


def row_group_tasks(source: Source, rows_per_task: int = ROWS_PER_TASK) -> list[dict[str, Any]]:
    """``{"file", "row_groups", "rows"}`` per task: consecutive row groups of one file, about
    ``rows_per_task`` rows together (a bigger row group is a task of its own). Reads footers only."""
    import pyarrow.parquet as pq

    tasks: list[dict[str, Any]] = []
    for f in source.files:
        with pq.ParquetFile(source.filesystem.open(f, "rb") if source.filesystem else f) as pf:
            groups, rows = [], 0
            for i in range(pf.metadata.num_row_groups):
                groups.append(i)
                rows += pf.metadata.row_group(i).num_rows
                if rows >= rows_per_task:
                    tasks.append({"file": f, "row_groups": groups, "rows": rows})
                    groups, rows = [], 0
            if groups:
                tasks.append({"file": f, "row_groups": groups, "rows": rows})
    return tasks


def _read_validate(tasks: dict[str, np.ndarray], filesystem: Any, data_cfg: dict, sample_rate: float,
                   batch_size: int) -> dict[str, np.ndarray]:
    """Read each task's row groups (the scan's columns only) and validate them in batches."""
    import pyarrow.parquet as pq

    validator = RowValidator(data_cfg, keep_images="sample", sample_rate=sample_rate, placement=True)
    parts: list[dict[str, np.ndarray]] = []
    for f, groups in zip(tasks["file"], tasks["row_groups"]):
        with pq.ParquetFile(filesystem.open(f, "rb") if filesystem else f) as pf:
            table = pf.read_row_groups([int(g) for g in groups], columns=READ_COLUMNS)
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            parts.append(validator({c: np.array(chunk.column(c).to_pylist() + [None], dtype=object)[:-1]
                                    for c in READ_COLUMNS}))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def scan(source: Source, cfg: Config, num_actors: int = 2, batch_size: int = 64,
         progress: bool = False) -> list[dict[str, Any]]:
    """Validate every row of ``source``; one metadata dict per row (see :class:`RowValidator`).

    ``num_actors``: tasks at once, one CPU each (give it the CPU count). ``progress``: one bar on
    stderr over rows (Ray Data's own bars are off during the scan).
    """
    import ray.data
    from ray.data import DataContext
    from tqdm import tqdm

    tasks = row_group_tasks(source)
    n_rows = sum(t["rows"] for t in tasks)
    sample_rate = min(1.0, SAMPLE_PIDS * ROWS_PER_PID / max(n_rows, 1))
    ctx = DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    rows: list[dict[str, Any]] = []
    try:
        checked = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
            _read_validate,
            fn_kwargs={"filesystem": source.filesystem, "data_cfg": dataclasses.asdict(cfg.data),
                       "sample_rate": sample_rate, "batch_size": batch_size},
            batch_size=1,
            num_cpus=1,
            concurrency=max(1, num_actors),
        )
        with tqdm(total=n_rows, desc="validating", unit="row", disable=not progress, file=sys.stderr,
                  mininterval=1.0, dynamic_ncols=True) as bar:
            for block in checked.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows.extend(block.to_pylist())
                bar.update(block.num_rows)
    finally:
        ctx.enable_progress_bars = bars
    for r in rows:  # numpy scalars (from pickled object columns) -> plain Python, for JSON
        for k, v in r.items():
            if isinstance(v, np.generic):
                r[k] = v.item()
    return rows
