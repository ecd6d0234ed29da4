"""The cache's row format: column names, the canvas as PNG bytes, the mask as packed bits.

Row columns: ``pid``, ``group``, ``cloth_type``, ``garment_pose``, ``person_pose`` (strings);
``target`` and ``masked`` (float16 bytes of a (16, H/8, 2W/8) normalised VAE latent of the canvas
and of the masked canvas); ``mask`` (``np.packbits`` of the (H, 2W) bool mask canvas);
``canvas`` (PNG of the (H, 2W, 3) uint8 canvas, kept for the val split only: the sample grids
compare pixels, training does not need them); ``stats`` (empty for pairs). ``H, W`` are
``canvas.half_height, canvas.half_width``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from catvton.data.validate import png_bytes


STATS_SPLIT = "_stats"
"""The ``split`` value of PairBuilder's per-pid stats rows (summed into the manifest, then removed)."""

META = ("pid", "split", "group", "cloth_type", "garment_pose", "person_pose")
"""String columns of a pair row."""

KEEP_CANVAS_SPLITS = ("val",)
"""Splits whose rows keep the canvas PNG: the sample grids need the true pixels, training does not
(held-out scoring rebuilds its pairs from the source rows, :mod:`catvton.eval.samples`)."""


def canvas_png(img: np.ndarray) -> bytes:
    """The cache's canvas PNG: fast compression (written once per pair, read rarely)."""
    return png_bytes(img, compress_level=1)


def png_pixels(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def pack_mask_bits(mask: np.ndarray) -> bytes:
    """(H, 2W) mask (bool or {0, 1}) -> packed bits."""
    return np.packbits(np.asarray(mask) > 0.5).tobytes()


def unpack_mask_bits(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Packed bits -> (H, 2W) bool; raises if the byte count does not fit ``shape``."""
    n = shape[0] * shape[1]
    bits = np.frombuffer(data, np.uint8)
    if bits.size != (n + 7) // 8:
        raise ValueError(f"mask has {bits.size} bytes; a {shape[0]}x{shape[1]} mask packs into {(n + 7) // 8}")
    return np.unpackbits(bits, count=n).reshape(shape).astype(bool)


def column(values: list, dtype: Any = object) -> np.ndarray:
    """A 1-D object array of ``values`` (bytes and strings stay whole, not a 2-D char array)."""
    out = np.empty(len(values), dtype=dtype)
    out[:] = values
    return out
