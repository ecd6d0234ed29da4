"""The parallel validation scan behind ``easy_train.py setup``: Ray Data reads every parquet
file, an actor pool validates the rows, and only metadata (plus the pixels of a small sample of
pids, for the grids) comes back to the driver."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from catvton.config import Config
from catvton.data.source import Source, read_rows
from catvton.data.validate import RowValidator

SAMPLE_PIDS = 60
"""About how many items keep their pixels for the sample grids."""
ROWS_PER_PID = 5


def scan(source: Source, cfg: Config, num_actors: int = 2, batch_size: int = 64) -> list[dict[str, Any]]:
    """Validate every row of ``source``; one metadata dict per row (see :class:`RowValidator`)."""
    from ray.data import ActorPoolStrategy

    ds = read_rows(source, columns=["images", "mask", "gender", "pose", "cloth_type", "pid", "caption"])
    n_rows = ds.count()  # from parquet metadata: no data is read
    sample_rate = min(1.0, SAMPLE_PIDS * ROWS_PER_PID / max(n_rows, 1))
    checked = ds.map_batches(
        RowValidator,
        fn_constructor_kwargs={"data_cfg": dataclasses.asdict(cfg.data), "keep_images": "sample",
                               "sample_rate": sample_rate, "placement": True},
        compute=ActorPoolStrategy(min_size=1, max_size=num_actors),
        batch_size=batch_size,
        num_cpus=1,
    )
    rows = checked.take_all()
    for r in rows:  # numpy scalars -> plain Python, so the report serialises to JSON
        for k, v in r.items():
            if isinstance(v, np.generic):
                r[k] = v.item()
    return rows
