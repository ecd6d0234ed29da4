"""Try-on generation as Ray Data batch inference: an actor pool whose actors load the pipeline
once, one seed per canvas (results do not depend on how Ray batches the rows)."""

from __future__ import annotations

from typing import Any

import numpy as np

from catvton.config import config_from_dict


class TryOnPredictor:
    """Ray Data stage: ``{"index", "canvas" (N,H,2W,3) uint8, "mask" (N,H,2W), "seed"}`` ->
    ``{"index", "result" (N,H,2W,3) float32}``."""

    def __init__(self, cfg: dict[str, Any], lora: str | None = None, device: str = "cpu"):
        import torch

        from catvton.infer.tryon import TryOn

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.tryon = TryOn.load(config_from_dict(cfg), lora=lora, device=device, dtype=dtype)
        self.tryon.pipe.set_progress_bar_config(disable=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        canvas = batch["canvas"].astype(np.float32) / 255.0
        result = self.tryon.fill_canvases(canvas, batch["mask"].astype(np.float32), seed=list(batch["seed"]))
        return {"index": batch["index"], "result": result}


def generate(cfg_dict: dict[str, Any], canvases: np.ndarray, masks: np.ndarray, seeds: list[int],
             lora: str | None = None, actors: int = 1, use_gpu: bool = False, batch_size: int = 8) -> np.ndarray:
    """Results for every canvas, in input order. ``canvases`` float in [0, 1] (sent as uint8)."""
    import ray
    from ray.data import ActorPoolStrategy

    from catvton.data.canvas import to_uint8

    items = [{"index": i, "canvas": to_uint8(c), "mask": m.astype(np.uint8), "seed": int(s)}
             for i, (c, m, s) in enumerate(zip(canvases, masks, seeds))]
    ds = ray.data.from_items(items).map_batches(
        TryOnPredictor,
        fn_constructor_kwargs={"cfg": cfg_dict, "lora": lora, "device": "cuda" if use_gpu else "cpu"},
        compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
        batch_size=batch_size,
        batch_format="numpy",
    )
    rows = ds.take_all()
    out = np.zeros(canvases.shape, np.float32)
    for r in rows:
        out[int(r["index"])] = r["result"]
    if len(rows) != len(canvases):
        raise RuntimeError(f"batch inference returned {len(rows)} results for {len(canvases)} canvases")
    return out
