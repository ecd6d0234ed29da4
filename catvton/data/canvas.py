"""Try-on inputs: the [garment | person] canvas, its mask canvas [0 | mask] and the masked canvas.

Shapes: a half is ``(H, W)`` = ``(canvas.half_height, canvas.half_width)``; the canvas is
``(H, 2W, 3)`` float32 in [0, 1], garment on the left, person on the right (CatVTON-Flux's
layout). The mask canvas is ``(H, 2W)`` float32 in {0, 1}, 1 = inpaint, zero over the garment
half so the garment is never repainted. The masked canvas is the canvas with the masked pixels
set to mid-grey, which is what the FLUX Fill pipeline feeds its VAE (0 in [-1, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from catvton.config import CanvasConfig, MaskConfig
from catvton.data.masks import general_mask

WHITE = 255


def _resize(img: np.ndarray, size_wh: tuple[int, int], nearest: bool = False) -> np.ndarray:
    pil = Image.fromarray(img)
    return np.asarray(pil.resize(size_wh, Image.NEAREST if nearest else Image.BICUBIC))


def fit_box(src_hw: tuple[int, int], half_hw: tuple[int, int], mode: str) -> tuple[int, int, int, int]:
    """Where a (h, w) photo goes to fill a (H, W) half: the (top, left, height, width) of the
    photo's window in source pixels, padded (negative offsets / larger than the source) for
    ``pad`` or cropped for ``crop``, with the half's aspect."""
    h, w = src_hw
    H, W = half_hw
    target = W / H
    if (w / h > target) == (mode == "pad"):
        # pad: photo too wide -> grow the height; crop: photo too narrow -> cut the height
        win_w, win_h = w, round(w / target)
    else:
        win_w, win_h = round(h * target), h
    return (h - win_h) // 2, (w - win_w) // 2, win_h, win_w


def fit_to_half(img: np.ndarray, half_hw: tuple[int, int], mode: str, nearest: bool = False,
                fill: int = WHITE) -> np.ndarray:
    """Fit an (h, w[, c]) uint8 array into (H, W[, c]) with the half's aspect, by ``pad``
    (white borders) or ``crop`` (centre crop), then resize."""
    top, left, win_h, win_w = fit_box(img.shape[:2], half_hw, mode)
    window = np.full((win_h, win_w) + img.shape[2:], fill, dtype=img.dtype)
    # Copy the overlap of the source and the window (padding leaves the fill around it).
    sy0, sx0 = max(0, top), max(0, left)
    sy1, sx1 = min(img.shape[0], top + win_h), min(img.shape[1], left + win_w)
    window[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = img[sy0:sy1, sx0:sx1]
    H, W = half_hw
    return _resize(window, (W, H), nearest=nearest)


def garment_cutout(photo: np.ndarray, mask: np.ndarray, half_hw: tuple[int, int],
                   margin: float) -> np.ndarray:
    """The garment alone: ``photo`` (h, w, 3) uint8 where ``mask`` (h, w) bool, white elsewhere,
    cropped to the mask's box plus a margin and fitted (padded) to the (H, W) half."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("garment_cutout needs a non-empty mask (validation rejects empty ones)")
    cut = np.where(mask[..., None], photo, np.uint8(WHITE))
    crop = cut[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    pad = round(margin * max(crop.shape[:2]))
    crop = np.pad(crop, ((pad, pad), (pad, pad), (0, 0)), constant_values=WHITE)
    return fit_to_half(crop, half_hw, "pad")


@dataclass
class TryOnSample:
    """One try-on training sample; arrays as described in the module docstring."""

    canvas: np.ndarray
    """(H, 2W, 3) float32 in [0, 1]: [garment | person], the target image."""
    mask_canvas: np.ndarray
    """(H, 2W) float32 in {0, 1}: [zeros | general person mask]."""
    masked_canvas: np.ndarray
    """(H, 2W, 3) float32 in [0, 1]: the canvas with the mask region mid-grey."""
    person_mask: np.ndarray
    """(H, W) bool: the dataset's own garment mask on the person half (before generalising)."""


def build_sample(garment_photo: np.ndarray, garment_mask: np.ndarray, person_photo: np.ndarray,
                 person_mask: np.ndarray, group: str, canvas: CanvasConfig,
                 mask_cfg: MaskConfig) -> TryOnSample:
    """Build one sample from two views of an item.

    garment_photo/person_photo: (h, w, 3) uint8; garment_mask/person_mask: (h, w) bool (the
    dataset's masks); group: the garment group, which picks the general-mask rule.
    """
    half_hw = (canvas.half_height, canvas.half_width)
    garment = garment_cutout(garment_photo, garment_mask, half_hw, canvas.garment_margin)
    person = fit_to_half(person_photo, half_hw, canvas.person_fit)
    general = general_mask(person_mask, group, mask_cfg)
    gen_half = fit_to_half(general.astype(np.uint8), half_hw, canvas.person_fit, nearest=True, fill=0) > 0
    own_half = fit_to_half(person_mask.astype(np.uint8), half_hw, canvas.person_fit, nearest=True, fill=0) > 0

    canvas_img = np.concatenate([garment, person], axis=1).astype(np.float32) / 255.0
    mask_canvas = np.concatenate([np.zeros(half_hw, np.float32), gen_half.astype(np.float32)], axis=1)
    masked = canvas_img * (1.0 - mask_canvas[..., None]) + 0.5 * mask_canvas[..., None]
    return TryOnSample(canvas=canvas_img, mask_canvas=mask_canvas, masked_canvas=masked.astype(np.float32),
                       person_mask=own_half)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """float [0, 1] (any shape) -> uint8, for saving and grids."""
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
