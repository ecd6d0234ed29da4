"""The latent cache: every try-on pair encoded once by the VAE, so training never runs it.

The Ray Data pipeline of :func:`build_latent_cache`::

    read_parquet (source.read_rows)
      -> map_batches(RowValidator(keep_images="valid"))       a bad row keeps its reason (tasks)
      -> groupby("pid").map_groups(PairBuilder)               pairs of one item + one stats row (tasks)
      -> map_batches(LatentEncoder, ActorPoolStrategy, num_gpus)   VAE latents (the GPU stage)
      -> write_parquet(partition_cols=["split"])              split=train/ split=val/ split=test/

A cache folder (``<cache root>/latents-<key>/``, the key hashing everything that changes its
contents) holds::

    manifest.json              counts, shapes, skipped rows by reason, the config used
    split=train/*.parquet      one row per pair (columns below)
    split=val/*.parquet
    split=test/*.parquet
    text_embeds.safetensors    the prompt's T5 sequence (1, T, D) and CLIP pooled (1, P), once
    samples.npz                up to 8 fixed validation pairs in pixels, for sample grids

Row columns: ``pid``, ``group``, ``cloth_type``, ``garment_pose``, ``person_pose`` (strings);
``target`` and ``masked`` (float16 bytes of a (16, H/8, 2W/8) normalised VAE latent of the canvas
and of the masked canvas); ``mask`` (``np.packbits`` of the (H, 2W) bool mask canvas);
``canvas`` (PNG of the (H, 2W, 3) uint8 canvas, kept for val/test only: evaluation compares
pixels, training does not need them); ``stats`` (empty for pairs). ``H, W`` are
``canvas.half_height, canvas.half_width``.

The pipeline runs once per part of the pids (:mod:`catvton.cache.parts`): each finished part is
kept in a work folder beside the cache, so a build killed halfway computes only the missing parts
when it runs again; the parts' files are then gathered into the cache folder, by the same path on
a clean build and on a resumed one.

Every bad row and every row that gave no pair is counted under its reason in the manifest; none
is replaced by a dummy. The counting rides along the pipeline: :class:`PairBuilder` emits one
stats row per pid (split ``_stats``), which the encoder passes through and the driver sums and
deletes, so the images are decoded once and nothing big is held on the driver.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from catvton.artifacts import (MANIFEST, SAMPLES, TEXT_EMBEDS, TINY_BASE_INFO, build_once, cache_root, content_hash,
                               source_digest, synthetic_dir)
from catvton.cache.format import STATS_SPLIT, png_pixels, unpack_mask_bits
from catvton.cache.parts import build_parts, default_num_parts, link_parts, pids_by_part, source_bytes, work_dir
from catvton.cache.read import read_split
from catvton.cache.stages import LatentEncoder, PairBuilder, encode_prompt_task
from catvton.config import Config
from catvton.data.pairs import SPLITS
from catvton.data.source import SYNTHETIC, read_rows, resolve_source
from catvton.data.validate import RowValidator
from catvton.model.loading import resolve_base
from catvton.ray_utils import init_ray
from catvton.schema import GROUPS

BUILDER = "catvton.cache.build"
"""The cache's builder: its source and every module it imports (reading, validation, pairing,
canvas, masks, placement, the encode stages) are part of the cache key (:func:`catvton.artifacts.source_digest`)."""

NUM_SAMPLES = 8
"""Fixed validation pairs kept in pixels for the sample grids drawn during training."""


# ---------------------------------------------------------------------------------------------
# The cache folder


def _base_identity(base: str) -> str:
    """What identifies a base's weights: the tiny base's folder its name (``tiny-base-<hash of its
    build parameters>``, the same on every machine); another local folder its absolute path; a
    hub id itself."""
    path = Path(base).expanduser()
    if (path / TINY_BASE_INFO).is_file():
        return path.name  # tiny-base-<hash of its build parameters>
    return str(path.resolve()) if path.exists() else base


def _rows_identity(cfg: Config) -> str | None:
    """The synthetic set's folder name (it carries its renderer's digest: re-rendered rows are other
    rows); None for a hub id or a folder of the user's."""
    if cfg.data.source != SYNTHETIC:
        return None
    return synthetic_dir("", cfg.data.synthetic_pids, cfg.data.synthetic_image_size, cfg.data.seed).name


def cache_key(cfg: Config) -> str:
    """A short hash of everything that changes the cache's contents: ``cfg.data``,
    ``cfg.canvas``, ``cfg.mask``, the base (see :func:`_base_identity`), the prompt and its T5
    length, and the builder's source (:data:`BUILDER`)."""
    d = cfg.to_dict()
    picked = {"source": source_digest(BUILDER), "rows": _rows_identity(cfg),
              "data": d["data"], "canvas": d["canvas"], "mask": d["mask"],
              "base": _base_identity(cfg.model.base), "prompt": cfg.model.prompt,
              "max_sequence_length": cfg.model.max_sequence_length}
    return content_hash(picked)


def cache_dir(cfg: Config, root: str | Path | None = None) -> Path:
    """``<root>/latents-<cache_key>``; ``root`` defaults to :func:`catvton.artifacts.cache_root`."""
    return Path(root if root is not None else cache_root()).expanduser() / f"latents-{cache_key(cfg)}"

def _sum_stats(folder: Path) -> dict[str, Any]:
    table = read_split(folder, STATS_SPLIT, ["stats"])
    total: dict[str, Any] = {"rows": 0, "valid": 0, "pairs": 0, "pairs_not_selected": 0,
                             "bad_rows": Counter(), "pairing_skipped": Counter(), "bad_row_values": {}}
    for s in (table.column("stats").to_pylist() if table is not None else []):
        d = json.loads(s)
        for k in ("rows", "valid", "pairs", "pairs_not_selected"):
            total[k] += d[k]
        total["bad_rows"].update(d["bad_rows"])
        total["pairing_skipped"].update(d["pairing_skipped"])
        for reason, vals in d["bad_row_values"].items():
            c = total["bad_row_values"].setdefault(reason, Counter())
            c.update(vals)
    total["bad_rows"] = dict(sorted(total["bad_rows"].items()))
    total["pairing_skipped"] = dict(sorted(total["pairing_skipped"].items()))
    total["bad_row_values"] = {k: dict(v.most_common(20)) for k, v in sorted(total["bad_row_values"].items())}
    return total


def _pick_samples(meta: list[dict], n: int) -> list[dict]:
    """Up to ``n`` pairs in a fixed order: round-robin over groups; within a group the first pair
    of each pid in (pid, person_pose) order, then the second of each, and so on."""
    by_group: dict[str, list[tuple[int, str, str, dict]]] = {}
    nth: Counter = Counter()
    for r in sorted(meta, key=lambda r: (r["group"], r["pid"], r["person_pose"])):
        by_group.setdefault(r["group"], []).append((nth[r["pid"]], r["pid"], r["person_pose"], r))
        nth[r["pid"]] += 1
    queues = [[t[3] for t in sorted(by_group[g], key=lambda t: t[:3])] for g in sorted(by_group)]
    picked: list[dict] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def write_samples(folder: Path, manifest: dict, n: int = NUM_SAMPLES) -> int:
    """``samples.npz``: canvas (N, H, 2W, 3) uint8, mask (N, H, 2W) uint8 {0, 1}, target/masked
    (N, 16, h, w) float16, and pid / group / garment_pose / person_pose strings."""
    H, W2 = manifest["mask_shape"]
    c, h, w = manifest["latent_shape"]
    cols = ["pid", "group", "garment_pose", "person_pose"]
    meta = read_split(folder, "val", cols)
    picked = _pick_samples(meta.to_pylist() if meta is not None else [], n)
    rows: list[dict] = []
    if picked:
        table = read_split(folder, "val", cols + ["canvas", "mask", "target", "masked"], {r["pid"] for r in picked})
        index = {(r["pid"], r["person_pose"]): r for r in table.to_pylist()}
        rows = [index[(r["pid"], r["person_pose"])] for r in picked]
    arrays = {
        "canvas": np.stack([png_pixels(r["canvas"]) for r in rows]) if rows else np.zeros((0, H, W2, 3), np.uint8),
        "mask": np.stack([unpack_mask_bits(r["mask"], (H, W2)) for r in rows]).astype(np.uint8) if rows
        else np.zeros((0, H, W2), np.uint8),
    }
    for key in ("target", "masked"):
        arrays[key] = (np.stack([np.frombuffer(r[key], np.float16).reshape(c, h, w) for r in rows]) if rows
                       else np.zeros((0, c, h, w), np.float16))
    for key in cols:
        arrays[key] = np.array([r[key] for r in rows], dtype=str)
    np.savez(folder / SAMPLES, **arrays)
    return len(rows)


def _split_summary(folder: Path) -> tuple[dict, dict, dict]:
    counts = {s: {g: 0 for g in GROUPS} for s in SPLITS}
    pids: dict[str, set[str]] = {s: set() for s in SPLITS}
    folders = {}
    for s in SPLITS:
        table = read_split(folder, s, ["pid", "group"])
        if table is None:
            continue
        folders[s] = f"split={s}"
        for g, n in Counter(table.column("group").to_pylist()).items():
            counts[s][g] = n
        pids[s] = set(table.column("pid").to_pylist())
    for a in SPLITS:
        for b in SPLITS:
            if a < b and pids[a] & pids[b]:
                raise AssertionError(f"pids in both {a} and {b}: {sorted(pids[a] & pids[b])[:5]}: the split "
                                     "must be decided per pid")
    return counts, {s: len(v) for s, v in pids.items()}, folders


def _block_bytes(source, use_gpu: bool, min_blocks: int = 8, max_blocks: int = 64) -> int:
    """Target block size for the read: the source split into about two blocks per CPU (8 to 64;
    the sort moves blocks^2 pieces), counting half the file bytes (``mask_overlay`` is not read).
    A GPU build plans for ``max_blocks``: it runs on GPU nodes of tens of CPUs, which an
    autoscaling cluster has not started yet when the build begins (its head has 0 CPUs)."""
    import ray

    cpus = max_blocks if use_gpu else int(ray.cluster_resources().get("CPU", 1))
    blocks = min(max_blocks, max(min_blocks, 2 * cpus))
    return int(min(128 << 20, max(1 << 20, source_bytes(source) // (2 * blocks))))


def _cpus_per_actor(use_gpu: bool) -> float:
    """1 CPU per encoder actor (and the prompt task) on a real cluster: on GPUs (GPU nodes, however
    few CPUs the cluster shows at the build's start), or with 8 CPUs or more; a quarter on a small
    machine, where actors holding whole CPUs starve the read, sort and write tasks."""
    import ray

    return 1.0 if use_gpu or ray.cluster_resources().get("CPU", 0) >= 8 else 0.25


def build_latent_cache(cfg: Config, num_encoders: int = 1, use_gpu: bool = False, batch_size: int = 16,
                       progress: bool = True, cache_root: str | Path | None = None,
                       log: Callable[[str], None] = print, num_parts: int | None = None) -> Path:
    """Build (or reuse) the latent cache of ``cfg`` and return its folder.

    ``num_encoders`` VAE actors (one GPU each when ``use_gpu``) encode ``batch_size`` pairs at a
    time. The cache is written into a temporary sibling folder and renamed at the end, under a
    file lock, so a crash never leaves half a cache and concurrent callers build it once. A
    folder that already has its manifest is returned as is. The pipeline runs over ``num_parts``
    parts of the pids (default: :func:`~catvton.cache.parts.default_num_parts`), each kept once
    complete, so a rerun after a crash computes only the missing ones.
    """
    final = cache_dir(cfg, cache_root)
    if (final / MANIFEST).is_file():
        log(f"reusing latent cache {final}")
        return final

    def build(tmp: Path) -> None:
        manifest = _build(cfg, tmp, work_dir(final), num_parts, num_encoders, use_gpu, batch_size, progress, log)
        manifest["folder"] = str(final)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    build_once(final, build, lambda d: (d / MANIFEST).is_file(), log=log, what="latent cache")
    shutil.rmtree(work_dir(final), ignore_errors=True)  # the parts, now linked into the cache
    log(f"latent cache written to {final}")
    return final


def _build(cfg: Config, out: Path, work: Path, num_parts: int | None, num_encoders: int, use_gpu: bool,
           batch_size: int, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the pipeline into ``out`` and return the manifest (written by the caller)."""
    from ray.data import DataContext

    t0 = time.time()
    init_ray()
    ctx = DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, progress
    try:
        return _run(cfg, out, work, num_parts, num_encoders, use_gpu, batch_size, log, t0)
    finally:
        ctx.enable_progress_bars = bars


def _run(cfg: Config, out: Path, work: Path, num_parts: int | None, num_encoders: int, use_gpu: bool,
         batch_size: int, log: Callable[[str], None], t0: float) -> dict[str, Any]:
    import ray
    from diffusers import AutoencoderKL
    from ray.data import ActorPoolStrategy
    from ray.data.context import ShuffleStrategy
    from ray.data.expressions import col
    from safetensors.torch import save_file

    source = resolve_source(cfg.data)
    # Workers get the resolved base (the tiny base's folder), so no actor builds or resolves it.
    worker_cfg = cfg.to_dict()
    worker_cfg["model"]["base"] = resolve_base(cfg.model.base)
    device = "cuda" if use_gpu else "cpu"
    gpus = 1 if use_gpu else 0
    actor_cpus = _cpus_per_actor(use_gpu)
    log(f"latent cache: {len(source.files)} parquet files of {source.name}, {num_encoders} encoder(s) on {device}")

    # The prompt: once, in a task that can take a GPU (T5-XXL is 9.5 GB in bf16).
    text_ref = ray.remote(encode_prompt_task).options(num_gpus=gpus, num_cpus=actor_cpus).remote(worker_cfg, device)

    parts = pids_by_part(source, num_parts or default_num_parts(source))
    block_bytes = _block_bytes(source, use_gpu)

    def run_part(pids: list[str], part_out: Path) -> dict[str, Any]:
        """The pipeline over the rows of ``pids`` into ``part_out``; its counts."""
        rows = read_rows(source, columns=["images", "mask", "gender", "pose", "cloth_type", "pid", "caption"])
        if len(parts) > 1:  # pushed into the parquet read: only this part's rows leave the reader
            rows = rows.filter(expr=col("pid").is_in(pids))
        # Small blocks, so validation and pairing run in parallel and the encoder starts on the first
        # pairs: by default a small dataset is one block and every stage runs as a single task. The
        # setting is inherited by every dataset derived from ``rows``; the sort keeps the block count.
        rows.context.target_max_block_size = block_bytes
        # Validation and pairing load no model: stage instances run as plain tasks (no actor pool to
        # start and hold CPUs); only the VAE stage is an actor pool, so the VAE loads once per actor.
        checked = rows.map_batches(RowValidator(dataclasses.asdict(cfg.data), keep_images="valid"), batch_size=64)
        # A sort-based shuffle for the groupby: the default hash shuffle's aggregator actors crashed
        # (SIGABRT) or starved the other stages on a 2-CPU machine.
        checked.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        pairs = checked.groupby("pid").map_groups(PairBuilder(worker_cfg), batch_format="numpy")
        latents = pairs.map_batches(
            LatentEncoder, fn_constructor_kwargs={"cfg_dict": worker_cfg, "device": device},
            compute=ActorPoolStrategy(size=num_encoders), num_gpus=gpus, num_cpus=actor_cpus, batch_size=batch_size)
        latents.write_parquet(str(part_out), partition_cols=["split"])
        stats = _sum_stats(part_out)
        return {k: stats[k] for k in ("rows", "valid", "pairs")}

    build_parts(work, parts, run_part, log)
    link_parts(work, len(parts), out)
    t_data = time.time() - t0

    text = ray.get(text_ref)
    save_file(text, str(out / TEXT_EMBEDS))
    stats = _sum_stats(out)
    shutil.rmtree(out / f"split={STATS_SPLIT}", ignore_errors=True)
    counts, pids, folders = _split_summary(out)

    vae_cfg = AutoencoderKL.load_config(worker_cfg["model"]["base"], subfolder="vae")
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    d = cfg.to_dict()
    manifest: dict[str, Any] = {
        "builder_source": source_digest(BUILDER),
        "cache_key": cache_key(cfg),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source.name,
        "base_model": cfg.model.base,
        "base_resolved": worker_cfg["model"]["base"],
        "prompt": cfg.model.prompt,
        "config": {"data": d["data"], "canvas": d["canvas"], "mask": d["mask"],
                   "model": {"base": cfg.model.base, "prompt": cfg.model.prompt,
                             "max_sequence_length": cfg.model.max_sequence_length}},
        "latent_shape": [int(vae_cfg["latent_channels"]), H // factor, 2 * W // factor],
        "mask_shape": [H, 2 * W],
        "dtype": "float16",
        "mask_encoding": "numpy packbits of the (H, 2W) bool mask canvas, 1 = inpaint",
        "vae": {"shift_factor": vae_cfg.get("shift_factor"), "scaling_factor": vae_cfg.get("scaling_factor"),
                "scale_factor": factor, "latent_channels": vae_cfg["latent_channels"], "sample": "mode"},
        "text_embeds": {"file": TEXT_EMBEDS, "max_sequence_length": cfg.model.max_sequence_length,
                        "dtype": "float32", **{k: list(v.shape) for k, v in text.items()}},
        "counts": counts,
        "pairs": {s: sum(v.values()) for s, v in counts.items()},
        "pids": pids,
        "splits": folders,
        "rows": {"total": stats["rows"], "valid": stats["valid"]},
        "skipped": {"bad_rows": stats["bad_rows"], "bad_row_values": stats["bad_row_values"],
                    "pairing": stats["pairing_skipped"], "pairs_not_selected": stats["pairs_not_selected"]},
    }
    if manifest["pairs"]["train"] == 0:
        raise RuntimeError(f"no training pairs from {source.name}: {stats['rows']} rows, {stats['valid']} valid; "
                           f"skipped {manifest['skipped']} (check data.groups and the source)")
    if stats["pairs"] != sum(manifest["pairs"].values()):
        raise AssertionError(f"PairBuilder made {stats['pairs']} pairs but {sum(manifest['pairs'].values())} "
                             "rows were written")
    manifest["samples"] = {"file": SAMPLES, "count": write_samples(out, manifest)}
    manifest["timings_s"] = {"pipeline": round(t_data, 1), "total": round(time.time() - t0, 1)}
    log(f"latent cache: {manifest['pairs']} pairs, bad rows {stats['bad_rows'] or 'none'}, "
        f"{manifest['timings_s']['total']:.0f} s")
    return manifest
