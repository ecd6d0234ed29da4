"""Try-on generation for evaluation: one entry, :func:`generate`, in-process or as Ray Data batch
inference, one seed per pair.

Both ways run the same stage, :class:`TryOnPredictor` (the pipeline loaded once in ``__init__``,
``__call__`` pure): in-process it is called on consecutive slices of the inputs; with Ray Data an
actor pool maps it over the rows. Each pair's noise comes from its own seed, so a pair's result
does not depend on the batch it landed in, nor on where it ran (up to float rounding in batched
matmuls, about 1e-6).

Arrays: canvases ``(N, H, 2W, 3)`` float in [0, 1], masks ``(N, H, 2W)`` in {0, 1}. Canvases
travel as uint8 both ways (as the server receives pictures), so both ways see the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from catvton.config import Config, config_from_dict
from catvton.data.canvas import to_uint8
from catvton.infer.tryon import TryOn


class TryOnPredictor:
    """Ray Data stage: ``{"index", "canvas" (N,H,2W,3) uint8, "mask" (N,H,2W) uint8, "seed" (N,)}``
    -> ``{"index", "result" (N,H,2W,3) float32}``."""

    def __init__(self, cfg: dict[str, Any], lora: str | None = None, device: str = "cpu"):
        import torch

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.tryon = TryOn.load(config_from_dict(cfg), lora=lora, device=device, dtype=dtype)
        self.tryon.pipe.set_progress_bar_config(disable=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        canvas = batch["canvas"].astype(np.float32) / 255.0
        result = self.tryon.fill_canvases(canvas, batch["mask"].astype(np.float32),
                                          seed=[int(s) for s in batch["seed"]])
        return {"index": batch["index"], "result": result}


def generate(cfg: Config, canvases: np.ndarray, masks: np.ndarray, seeds: Sequence[int],
             lora: str | Path | None = None, *, ray_data: bool = False, actors: int = 1, batch_size: int = 8,
             use_gpu: bool | None = None) -> np.ndarray:
    """``(N, H, 2W, 3)`` float32 results, in input order: the base of ``cfg`` (plus ``lora``, a
    folder with ``pytorch_lora_weights.safetensors``) fills each canvas with its own seed.

    ``ray_data``: map :class:`TryOnPredictor` with a pool of ``actors`` actors (one GPU each with
    ``use_gpu``); else one predictor in this process. ``use_gpu`` None: ``cfg.train.use_gpu``."""
    if not len(canvases) == len(masks) == len(seeds):
        raise ValueError(f"{len(canvases)} canvases, {len(masks)} masks and {len(seeds)} seeds: give one of each per pair")
    use_gpu = cfg.train.use_gpu if use_gpu is None else use_gpu
    kwargs = {"cfg": cfg.to_dict(), "lora": None if lora is None else str(lora), "device": "cuda" if use_gpu else "cpu"}
    rows = {"index": np.arange(len(canvases)), "canvas": to_uint8(np.asarray(canvases)),
            "mask": np.asarray(masks).astype(np.uint8), "seed": np.asarray(seeds, dtype=np.int64)}
    if ray_data:
        results = _ray_data(rows, kwargs, actors, batch_size, use_gpu)
    else:
        predictor = TryOnPredictor(**kwargs)
        results = [predictor({k: v[i:i + batch_size] for k, v in rows.items()})
                   for i in range(0, len(canvases), batch_size)]
    out = np.zeros(np.shape(canvases), np.float32)
    done = 0
    for r in results:
        out[r["index"]] = r["result"]
        done += len(r["index"])
    if done != len(canvases):
        raise RuntimeError(f"generation returned {done} results for {len(canvases)} canvases")
    return out


def _ray_data(rows: dict[str, np.ndarray], kwargs: dict[str, Any], actors: int, batch_size: int,
              use_gpu: bool) -> list[dict[str, np.ndarray]]:
    import ray
    from ray.data import ActorPoolStrategy

    items = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["index"]))]
    ds = ray.data.from_items(items).map_batches(
        TryOnPredictor,
        fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
        batch_size=batch_size,
        batch_format="numpy",
    )
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))
