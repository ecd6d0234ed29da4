"""The plain loop's batches (what trains the shipped alpha) depend on the cache's rows, not on the
order Ray Data happened to write them in: two builds of one cache hold the same rows in another
order, and ``ship --check`` found two builds of the alpha from one code 0.65 apart (relative L2 of
one tensor) before the loop sorted its pairs first."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catvton.train import plain


def _cache(folder: Path, rows: list[dict], files: int) -> Path:
    """A train split of ``rows`` in ``files`` parquet files, in the order given."""
    split = folder / "split=train"
    split.mkdir(parents=True)
    step = -(-len(rows) // files)
    for i in range(files):
        pq.write_table(pa.Table.from_pylist(rows[i * step:(i + 1) * step]), split / f"part-{i:02d}.parquet")
    return folder


def _drawn(cache: Path, monkeypatch, seed: int = 3) -> list[list[tuple]]:
    monkeypatch.setattr(plain, "decode_batch", lambda batch, manifest: batch)  # the rows, undecoded
    batches = islice(plain.iter_train_batches(cache, {}, batch_size=4, seed=seed), 12)
    return [list(zip(*(b[k].tolist() for k in (*plain.PAIR_KEY, "value")))) for b in batches]


def test_batches_do_not_depend_on_the_order_of_the_files_rows(tmp_path, monkeypatch):
    rows = [{"pid": f"id_{p:08d}", "group": g, "garment_pose": "01_flat", "person_pose": f"0{v}_1_front",
             "value": 100 * p + v + (50 if g == "lower" else 0)}
            for p in range(6) for g in ("upper", "lower") for v in (1, 2)]
    written = _drawn(_cache(tmp_path / "a", rows, files=3), monkeypatch)
    shuffled = rows[7:] + rows[:7][::-1]
    assert _drawn(_cache(tmp_path / "b", shuffled, files=4), monkeypatch) == written
    # every pair once per epoch (24 pairs, 6 batches of 4), each pair with its own values
    epoch = [r for b in written[:6] for r in b]
    assert sorted(epoch) == sorted(tuple(r[k] for k in (*plain.PAIR_KEY, "value")) for r in rows)
    # the seed still decides the order
    assert _drawn(_cache(tmp_path / "c", rows, files=3), monkeypatch, seed=4) != written
