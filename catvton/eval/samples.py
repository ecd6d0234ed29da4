"""Held-out rows and pairs, rebuilt from the source rows: the one place evaluation gets them.

Pairs are rebuilt from the source (not read from a latent cache) for every garment group,
whatever the training's category filter kept, so tops can be checked too: a LoRA must not make
them worse. Only rows of held-out pids are decoded. Both the try-on report
(:func:`held_out_samples`) and the auto-mask agreement command (:mod:`catvton.eval.automask_iou`,
through :func:`split_rows`) read their rows here.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import numpy as np

from catvton.config import Config
from catvton.data.canvas import build_sample
from catvton.data.pairs import make_pairs, split_of
from catvton.data.source import iter_rows, resolve_source
from catvton.data.validate import RowCheck, check_row, to_rgb

COLUMNS = ["images", "mask", "pid", "pose", "cloth_type"]
GROUPS = ("upper", "lower", "full")


def split_rows(cfg: Config, split: str) -> Iterator[tuple[dict[str, Any], RowCheck, np.ndarray | None, np.ndarray | None]]:
    """``(row, check, photo (h, w, 3) uint8, mask (h, w) bool)`` for every source row whose pid
    is in ``split``, in source order; ``photo`` and ``mask`` are None for an invalid row."""
    for row in iter_rows(resolve_source(cfg.data), columns=COLUMNS):
        if split_of(str(row.get("pid")), cfg.data) != split:
            continue  # cheap: only held-out pids are decoded
        check, photo, mask = check_row(row, cfg.data)
        yield row, check, (to_rgb(photo) if check.valid else None), (mask if check.valid else None)


def held_out_samples(cfg: Config, split: str = "test", groups: tuple[str, ...] = GROUPS,
                     max_per_group: int | None = None) -> dict[str, dict[str, Any]]:
    """Canvases of every ``split`` pair per group: ``{group: {"canvas": (N,H,2W,3) float32,
    "mask": (N,H,2W) float32, "garment_mask": (N,H,W) bool, "pid": [...]}}``, in a fixed order
    (group, pid, person pose). ``garment_mask``: the dataset's mask of the garment on the person
    half (where the try-on must show the garment given), inside the general ``mask``."""
    rows, pixels = [], []
    for row, check, photo, mask in split_rows(cfg, split):
        rows.append({"pid": row["pid"], "pose": row["pose"], "cloth_type": row["cloth_type"],
                     "valid": check.valid, "group": check.group, "view": check.view})
        pixels.append((photo, mask))
    pairs, _ = make_pairs(rows, cfg.data)
    out: dict[str, dict[str, list]] = defaultdict(lambda: {"canvas": [], "mask": [], "garment_mask": [], "pid": []})
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
        bucket["garment_mask"].append(s.person_mask)
        bucket["pid"].append(p.pid)
    return {g: {"canvas": np.stack(b["canvas"]), "mask": np.stack(b["mask"]),
                "garment_mask": np.stack(b["garment_mask"]), "pid": b["pid"]}
            for g, b in out.items() if b["pid"]}
