"""The cache's Ray Data stages, callable classes that a test can call without Ray: try-on
pairs of one pid -> canvases (:class:`PairBuilder`), canvases -> VAE latents
(:class:`LatentEncoder`), and the prompt's embeddings (:func:`encode_prompt`, once per cache).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from catvton.cache.format import KEEP_CANVAS_SPLITS, META, STATS_SPLIT, canvas_png, column, pack_mask_bits, png_pixels, unpack_mask_bits
from catvton.config import Config, config_from_dict
from catvton.data.canvas import build_sample, to_uint8
from catvton.data.pairs import make_pairs
from catvton.data.validate import UNKNOWN_CLOTH_TYPE, UNPARSEABLE_POSE, decode, to_mask, to_rgb
from catvton.model.loading import load_text_encoders, load_vae


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
            out["canvas"].append(canvas_png(to_uint8(s.canvas)))  # exact: the canvas is uint8 / 255
            out["mask"].append(pack_mask_bits(s.mask_canvas))
            out["stats"].append("")
        if self.with_stats and n:
            out["pid"].append(str(rows[0]["pid"]))
            out["split"].append(STATS_SPLIT)
            for k in ("group", "cloth_type", "garment_pose", "person_pose"):
                out[k].append("")
            out["canvas"].append(b"")
            out["mask"].append(b"")
            out["stats"].append(json.dumps(pid_stats(rows, pairs, skipped)))
        return {k: column(v) for k, v in out.items()}


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


VAE_BATCH = 8
"""Images per VAE call, fixed (see :meth:`LatentEncoder.encode`); higher: bigger calls (better on
a GPU) but up to VAE_BATCH - 1 padded images wasted per batch, and more activation memory."""


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
        """(N, 3, H, 2W) float32 in [-1, 1] -> (N, 16, H/8, 2W/8) float16 normalised latents.

        The VAE always sees :data:`VAE_BATCH` images (the last call padded with zeros): the
        convolutions' rounding depends on the batch size (on CPU a few float16 values in 1,000
        differ between a batch of 3 and of 16), not on the other images, so a pair's latents
        are the same bytes however Ray Data batched it, and a resumed cache equals a clean one."""
        import torch

        n = len(images)
        padded = np.concatenate([images, np.zeros((-n % VAE_BATCH, *images.shape[1:]), images.dtype)])
        with torch.no_grad():
            x = torch.from_numpy(padded).to(self.device, self.dtype)
            z = torch.cat([self.vae.encode(c).latent_dist.mode() for c in x.split(VAE_BATCH)])[:n]
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
            canvas = np.stack([png_pixels(batch["canvas"][i]) for i in idx])  # (N, H, 2W, 3) uint8
            if canvas.shape[1:3] != self.mask_shape:
                raise ValueError(f"canvas {canvas.shape[1:3]} does not match the configured {self.mask_shape}")
            mask = np.stack([unpack_mask_bits(batch["mask"][i], self.mask_shape) for i in idx])
            clean = np.ascontiguousarray(canvas.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
            z = self.encode(np.concatenate([clean, masked_canvas(canvas, mask)]))  # one VAE call
            for j, i in enumerate(idx):
                target[i] = z[j].tobytes()
                masked[i] = z[len(idx) + j].tobytes()
        out = {k: batch[k] for k in (*META, "mask", "stats")}
        out["target"], out["masked"] = column(target), column(masked)
        out["canvas"] = column([batch["canvas"][i] if batch["split"][i] in self.keep_canvas_splits else b""
                                 for i in range(n)])
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


def encode_prompt_task(cfg_dict: dict, device: str) -> dict[str, Any]:
    return encode_prompt(config_from_dict(cfg_dict), device=device)
