"""``easy_train.py setup`` at the real dataset's size (issue 13): wall time, rows/s and the
driver's peak memory for the 40,658-row, 512-pixel stand-in, and where the time goes.

    nice -n 19 python bench/setup_scale.py                      # the stand-in, built once (~10 min)
    nice -n 19 python bench/setup_scale.py --read-pass          # + a read-only pass: read vs validate
    python bench/setup_scale.py --data /path/to/folder          # any folder in the hub layout

The stand-in (:mod:`catvton.offline.standin`: 40,658 synthetic rows, JPEG photos, PNG masks,
``data/train-0000k-of-00004-<hash>.parquet``) is built once under ``$CATVTON_CACHE``. Then the
same steps as ``setup`` (``resolve_source``, ``check_files``, ``init_ray``, ``scan``,
``write_report``), each timed, with the scan's progress bar on stderr. Printed: the stages'
seconds, rows/s of the whole command (Ray start-up included) and of the scan, the driver's peak
RSS (``getrusage`` of this process only; Ray's workers are other processes), the peak RSS summed
over the driver and the local Ray session it started (shared memory counted in each process), and the load average before and after.
``--read-pass`` first reads the same columns through Ray Data with the same parallelism and
validates nothing: what reading alone costs. Results and the command: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RssSampler:
    """Samples the driver's RSS and the summed RSS of the driver and its descendants (the local Ray
    session it starts: GCS, raylet, workers; another user's Ray is not counted) every 0.5 s."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.driver_peak = 0
        self.ray_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            self.driver_peak = max(self.driver_peak, self.me.memory_info().rss)
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:  # a local Ray's processes descend from it
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.ray_peak = max(self.ray_peak, total)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def read_pass(source, num: int) -> tuple[float, int]:
    """Read the scan's columns through Ray Data, ``num`` tasks at once, count rows: (s, rows)."""
    from catvton.data.scan import READ_COLUMNS
    from catvton.data.source import read_rows

    t = time.perf_counter()
    ds = read_rows(source, columns=READ_COLUMNS).map_batches(
        lambda b: {"n": [len(b["pid"])]}, batch_size=64, num_cpus=1, concurrency=num)
    n = sum(int(r["n"]) for r in ds.iter_rows())
    return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a folder in the hub layout (default: the 40,658-row stand-in, built once)")
    ap.add_argument("--rows", type=int, default=40_658, help="stand-in rows (default 40,658, the hub's)")
    ap.add_argument("--size", type=int, default=512, help="stand-in photo side (default 512)")
    ap.add_argument("--num-actors", type=int, default=os.cpu_count() or 2, help="validations at once (default: CPUs)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--read-pass", action="store_true", help="first time a read-only pass")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml", help="as setup's --config")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: a temporary one)")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from catvton.artifacts import cache_root
    from catvton.config import load_config

    if args.data:
        folder = Path(args.data)
    else:
        from catvton.offline.standin import ensure_standin

        t = time.perf_counter()
        folder = ensure_standin(cache_root(), args.rows, args.size, progress=True)
        print(f"stand-in: {folder} ({time.perf_counter() - t:.0f} s to find or build)")
    out = args.out or Path(tempfile.mkdtemp(prefix="setup_scale-"))
    load_before = os.getloadavg()
    times: dict[str, float] = {}
    with RssSampler() as rss:
        t0 = time.perf_counter()
        from catvton.data.report import write_report
        from catvton.data.scan import scan
        from catvton.data.source import check_files, resolve_source
        from catvton.ray_utils import init_ray

        cfg = load_config(args.config, [f"data.source={folder}"])
        source = resolve_source(cfg.data)
        n_rows = sum(check_files(source).values())
        times["list + footers"] = time.perf_counter() - t0
        t = time.perf_counter()
        init_ray(dashboard=False)
        times["ray start"] = time.perf_counter() - t
        if args.read_pass:
            times["read-only pass (extra)"], n_read = read_pass(source, args.num_actors)
            assert n_read == n_rows, (n_read, n_rows)
        t = time.perf_counter()
        rows = scan(source, cfg, num_actors=args.num_actors, batch_size=args.batch_size, progress=True)
        times["scan: read + validate"] = time.perf_counter() - t
        t = time.perf_counter()
        report = write_report(out, rows, cfg, source.name)
        times["report + grids"] = time.perf_counter() - t
        wall = time.perf_counter() - t0 - times.get("read-only pass (extra)", 0.0)
    load_after = os.getloadavg()
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    print(f"\nsetup at scale: {len(rows)} rows ({n_rows} in the footers) from {len(source.files)} file(s), "
          f"{args.num_actors} validations at once, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'stage':<28}{'s':>8}")
    for k, v in times.items():
        print(f"{k:<28}{v:>8.1f}")
    print(f"{'wall (setup steps)':<28}{wall:>8.1f}")
    print(f"rows/s: {len(rows) / wall:.0f} whole command, {len(rows) / times['scan: read + validate']:.0f} scan")
    print(f"driver peak RSS: {peak_self / 2**20:.0f} MiB (getrusage), {rss.driver_peak / 2**20:.0f} MiB (sampled); "
          f"driver + its Ray session peak (summed RSS): {rss.ray_peak / 2**20:.0f} MiB")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)}")
    print(f"report: rows_valid {report['rows_valid']} of {report['rows_total']}, bad {json.dumps(report['bad_rows'])}, "
          f"ready {report['ready']}; {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
