"""General masks: widen a garment mask so its shape does not give the garment away.

CatVTON-Flux's author found that masks must be "as general as possible": pants, shorts and a
skirt on the same person should get the same mask, or the model reads the garment from the
mask's outline instead of from the garment image. All functions take and return boolean
``(H, W)`` arrays at the photo's resolution.
"""

from __future__ import annotations

import cv2
import numpy as np

from catvton.config import MaskConfig


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean (H, W) mask with a disk of ``radius`` pixels."""
    if radius <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of all True pixels of a boolean (H, W) mask."""
    ys, xs = np.nonzero(mask)
    out = np.zeros(mask.shape, np.uint8)
    if len(xs) == 0:
        return out.astype(bool)
    hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool) | mask


def box(mask: np.ndarray, margin_px: int, to_bottom: bool, min_width_px: int = 0) -> np.ndarray:
    """The mask's bounding box, at least ``min_width_px`` wide (centred on the mask) and widened
    by ``margin_px`` each side; down to the last row if ``to_bottom`` (so shorts, skirts and
    pants of one person give the same box)."""
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return out
    left, right = int(xs.min()), int(xs.max()) + 1
    grow = max(0, min_width_px - (right - left))
    left, right = left - grow // 2, right + grow - grow // 2
    x0, x1 = max(0, left - margin_px), min(w, right + margin_px)
    y0, y1 = ys.min(), (h if to_bottom else ys.max() + 1)
    out[y0:y1, x0:x1] = True
    return out


def general_mask(mask: np.ndarray, group: str, cfg: MaskConfig) -> np.ndarray:
    """The general try-on mask of a garment mask for its group (``upper``/``lower``/``full``).

    ``mask``: bool (H, W), the garment as the dataset marks it. The rule per group comes from
    ``cfg`` (``mask.<group>_rule``); the dilation radius and box margin scale with the image.
    """
    if mask.ndim != 2:
        raise ValueError(f"general_mask wants a (H, W) mask, got shape {mask.shape}")
    h, w = mask.shape
    widened = dilate(mask.astype(bool), round(cfg.dilation * h))
    rule = getattr(cfg, f"{group}_rule")
    if rule == "dilate":
        return widened
    if rule == "hull":
        return convex_hull(widened)
    if rule in ("box", "box_to_bottom"):
        return box(widened, round(cfg.box_margin * w), to_bottom=rule == "box_to_bottom",
                   min_width_px=round(cfg.box_min_width * w))
    raise ValueError(f"unknown mask rule {rule!r} for group {group!r}")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
