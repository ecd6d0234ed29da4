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

Every bad row and every row that gave no pair is counted under its reason in the manifest; none
is replaced by a dummy. The counting rides along the pipeline: :class:`PairBuilder` emits one
stats row per pid (split ``_stats``), which the encoder passes through and the driver sums and
deletes, so the images are decoded once and nothing big is held on the driver.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from catvton.config import Config, config_from_dict
from catvton.data.canvas import build_sample, to_uint8
from catvton.data.pairs import SPLITS, make_pairs
from catvton.data.schema import GROUPS
from catvton.data.validate import UNKNOWN_CLOTH_TYPE, UNPARSEABLE_POSE, decode, to_mask, to_rgb

CACHE_VERSION = "latents-v1"
"""Bump when the cache layout or the encoding changes: it is part of the cache key."""

STATS_SPLIT = "_stats"
"""The ``split`` value of PairBuilder's per-pid stats rows (summed into the manifest, then removed)."""

META = ("pid", "split", "group", "cloth_type", "garment_pose", "person_pose")
"""String columns of a pair row."""

KEEP_CANVAS_SPLITS = ("val", "test")
"""Splits whose rows keep the canvas PNG: evaluation needs the true pixels, training does not."""

TEXT_EMBEDS = "text_embeds.safetensors"
SAMPLES = "samples.npz"
MANIFEST = "manifest.json"
NUM_SAMPLES = 8
"""Fixed validation pairs kept in pixels for the sample grids drawn during training."""


# ---------------------------------------------------------------------------------------------
# Stage 1: pairs of one pid -> canvases


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _from_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def pack_mask(mask: np.ndarray) -> bytes:
    """(H, 2W) mask (bool or {0, 1}) -> packed bits."""
    return np.packbits(np.asarray(mask) > 0.5).tobytes()


def unpack_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Packed bits -> (H, 2W) bool; raises if the byte count does not fit ``shape``."""
    n = shape[0] * shape[1]
    bits = np.frombuffer(data, np.uint8)
    if bits.size != (n + 7) // 8:
        raise ValueError(f"mask has {bits.size} bytes; a {shape[0]}x{shape[1]} mask packs into {(n + 7) // 8}")
    return np.unpackbits(bits, count=n).reshape(shape).astype(bool)


def _column(values: list, dtype: Any = object) -> np.ndarray:
    out = np.empty(len(values), dtype=dtype)
    out[:] = values
    return out


class PairBuilder:
    """Ray Data ``map_groups`` stage: all validated rows of one pid -> its try-on pairs.

    Input: the columns of :class:`catvton.data.validate.RowValidator` with
    ``keep_images="valid"`` (``image_bytes`` / ``mask_bytes`` set for valid rows). Output: one
    row per selected pair (``META`` columns, ``canvas`` PNG bytes of the (H, 2W, 3) uint8
    canvas, ``mask`` packed bits of the (H, 2W) mask canvas, ``stats`` empty) and, when
    ``with_stats``, one more row with ``split == "_stats"`` whose ``stats`` is a JSON count of
    this pid's bad rows, pairing skips and unselected pairs. Without ``with_stats`` a pid with
    no pair gives empty columns.
    """

    def __init__(self, cfg_dict: dict, with_stats: bool = True):
        self.cfg = config_from_dict(cfg_dict)
        self.with_stats = with_stats
        self.__name__ = type(self).__name__  # Ray's map_groups names the stage after fn.__name__

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        n = len(batch["pid"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        pairs, skipped = make_pairs(rows, cfg.data)
        out: dict[str, list] = {k: [] for k in (*META, "canvas", "mask", "stats")}
        decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def pixels(i: int) -> tuple[np.ndarray, np.ndarray]:
            if i not in decoded:
                r = rows[i]
                if r.get("image_bytes") is None or r.get("mask_bytes") is None:
                    raise ValueError(f"valid row {r['pid']} {r['pose']} carries no image bytes: run "
                                     "RowValidator with keep_images='valid' before PairBuilder")
                decoded[i] = (to_rgb(decode(r["image_bytes"])), to_mask(decode(r["mask_bytes"])))
            return decoded[i]

        for p in pairs:
            if not p.selected:
                continue
            g_photo, g_mask = pixels(p.garment)
            q_photo, q_mask = pixels(p.person)
            s = build_sample(g_photo, g_mask, q_photo, q_mask, p.group, cfg.canvas, cfg.mask)
            for k, v in zip(META, (p.pid, p.split, p.group, p.cloth_type, p.garment_pose, p.person_pose)):
                out[k].append(v)
            out["canvas"].append(_png(to_uint8(s.canvas)))  # exact: the canvas is uint8 / 255
            out["mask"].append(pack_mask(s.mask_canvas))
            out["stats"].append("")
        if self.with_stats and n:
            out["pid"].append(str(rows[0]["pid"]))
            out["split"].append(STATS_SPLIT)
            for k in ("group", "cloth_type", "garment_pose", "person_pose"):
                out[k].append("")
            out["canvas"].append(b"")
            out["mask"].append(b"")
            out["stats"].append(json.dumps(pid_stats(rows, pairs, skipped)))
        return {k: _column(v) for k, v in out.items()}


def pid_stats(rows: list[dict], pairs: list, skipped: Counter) -> dict[str, Any]:
    """Counts for one pid's rows: bad rows by reason (with the offending value where it names
    one), why valid rows gave no pair, and pairs left out by the category filter."""
    bad = Counter(str(r["reason"]) for r in rows if not r["valid"])
    values: dict[str, dict[str, int]] = {}
    for r in rows:
        if not r["valid"] and r["reason"] in (UNKNOWN_CLOTH_TYPE, UNPARSEABLE_POSE):
            d = values.setdefault(str(r["reason"]), {})
            d[str(r["detail"])] = d.get(str(r["detail"]), 0) + 1
    return {"rows": len(rows), "valid": len(rows) - sum(bad.values()), "bad_rows": dict(bad),
            "bad_row_values": values, "pairing_skipped": dict(skipped),
            "pairs": sum(p.selected for p in pairs), "pairs_not_selected": sum(not p.selected for p in pairs)}


# ---------------------------------------------------------------------------------------------
# Stage 2: canvases -> VAE latents


def masked_canvas(canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The pipeline's masked image in [-1, 1]: (N, H, 2W, 3) uint8 canvas and (N, H, 2W) mask ->
    (N, 3, H, 2W) float32 ``(2c - 1) * (1 - m)``: mask pixels at 0 = mid-grey, exactly
    ``canvas.build_sample``'s masked canvas and ``FluxFillPipeline``'s ``init_image * (1 - mask)``."""
    x = canvas.astype(np.float32) / 127.5 - 1.0
    m = (np.asarray(mask) > 0.5).astype(np.float32)[..., None]
    return np.ascontiguousarray((x * (1.0 - m)).transpose(0, 3, 1, 2))


class LatentEncoder:
    """Ray Data stage: canvases -> normalised VAE latents of the canvas and the masked canvas.

    The VAE is loaded once (bf16 on CUDA, fp32 on CPU). Latents are the posterior's mode
    (deterministic), normalised ``(z - shift_factor) * scaling_factor`` as ``FluxFillPipeline``
    does, stored as float16 bytes of (16, H/8, 2W/8). ``target``/``masked`` are added, the
    ``canvas`` PNG is dropped except for ``keep_canvas_splits``; stats rows pass through with
    empty latents.
    """

    def __init__(self, cfg_dict: dict, device: str = "cpu", keep_canvas_splits: tuple[str, ...] = KEEP_CANVAS_SPLITS,
                 num_threads: int | None = None):
        """num_threads: torch CPU threads; by default Ray's (one per CPU the actor holds, at least
        one): on CPU, more encoders (``num_encoders``) is the way to use more cores."""
        import torch

        from catvton.model.loading import load_vae

        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg = config_from_dict(cfg_dict)
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = load_vae(self.cfg.model.base, self.dtype).to(self.device)
        self.shift = float(self.vae.config.shift_factor or 0.0)
        self.scale = float(self.vae.config.scaling_factor)
        self.keep_canvas_splits = tuple(keep_canvas_splits)
        H, W = self.cfg.canvas.half_height, self.cfg.canvas.half_width
        self.mask_shape = (H, 2 * W)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, 2W) float32 in [-1, 1] -> (N, 16, H/8, 2W/8) float16 normalised latents."""
        import torch

        with torch.no_grad():
            x = torch.from_numpy(images).to(self.device, self.dtype)
            z = self.vae.encode(x).latent_dist.mode()
            z = ((z.float() - self.shift) * self.scale).cpu().numpy()
        if not np.isfinite(z).all() or np.abs(z).max() > 6e4:
            raise FloatingPointError(f"VAE latents out of float16 range (max |z| {np.abs(z).max():.3g}): "
                                     "check the VAE weights and dtype")
        return z.astype(np.float16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["pid"])
        idx = [i for i in range(n) if batch["split"][i] != STATS_SPLIT]
        target, masked = [b""] * n, [b""] * n
        if idx:
            canvas = np.stack([_from_png(batch["canvas"][i]) for i in idx])  # (N, H, 2W, 3) uint8
            if canvas.shape[1:3] != self.mask_shape:
                raise ValueError(f"canvas {canvas.shape[1:3]} does not match the configured {self.mask_shape}")
            mask = np.stack([unpack_mask(batch["mask"][i], self.mask_shape) for i in idx])
            clean = np.ascontiguousarray(canvas.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
            z = self.encode(np.concatenate([clean, masked_canvas(canvas, mask)]))  # one VAE call
            for j, i in enumerate(idx):
                target[i] = z[j].tobytes()
                masked[i] = z[len(idx) + j].tobytes()
        out = {k: batch[k] for k in (*META, "mask", "stats")}
        out["target"], out["masked"] = _column(target), _column(masked)
        out["canvas"] = _column([batch["canvas"][i] if batch["split"][i] in self.keep_canvas_splits else b""
                                 for i in range(n)])
        return out


# ---------------------------------------------------------------------------------------------
# Training side


def decode_batch(batch: dict[str, np.ndarray], manifest: dict) -> dict[str, Any]:
    """A batch of cache rows -> tensors: ``target``/``masked`` (B, 16, h, w) float32, ``mask``
    (B, 1, H, 2W) float32 in {0, 1}; ``group`` and ``pid`` stay lists of strings."""
    import torch

    c, h, w = manifest["latent_shape"]
    mask_shape = tuple(manifest["mask_shape"])
    out: dict[str, Any] = {}
    for key in ("target", "masked"):
        arrays = []
        for i, b in enumerate(batch[key]):
            a = np.frombuffer(b, np.float16)
            if a.size != c * h * w:
                raise ValueError(f"row {batch['pid'][i]!r}: {key} has {a.size} values, the cache's latent "
                                 f"shape {[c, h, w]} needs {c * h * w} (stats row or another cache?)")
            arrays.append(a)
        out[key] = torch.from_numpy(np.stack(arrays).reshape(-1, c, h, w).astype(np.float32))
    masks = np.stack([unpack_mask(b, mask_shape) for b in batch["mask"]])
    out["mask"] = torch.from_numpy(masks[:, None].astype(np.float32))
    out["group"] = [str(g) for g in batch["group"]]
    out["pid"] = [str(p) for p in batch["pid"]]
    return out


# ---------------------------------------------------------------------------------------------
# The prompt


def encode_prompt(cfg: Config, device: str = "cpu", max_sequence_length: int | None = None) -> dict[str, Any]:
    """The prompt's embeddings, computed once: ``prompt_embeds`` (1, T, D) from T5 and
    ``pooled_prompt_embeds`` (1, P) from CLIP, float32 on CPU.

    Runs ``FluxFillPipeline.encode_prompt`` itself on a pipeline holding only the text encoders,
    so padding, truncation and pooling are exactly the pipeline's. ``max_sequence_length``
    (T) defaults to ``cfg.model.max_sequence_length`` (512, FLUX's; the tiny T5 tokenizer
    supports 512 too).
    """
    import torch
    from diffusers import FluxFillPipeline

    from catvton.model.loading import load_text_encoders

    seq = max_sequence_length or cfg.model.max_sequence_length
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    tok, te, tok2, te2 = load_text_encoders(cfg.model.base, dtype)
    pipe = FluxFillPipeline(scheduler=None, vae=None, transformer=None, text_encoder=te.to(device),
                            tokenizer=tok, text_encoder_2=te2.to(device), tokenizer_2=tok2)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(cfg.model.prompt, prompt_2=None, device=torch.device(device),
                                                      max_sequence_length=seq)
    return {"prompt_embeds": prompt_embeds.float().cpu().contiguous(),
            "pooled_prompt_embeds": pooled.float().cpu().contiguous()}


def _encode_prompt_task(cfg_dict: dict, device: str) -> dict[str, Any]:
    return encode_prompt(config_from_dict(cfg_dict), device=device)


# ---------------------------------------------------------------------------------------------
# The cache folder


def _base_identity(base: str) -> str:
    """What identifies a base's weights: ``tiny`` and the tiny base's folder (as the training job
    passes it, resolved) both give the tiny base's build key; another local folder its absolute
    path; a hub id itself."""
    from catvton.model.tiny import tiny_base_key

    if base == "tiny":
        return tiny_base_key()
    path = Path(base).expanduser()
    if (path / "tiny_base.json").is_file():
        return path.name  # tiny-base-<hash of its build parameters>
    return str(path.resolve()) if path.exists() else base


def cache_key(cfg: Config) -> str:
    """A short hash of everything that changes the cache's contents: ``cfg.data``,
    ``cfg.canvas``, ``cfg.mask``, the base (see :func:`_base_identity`), the prompt and its T5
    length, and :data:`CACHE_VERSION`."""
    d = cfg.to_dict()
    picked = {"version": CACHE_VERSION, "data": d["data"], "canvas": d["canvas"], "mask": d["mask"],
              "base": _base_identity(cfg.model.base), "prompt": cfg.model.prompt,
              "max_sequence_length": cfg.model.max_sequence_length}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir(cfg: Config, root: str | Path | None = None) -> Path:
    """``<root>/latents-<cache_key>``; ``root`` defaults to :func:`catvton.paths.cache_root`."""
    from catvton.paths import cache_root

    return Path(root if root is not None else cache_root()).expanduser() / f"latents-{cache_key(cfg)}"


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a finished latent cache "
                                "(build it with python ray_jobs/preprocess.py)")
    return json.loads(path.read_text())


def split_files(folder: str | Path, split: str) -> list[str]:
    """The parquet files of one split (an empty list when the split has no pairs)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose from {list(SPLITS)}")
    return sorted(str(p) for p in (Path(folder) / f"split={split}").glob("*.parquet"))


def open_split(folder: str | Path, split: str, columns: list[str] | None = None):
    """A Ray Dataset over one split of the cache (``read_parquet`` of its folder)."""
    import ray.data

    files = split_files(folder, split)
    if not files:
        counts = load_manifest(folder)["counts"]
        raise FileNotFoundError(f"latent cache {folder} has no {split!r} pairs (counts per split: {counts})")
    ds = ray.data.read_parquet(files)
    return ds.select_columns(columns) if columns else ds


def load_text_embeds(folder: str | Path) -> dict[str, Any]:
    """``prompt_embeds`` (1, T, D) and ``pooled_prompt_embeds`` (1, P), float32 CPU tensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / TEXT_EMBEDS))


def _read_split(folder: Path, split: str, columns: list[str], pids: set[str] | None = None):
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files = sorted((folder / f"split={split}").glob("*.parquet"))
    if not files:
        return None
    ds = pads.dataset([str(f) for f in files], format="parquet")
    flt = pc.field("pid").isin(sorted(pids)) if pids is not None else None
    return ds.to_table(columns=columns, filter=flt)


def _sum_stats(folder: Path) -> dict[str, Any]:
    table = _read_split(folder, STATS_SPLIT, ["stats"])
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


def _write_samples(folder: Path, manifest: dict, n: int = NUM_SAMPLES) -> int:
    """``samples.npz``: canvas (N, H, 2W, 3) uint8, mask (N, H, 2W) uint8 {0, 1}, target/masked
    (N, 16, h, w) float16, and pid / group / garment_pose / person_pose strings."""
    H, W2 = manifest["mask_shape"]
    c, h, w = manifest["latent_shape"]
    cols = ["pid", "group", "garment_pose", "person_pose"]
    meta = _read_split(folder, "val", cols)
    picked = _pick_samples(meta.to_pylist() if meta is not None else [], n)
    rows: list[dict] = []
    if picked:
        table = _read_split(folder, "val", cols + ["canvas", "mask", "target", "masked"], {r["pid"] for r in picked})
        index = {(r["pid"], r["person_pose"]): r for r in table.to_pylist()}
        rows = [index[(r["pid"], r["person_pose"])] for r in picked]
    arrays = {
        "canvas": np.stack([_from_png(r["canvas"]) for r in rows]) if rows else np.zeros((0, H, W2, 3), np.uint8),
        "mask": np.stack([unpack_mask(r["mask"], (H, W2)) for r in rows]).astype(np.uint8) if rows
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
        table = _read_split(folder, s, ["pid", "group"])
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


def _block_bytes(source, min_blocks: int = 8, max_blocks: int = 64) -> int:
    """Target block size for the read: the source split into about two blocks per CPU (8 to 64;
    the sort moves blocks^2 pieces), counting half the file bytes (``mask_overlay`` is not read)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = min(max_blocks, max(min_blocks, 2 * cpus))
    fs = source.filesystem
    total = sum(fs.size(f) if fs is not None else os.path.getsize(f) for f in source.files)
    return int(min(128 << 20, max(1 << 20, total // (2 * blocks))))


def _cpus_per_actor() -> float:
    """1 CPU per encoder actor (and the prompt task) on a real cluster; a quarter on a small
    machine, where actors holding whole CPUs starve the read, sort and write tasks."""
    import ray

    return 1.0 if ray.cluster_resources().get("CPU", 0) >= 8 else 0.25


def build_latent_cache(cfg: Config, num_encoders: int = 1, use_gpu: bool = False, batch_size: int = 16,
                       progress: bool = True, cache_root: str | Path | None = None,
                       log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) the latent cache of ``cfg`` and return its folder.

    ``num_encoders`` VAE actors (one GPU each when ``use_gpu``) encode ``batch_size`` pairs at a
    time. The cache is written into a temporary sibling folder and renamed at the end, under a
    file lock, so a crash never leaves half a cache and concurrent callers build it once. A
    folder that already has its manifest is returned as is.
    """
    final = cache_dir(cfg, cache_root)
    if (final / MANIFEST).is_file():
        log(f"reusing latent cache {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / MANIFEST).is_file():
                log(f"reusing latent cache {final} (built while waiting)")
                return final
            if final.exists():
                raise RuntimeError(f"{final} exists without {MANIFEST}: not a finished cache; delete it and retry")
            tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
            try:
                manifest = _build(cfg, tmp, num_encoders, use_gpu, batch_size, progress, log)
                manifest["folder"] = str(final)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    log(f"latent cache written to {final}")
    return final


def _build(cfg: Config, out: Path, num_encoders: int, use_gpu: bool, batch_size: int, progress: bool,
           log: Callable[[str], None]) -> dict[str, Any]:
    """Run the pipeline into ``out`` and return the manifest (written by the caller)."""
    from ray.data import DataContext

    from catvton.ray_utils import init_ray

    t0 = time.time()
    init_ray()
    ctx = DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, progress
    try:
        return _run(cfg, out, num_encoders, use_gpu, batch_size, log, t0)
    finally:
        ctx.enable_progress_bars = bars


def _run(cfg: Config, out: Path, num_encoders: int, use_gpu: bool, batch_size: int,
         log: Callable[[str], None], t0: float) -> dict[str, Any]:
    import ray
    from diffusers import AutoencoderKL
    from ray.data import ActorPoolStrategy
    from ray.data.context import ShuffleStrategy
    from safetensors.torch import save_file

    from catvton.data.source import read_rows, resolve_source
    from catvton.data.validate import RowValidator
    from catvton.model.loading import resolve_base

    source = resolve_source(cfg.data)
    # Workers get the resolved base (the tiny base's folder), so no actor builds or resolves it.
    worker_cfg = cfg.to_dict()
    worker_cfg["model"]["base"] = resolve_base(cfg.model.base)
    device = "cuda" if use_gpu else "cpu"
    gpus = 1 if use_gpu else 0
    actor_cpus = _cpus_per_actor()
    log(f"latent cache: {len(source.files)} parquet files of {source.name}, {num_encoders} encoder(s) on {device}")

    # The prompt: once, in a task that can take a GPU (T5-XXL is 9.5 GB in bf16).
    text_ref = ray.remote(_encode_prompt_task).options(num_gpus=gpus, num_cpus=actor_cpus).remote(worker_cfg, device)

    rows = read_rows(source).select_columns(["images", "mask", "gender", "pose", "cloth_type", "pid", "caption"])
    # Small blocks, so validation and pairing run in parallel and the encoder starts on the first
    # pairs: by default a small dataset is one block and every stage runs as a single task. The
    # setting is inherited by every dataset derived from ``rows``; the sort keeps the block count.
    rows.context.target_max_block_size = _block_bytes(source)
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
    latents.write_parquet(str(out), partition_cols=["split"])
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
        "version": CACHE_VERSION,
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
    manifest["samples"] = {"file": SAMPLES, "count": _write_samples(out, manifest)}
    manifest["timings_s"] = {"pipeline": round(t_data, 1), "total": round(time.time() - t0, 1)}
    log(f"latent cache: {manifest['pairs']} pairs, bad rows {stats['bad_rows'] or 'none'}, "
        f"{manifest['timings_s']['total']:.0f} s")
    return manifest
