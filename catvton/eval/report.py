"""Base vs base + LoRA on held-out pairs, per garment group: the numbers and the pictures.

Generation runs as Ray Data batch inference (:mod:`catvton.eval.batch`), one fixed seed per pair,
the same for the base and the LoRA. Scores are on the person half against the ground truth:
masked PSNR / SSIM (inside the mask), PSNR / SSIM over the half, LPIPS, FID and KID. Metrics
whose networks cannot be loaded here are listed under ``absent`` with the reason, never faked.

Writes ``report.json``, ``report.md`` (base vs LoRA per group, with deltas) and
``grid_<group>.png`` (garment | masked person | base | LoRA | ground truth).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catvton.config import Config
from catvton.eval import metrics as M

PER_IMAGE = ("masked_psnr", "masked_ssim", "psnr", "ssim")
GRID_ROWS = 6


def score_group(results: np.ndarray, canvas: np.ndarray, mask: np.ndarray,
                extractor: torch.nn.Module | None, absent: dict[str, str]) -> dict[str, float]:
    """Every metric of one model on one group (person halves). Unavailable ones go to ``absent``."""
    w = canvas.shape[2] // 2
    gt, m, pred = canvas[:, :, w:], mask[:, :, w:], results[:, :, w:]
    out = {"masked_psnr": float(M.masked_psnr(pred, gt, m).mean()),
           "masked_ssim": float(M.masked_ssim(pred, gt, m).mean()),
           "psnr": float(M.half_psnr(pred, gt).mean()),
           "ssim": float(M.half_ssim(pred, gt).mean())}
    if "lpips" not in absent:
        try:
            out["lpips"] = M.lpips(pred, gt)
        except M.MetricUnavailable as e:
            absent["lpips"] = str(e)
    if "fid" not in absent:
        if len(pred) < 2:
            absent["fid"] = absent["kid"] = "needs at least 2 images per group"
        else:
            try:
                out.update(M.fid_kid(gt, pred, extractor))
            except M.MetricUnavailable as e:
                absent["fid"] = absent["kid"] = str(e)
    return out


def evaluate(cfg: Config, lora_dir: str | Path, samples: dict[str, dict[str, Any]], out_dir: str | Path,
             actors: int = 1, extractor: torch.nn.Module | None = None, source: str = "") -> dict[str, Any]:
    """Generate with the base and with the LoRA on ``samples`` (``{group: {"canvas", "mask",
    "pid"}}``), score, and write the report files into ``out_dir``. Returns the report."""
    from catvton.eval.batch import generate
    from catvton.infer.tryon import grid_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    absent: dict[str, str] = {}
    groups: dict[str, Any] = {}
    for group, s in samples.items():
        canvas, mask = s["canvas"], s["mask"]
        seeds = [cfg.infer.seed + i for i in range(len(canvas))]
        r_base = generate(cfg_dict, canvas, mask, seeds, lora=None, actors=actors, use_gpu=cfg.train.use_gpu)
        r_lora = generate(cfg_dict, canvas, mask, seeds, lora=str(lora_dir), actors=actors, use_gpu=cfg.train.use_gpu)
        base = score_group(r_base, canvas, mask, extractor, absent)
        lora = score_group(r_lora, canvas, mask, extractor, absent)
        groups[group] = {"pairs": len(canvas), "pids": len(set(s["pid"])),
                         "metrics": [k for k in base if k in lora], "base": base, "lora": lora,
                         "delta": {k: lora[k] - base[k] for k in base if k in lora}}
        grid_image(canvas[:GRID_ROWS], mask[:GRID_ROWS], {"base": r_base[:GRID_ROWS], "LoRA": r_lora[:GRID_ROWS]}
                   ).save(out / f"grid_{group}.png")
    report = {"base": cfg.model.base, "transformer_override": cfg.model.transformer_override,
              "lora": str(lora_dir), "source": source, "seed": cfg.infer.seed, "steps": cfg.infer.steps,
              "guidance": cfg.infer.guidance, "groups": groups, "absent": absent,
              "higher_is_better": {"masked_psnr": True, "masked_ssim": True, "psnr": True, "ssim": True,
                                   "lpips": False, "fid": False, "kid": False}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    from catvton.publish import evaluation_table

    lines = [f"# Evaluation: base vs LoRA ({report['source'] or 'held-out pairs'})", "",
             f"- base: `{report['base']}`" + (f" + `{report['transformer_override']}`" if report["transformer_override"] else ""),
             f"- LoRA: `{report['lora']}`",
             f"- {report['steps']} steps, guidance {report['guidance']}, seed {report['seed']} + pair index (same noise for both)",
             "- scores on the person half against the ground truth; masked_* inside the try-on mask; "
             "lower is better for lpips, fid, kid", "",
             evaluation_table(report), ""]
    lines += [f"![{g}](grid_{g}.png)" for g in report["groups"]]
    return "\n".join(lines) + "\n"
