"""FLUX.1-Fill-dev's inputs at the production canvas, in the layouts the job's own functions take
them, for the dry run (:mod:`catvton.train.dryrun`) and its fake-tensor measurement
(:mod:`catvton.train.measure`): a cache micro-batch as ``decode_batch`` returns it, the prompt's
embeddings as ``load_text_embeds`` returns them, ``samples.npz``'s pairs, the Serve replica's settings
and one batch of its requests. Random values: only shapes, dtypes and devices matter here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catvton.config import Config

REPO = Path(__file__).resolve().parents[2]


SERVE_CONFIG = "serve/config.l40s.yaml"
"""The production serve config (the Serve replica's settings), relative to the repository."""


INFER_STEPS = 2
"""Denoising steps of the dry run's sample grid and try-ons: every step runs the same code and holds
the same memory, and the second checks the step-to-step path (28 would only take 14x longer)."""


def latent_hw(cfg: Config) -> tuple[int, int]:
    """Latent rows and columns of the [garment | person] canvas."""
    return cfg.canvas.half_height // 8, 2 * cfg.canvas.half_width // 8


def cache_batch(cfg: Config, batch: int, generator: torch.Generator) -> dict[str, Any]:
    """A micro-batch as :func:`catvton.cache.read.decode_batch` returns it (CPU float32; the loop
    moves it to the device): latents, a person-half lower-body mask, groups."""
    h, w = latent_hw(cfg)
    H, W2 = 8 * h, 8 * w
    mask = torch.zeros(batch, 1, H, W2)
    mask[:, :, H // 3:, W2 // 2 + W2 // 8: W2 - W2 // 8] = 1
    return {"target": torch.randn(batch, 16, h, w, generator=generator),
            "masked": torch.randn(batch, 16, h, w, generator=generator), "mask": mask,
            "group": ["lower"] * batch, "pid": [f"dry{i}" for i in range(batch)]}


def text_embeds(cfg: Config, generator: torch.Generator, text_dim: int, pooled_dim: int) -> dict[str, torch.Tensor]:
    """The prompt's embeddings as :func:`catvton.cache.read.load_text_embeds` returns them (CPU)."""
    return {"prompt_embeds": torch.randn(1, cfg.model.max_sequence_length, text_dim, generator=generator),
            "pooled_prompt_embeds": torch.randn(1, pooled_dim, generator=generator)}


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def sample_rows(cfg: Config, n: int) -> dict[str, np.ndarray]:
    """``samples.npz``'s fixed validation pairs (canvas uint8, mask), as the grid reads them."""
    H, W2 = cfg.canvas.half_height, 2 * cfg.canvas.half_width
    rng = np.random.default_rng(0)
    mask = np.zeros((n, H, W2), np.uint8)
    mask[:, H // 3:, W2 // 2 + W2 // 8: W2 - W2 // 8] = 1
    return {"canvas": rng.integers(0, 256, (n, H, W2, 3), dtype=np.uint8), "mask": mask}


def dry_config(cfg: Config, base: Path, out: Path) -> Config:
    """``cfg`` on the weightless base (the override has FLUX.1-Fill-dev's architecture, so the
    base's own transformer stands for it), writing under ``out``."""
    from catvton.config import config_from_dict

    d = config_from_dict(cfg.to_dict())
    d.model.base, d.model.transformer_override = str(base), None
    d.run.output_dir, d.run.storage_path = str(out / "outputs"), str(out / "ray")
    d.infer.steps = INFER_STEPS
    return d


def model_dims(folder: Path) -> tuple[int, int]:
    c = json.loads((folder / "transformer" / "config.json").read_text())
    return int(c["joint_attention_dim"]), int(c["pooled_projection_dim"])


def serve_settings(path: Path, lora: Path | None, base: Path):
    """The Serve replica's settings from a serve config file (its first application's ``args``),
    with the dry run's LoRA and the weightless base."""
    import yaml

    from catvton.infer.serving import serve_config_from_dict

    doc = yaml.safe_load(path.read_text())
    args = dict(doc["applications"][0]["args"])
    args["lora"] = [str(lora)] if lora is not None else []
    args["overrides"] = [*args.get("overrides", []), f"model.base={base}", "model.transformer_override=null"]
    args["parser"] = ""  # requests come with their masks here
    return serve_config_from_dict(args)


def serve_request(service, batch: int) -> list[np.ndarray]:
    """One Serve replica's batch: ``batch`` requests (a person photo with its mask, a garment),
    prepared and generated as the replica does (:meth:`TryOnService.prepare` / ``generate``)."""
    rng = np.random.default_rng(1)
    person = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    garment = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    mask = np.zeros((1024, 768), bool)
    mask[450:980, 180:600] = True
    jobs = [service.prepare(person, garment, mask, "lower", seed=i, steps=2, guidance=None, half_hw=None)
            for i in range(batch)]
    return service.generate(jobs)


def load_service(settings, device: str):
    from catvton.infer.serving import TryOnService

    return TryOnService.load(settings, device=device)
