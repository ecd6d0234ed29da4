"""A demo catalogue from the synthetic world, in the layout ``ray_jobs/tryon_batch.py`` reads
(:mod:`catvton.infer.catalogue`): people with a mask per region, product shots and worn photos
(with their garment masks), and an outfits CSV.

    python ray_jobs/tryon_batch.py --make-example /tmp/catalogue
    python ray_jobs/tryon_batch.py --people /tmp/catalogue/people --garments /tmp/catalogue/garments

People are the canonical front view (no jitter) of synthetic pids wearing a top and a bottom, so
each has an ``upper`` and a ``lower`` mask, and a ``full`` mask (their union: where a dress goes).
A region's garments are other pids' items of that region: product shots (the flat view, cropped
to the garment on white), and the last of each region a worn photo (the pid's front view) with
its ``.mask.png``, which the job cuts out as training does.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from catvton.offline.synthetic import plan_pid, render_view

DEFAULT_GARMENTS = {"upper": 3, "lower": 2, "full": 1}
"""Garments per region of the demo: with 4 people, 24 person x garment images."""


def write_demo_catalogue(out: str | Path, people: int = 4, garments: dict[str, int] | None = None,
                         size: int = 256, seed: int = 0) -> dict[str, Path]:
    """Write ``people/``, ``garments/<region>/`` and ``outfits.csv`` under ``out``; returns their
    paths. Deterministic in ``(people, garments, size, seed)``."""
    out = Path(out)
    garments = DEFAULT_GARMENTS if garments is None else garments
    people_dir, garments_dir = out / "people", out / "garments"
    people_dir.mkdir(parents=True, exist_ok=True)
    wanted = {region: n for region, n in garments.items() if n > 0}
    found: dict[str, list[str]] = {region: [] for region in wanted}
    person_ids: list[str] = []
    index = 0
    while len(person_ids) < people or any(len(found[r]) < n for r, n in wanted.items()):
        if index > 2000:
            raise RuntimeError(f"the first 2000 synthetic pids do not hold {people} people and {garments} garments")
        plan = plan_pid(seed, index)
        index += 1
        region = plan.outfit.item
        if len(person_ids) < people and plan.outfit.full is None:
            photo, masks = render_view(plan.person, plan.outfit, "front", size)
            pid = f"model-{len(person_ids) + 1:02d}"
            _save(people_dir / f"{pid}.png", photo)
            masks["full"] = masks["upper"] | masks["lower"]
            for r in ("upper", "lower", "full"):
                _save(people_dir / f"{pid}.{r}.png", masks[r])
            person_ids.append(pid)
        elif region in wanted and len(found[region]) < wanted[region]:
            gid = f"{plan.cloth_type.lower()}-{plan.index}"
            folder = garments_dir / region
            folder.mkdir(parents=True, exist_ok=True)
            if len(found[region]) == wanted[region] - 1 and wanted[region] > 1:  # the last one: a worn photo
                photo, masks = render_view(plan.person, plan.outfit, "front", size)
                _save(folder / f"{gid}.png", photo)
                _save(folder / f"{gid}.mask.png", masks[region])
            else:
                photo, masks = render_view(plan.person, plan.outfit, "flat", size)
                _save(folder / f"{gid}.png", product_shot(photo, masks[region], margin=0.05))
            found[region].append(gid)
    outfits = out / "outfits.csv"
    with outfits.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["person", "upper", "lower", "full"])
        for k, pid in enumerate(person_ids):
            if found.get("upper") and found.get("lower"):
                w.writerow([pid, found["upper"][k % len(found["upper"])], found["lower"][k % len(found["lower"])], ""])
        if found.get("full") and person_ids:
            w.writerow([person_ids[0], "", "", found["full"][0]])
    return {"people": people_dir, "garments": garments_dir, "outfits": outfits}


def product_shot(photo: np.ndarray, mask: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """The garment alone on white, cropped to its mask: what a shop's product photo looks like
    (and what training's garment cut-out makes of a worn garment). ``margin``: white added on every
    side, a share of the longer side (at least 2 pixels when there is one)."""
    ys, xs = np.nonzero(mask)
    cut = np.where(mask[..., None], photo, np.uint8(255))[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    if not margin:
        return cut
    pad = max(2, round(margin * max(cut.shape[:2])))
    return np.pad(cut, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)


def _save(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr.astype(np.uint8) * 255 if arr.dtype == bool else arr).save(path)
