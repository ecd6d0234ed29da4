"""Ray Data on CPU: VAE-encoding throughput with 2 encoder actors vs 1 on the same pairs, and the
end-to-end preprocessing rate (rows in -> latent cache out), in one run on a local Ray.

    python bench/encode_throughput.py                        # 120 synthetic items, tiny canvas
    python bench/encode_throughput.py --pids 240 --set canvas.half_width=192 --set canvas.half_height=256

1. End to end: ``build_latent_cache`` (validate -> pair per pid -> encode -> write parquet, the
   job's own function) into a fresh temporary cache root, one encoder actor; rows and pairs per
   second of wall time, Ray start-up excluded.
2. Encoding alone: the same pairs (the pipeline's validate and pair stages, materialized once in
   16 blocks), then ``map_batches(LatentEncoder, ActorPoolStrategy(size=n))`` for n = 1, 2, 1:
   pairs per second of wall time (actor start-up included) and after the first block arrives
   (steady state). Each actor holds one CPU and one torch thread.

Prints the figures and the 2-vs-1 ratio; results and the command go to docs/PERFORMANCE.md. No
timing is asserted anywhere: the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pair_rows(cfg, blocks: int):
    """The pipeline's stages up to the encoder (as ``catvton.cache.build`` wires them), in
    ``blocks`` blocks, materialized. An actor pool hands out whole blocks: the grouped pairs come
    out as one block, which would leave the second actor idle."""
    from ray.data.context import ShuffleStrategy

    from catvton.cache.stages import PairBuilder
    from catvton.data.source import read_rows, resolve_source
    from catvton.data.validate import RowValidator

    rows = read_rows(resolve_source(cfg.data)).select_columns(
        ["images", "mask", "gender", "pose", "cloth_type", "pid", "caption"])
    checked = rows.map_batches(RowValidator(dataclasses.asdict(cfg.data), keep_images="valid"), batch_size=64)
    checked.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return checked.groupby("pid").map_groups(PairBuilder(cfg.to_dict(), with_stats=False), batch_format="numpy") \
        .repartition(blocks).materialize()


class _Skip(Exception):
    """--no-end-to-end"""


def encode_rate(pairs, cfg, actors: int, batch_size: int) -> dict:
    from ray.data import ActorPoolStrategy

    from catvton.cache.stages import LatentEncoder

    n = pairs.count()
    t0 = time.perf_counter()
    out = pairs.map_batches(LatentEncoder, fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "num_threads": 1},
                            compute=ActorPoolStrategy(size=actors), num_cpus=1, batch_size=batch_size)
    # Stream the output and note when each block arrives: the rate after the first block leaves
    # out the actors' start-up (process, imports, VAE load), which the wall time includes.
    arrivals = []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        arrivals.append((time.perf_counter(), len(batch["pid"])))
    wall = time.perf_counter() - t0
    encoded = sum(k for _, k in arrivals)
    if encoded != n:
        raise AssertionError(f"{actors} actor(s) encoded {encoded} of {n} pairs")
    first, last = arrivals[0][0], arrivals[-1][0]
    steady = (n - arrivals[0][1]) / (last - first) if last > first else float("nan")
    return {"actors": actors, "pairs": n, "seconds": round(wall, 2), "pairs_per_s": round(n / wall, 2),
            "first_block_s": round(first - t0, 2), "steady_pairs_per_s": round(steady, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pids", type=int, default=120, help="synthetic items (about 4.3 rows each)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per encoder call (the job's default)")
    p.add_argument("--blocks", type=int, default=16, help="blocks the pairs are split into (work units for the actors)")
    p.add_argument("--no-end-to-end", action="store_true", help="only the 1-vs-2 actor comparison")
    p.add_argument("--out", help="write the JSON result here")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from catvton.artifacts import MANIFEST
    from catvton.cache.build import build_latent_cache
    from catvton.config import load_config
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray

    cfg = load_config(a.config, [f"data.synthetic_pids={a.pids}", "model.transformer_override=null", *a.set])
    cfg = resolve(cfg)  # the tiny base and the synthetic rows: built once, cached (not timed)
    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 0))
    result = {"cpus": cpus, "pids": a.pids, "canvas": f"2 x {cfg.canvas.half_width}x{cfg.canvas.half_height}"}

    root = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        if a.no_end_to_end:
            raise _Skip
        t0 = time.perf_counter()
        cache = build_latent_cache(cfg, num_encoders=1, progress=False, cache_root=root, log=lambda s: None)
        wall = time.perf_counter() - t0
        manifest = json.loads((cache / MANIFEST).read_text())
        pairs = sum(manifest["pairs"].values())
        result["end_to_end"] = {"rows": manifest["rows"]["total"], "pairs": pairs, "seconds": round(wall, 1),
                                "rows_per_s": round(manifest["rows"]["total"] / wall, 2),
                                "pairs_per_s": round(pairs / wall, 2)}
    except _Skip:
        pass
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ds = pair_rows(cfg, a.blocks)
    runs = [encode_rate(ds, cfg, n, a.batch_size) for n in (1, 2, 1)]
    one = (runs[0]["pairs_per_s"] + runs[2]["pairs_per_s"]) / 2
    one_steady = (runs[0]["steady_pairs_per_s"] + runs[2]["steady_pairs_per_s"]) / 2
    result["encode"] = runs
    result["ratio_2_vs_1"] = round(runs[1]["pairs_per_s"] / one, 2)
    result["ratio_2_vs_1_steady"] = round(runs[1]["steady_pairs_per_s"] / one_steady, 2)
    result["load_average"] = os.getloadavg()

    print(f"\n{cpus} CPUs, {result['canvas']} canvas, {a.pids} synthetic items")
    if "end_to_end" in result:
        e = result["end_to_end"]
        print(f"end to end: {e['rows']} rows -> {e['pairs']} pairs in {e['seconds']} s: "
              f"{e['rows_per_s']} rows/s, {e['pairs_per_s']} pairs/s (1 encoder)")
    for r in runs:
        print(f"encode, {r['actors']} actor(s): {r['pairs']} pairs in {r['seconds']} s = {r['pairs_per_s']} pairs/s; "
              f"first block after {r['first_block_s']} s, then {r['steady_pairs_per_s']} pairs/s")
    print(f"ratio 2 vs 1 actors: {result['ratio_2_vs_1']}x wall, {result['ratio_2_vs_1_steady']}x after the first "
          f"block   (load average {result['load_average'][0]:.1f})")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
