"""Does the LoRA dress people better? Base vs base + LoRA vs a grey fill, on held-out pairs.

Held-out pairs are rebuilt from the source rows (not from a latent cache) for every group,
whatever the training's category filter kept, so tops can be checked too: the LoRA must not
make them worse. Scores are on the person half, inside the general mask, against the person
photo (the ground truth: pairs come from two views of one item).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from catvton.config import Config
from catvton.data.canvas import build_sample
from catvton.data.pairs import make_pairs
from catvton.data.source import iter_rows, resolve_source
from catvton.data.validate import check_row, to_rgb
from catvton.eval.metrics import grey_fill, masked_psnr, masked_ssim

COLUMNS = ["images", "mask", "pid", "pose", "cloth_type"]


def held_out_samples(cfg: Config, split: str = "test", groups: tuple[str, ...] = ("upper", "lower", "full"),
                     max_per_group: int | None = None) -> dict[str, dict[str, Any]]:
    """Canvases of every ``split`` pair per group: ``{group: {"canvas": (N,H,2W,3) float32,
    "mask": (N,H,2W) float32, "pid": [...]}}`` in a fixed order."""
    from catvton.data.pairs import split_of

    source = resolve_source(cfg.data)
    rows, pixels = [], []
    for row in iter_rows(source, columns=COLUMNS):
        if split_of(str(row.get("pid")), cfg.data) != split:
            continue  # cheap: only held-out pids are decoded
        check, photo, mask = check_row(row, cfg.data)
        rows.append({"pid": row["pid"], "pose": row["pose"], "cloth_type": row["cloth_type"],
                     "valid": check.valid, "group": check.group, "view": check.view})
        pixels.append((to_rgb(photo), mask) if check.valid else None)
    pairs, _ = make_pairs(rows, cfg.data)
    out: dict[str, dict[str, list]] = defaultdict(lambda: {"canvas": [], "mask": [], "pid": []})
    for p in sorted(pairs, key=lambda p: (p.group, p.pid, p.person_pose)):
        if p.group not in groups:
            continue
        bucket = out[p.group]
        if max_per_group is not None and len(bucket["pid"]) >= max_per_group:
            continue
        (gp, gm), (pp, pm) = pixels[p.garment], pixels[p.person]
        s = build_sample(gp, gm, pp, pm, p.group, cfg.canvas, cfg.mask)
        bucket["canvas"].append(s.canvas)
        bucket["mask"].append(s.mask_canvas)
        bucket["pid"].append(p.pid)
    return {g: {"canvas": np.stack(b["canvas"]), "mask": np.stack(b["mask"]), "pid": b["pid"]}
            for g, b in out.items() if b["pid"]}


def score(results: np.ndarray, canvas: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean masked PSNR / SSIM of generated canvases on the person half."""
    w = canvas.shape[2] // 2
    gt, m, pred = canvas[:, :, w:], mask[:, :, w:], results[:, :, w:]
    return {"psnr": float(masked_psnr(pred, gt, m).mean()), "ssim": float(masked_ssim(pred, gt, m).mean())}


def compare_base_and_lora(cfg: Config, lora_dir: str | Path, split: str = "test",
                          groups: tuple[str, ...] = ("upper", "lower", "full"), max_per_group: int | None = None,
                          grid_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Per group: pairs, pids, and masked PSNR/SSIM of the base, the base + LoRA and a grey fill."""
    from catvton.infer.tryon import TryOn, grid_image

    samples = held_out_samples(cfg, split, groups, max_per_group)
    base = TryOn.load(cfg)
    tuned = TryOn.load(cfg, lora=lora_dir)
    report: dict[str, dict[str, Any]] = {}
    for group, s in samples.items():
        canvas, mask = s["canvas"], s["mask"]
        r_base = _batched(base, canvas, mask)
        r_lora = _batched(tuned, canvas, mask)
        w = canvas.shape[2] // 2
        grey = canvas.copy()
        grey[:, :, w:] = grey_fill(canvas[:, :, w:], mask[:, :, w:])
        report[group] = {"pairs": len(s["pid"]), "pids": len(set(s["pid"])),
                         "base": score(r_base, canvas, mask), "lora": score(r_lora, canvas, mask),
                         "grey": score(grey, canvas, mask)}
        if grid_dir is not None:
            grid_dir.mkdir(parents=True, exist_ok=True)
            grid_image(canvas[:6], mask[:6], {"base": r_base[:6], "LoRA": r_lora[:6]}).save(grid_dir / f"eval_{group}.png")
    return report


def _batched(tryon, canvas: np.ndarray, mask: np.ndarray, batch: int = 16) -> np.ndarray:
    # one seed per batch index: the same noise for base and LoRA on the same pair
    return np.concatenate([tryon.fill_canvases(canvas[i:i + batch], mask[i:i + batch], seed=tryon.cfg.infer.seed + i)
                           for i in range(0, len(canvas), batch)])
