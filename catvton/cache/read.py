"""Reading a finished latent cache: its manifest, a split (Ray Dataset or parquet files), the
prompt embeddings, the fixed sample pairs, and rows decoded into training tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from catvton.artifacts import MANIFEST, SAMPLES, TEXT_EMBEDS
from catvton.cache.format import unpack_mask_bits
from catvton.data.pairs import SPLITS


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


def read_split(folder: Path, split: str, columns: list[str], pids: set[str] | None = None):
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files = sorted((folder / f"split={split}").glob("*.parquet"))
    if not files:
        return None
    ds = pads.dataset([str(f) for f in files], format="parquet")
    flt = pc.field("pid").isin(sorted(pids)) if pids is not None else None
    return ds.to_table(columns=columns, filter=flt)




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
    masks = np.stack([unpack_mask_bits(b, mask_shape) for b in batch["mask"]])
    out["mask"] = torch.from_numpy(masks[:, None].astype(np.float32))
    out["group"] = [str(g) for g in batch["group"]]
    out["pid"] = [str(p) for p in batch["pid"]]
    return out



def load_samples(folder: str | Path) -> dict[str, np.ndarray] | None:
    """The fixed validation pairs of ``samples.npz`` (canvas, mask, target, masked, pid, group,
    poses), or None when the cache has none."""
    path = Path(folder) / SAMPLES
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
