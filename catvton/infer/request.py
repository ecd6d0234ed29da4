"""One try-on request, from uploaded bytes to the picture returned: checked, on the canvas, and back.

The server's input path, kept free of any web framework so that it is tested without one:

- :func:`decode_image` / :func:`decode_mask` read an upload with limits checked *before* pixels are
  decoded (a 60000x60000 PNG is a few KB of header), and raise :class:`InputError` naming the field;
- :func:`request_sample` puts the person and garment on the training canvas with
  :func:`catvton.data.canvas.build_sample`, so a request's mask is generalised by exactly the rule
  the LoRA was trained with (``mask.<group>_rule``);
- :func:`to_person_size` maps the generated person half back onto the person's own photo, at its
  own size: outside the general mask every pixel is the uploaded one.

Arrays: photos ``(h, w, 3)`` uint8, masks ``(h, w)`` bool, canvases as in :mod:`catvton.data.canvas`.
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from catvton.config import CanvasConfig, Config
from catvton.data.canvas import TryOnSample, build_sample, fit_box, to_uint8
from catvton.data.masks import general_mask
from catvton.data.validate import png_bytes, to_mask, to_rgb  # noqa: F401 (png_bytes: the API's encoder)

SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class InputError(ValueError):
    """A request that cannot be served as sent; ``field`` names the part to fix."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_dict(self) -> dict:
        return {"error": self.message, "field": self.field}


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be (from :class:`catvton.infer.serving.ServeConfig`)."""

    min_side: int = 16
    """Smaller photos cannot show a garment on a person."""
    max_side: int = 8192
    """Longest side accepted."""
    max_pixels: int = 40_000_000
    """Width x height accepted: checked on the header, before decoding (decompression bombs)."""


def _open(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    """Open and fully decode ``data``; the size is checked on the header first."""
    if not data:
        raise InputError(field, "empty upload: send a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x raises) on huge images; our own limit below is stricter
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputError(field, f"image dimensions are enormous ({e}): at most {limits.max_side} pixels a side "
                                f"and {limits.max_pixels:,} pixels in all", status=413) from e
    except UnidentifiedImageError as e:
        raise InputError(field, "not a readable image: send a PNG, JPEG or WebP image") from e
    except Exception as e:  # PIL raises many types on a malformed header (SyntaxError, ValueError, ...)
        raise InputError(field, f"not a readable image ({type(e).__name__}: {e})"[:300]) from e
    if w < limits.min_side or h < limits.min_side:
        raise InputError(field, f"image is {w}x{h}: each side must be at least {limits.min_side} pixels")
    if max(w, h) > limits.max_side or w * h > limits.max_pixels:
        raise InputError(field, f"image is {w}x{h}: at most {limits.max_side} pixels a side and "
                                f"{limits.max_pixels:,} pixels in all", status=413)
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, zlib errors ...
        raise InputError(field, f"image data is truncated or corrupt ({type(e).__name__}: {e})"[:300]) from e
    return img


def decode_image(data: bytes, field: str, limits: ImageLimits) -> np.ndarray:
    """An uploaded photo as ``(h, w, 3)`` uint8 (transparency over white), or :class:`InputError`."""
    return to_rgb(_open(data, field, limits))


def decode_mask(data: bytes, field: str, limits: ImageLimits, person_hw: tuple[int, int]) -> np.ndarray:
    """An uploaded garment mask as ``(h, w)`` bool, read like the dataset's masks
    (:func:`catvton.data.validate.to_mask`); it must have the person photo's size and mark something."""
    mask = to_mask(_open(data, field, limits))
    if mask.shape != tuple(person_hw):
        raise InputError(field, f"mask is {mask.shape[1]}x{mask.shape[0]} but the person photo is "
                                f"{person_hw[1]}x{person_hw[0]}: send a mask of the person photo's size")
    if not mask.any():
        raise InputError(field, "mask is empty: mark the garment's region in white (or leave the mask out "
                                "to have it made automatically, where the server has a parser)")
    return mask


def parse_size(size: str | None, max_half_pixels: int) -> tuple[int, int] | None:
    """``"WxH"`` of one canvas half -> ``(half_height, half_width)``; None or "" -> None (the
    model config's canvas)."""
    if size is None or size.strip() == "":
        return None
    m = SIZE_RE.match(size.strip())
    if not m:
        raise InputError("size", f"size {size!r} is not WIDTHxHEIGHT, e.g. 768x1024")
    w, h = int(m.group(1)), int(m.group(2))
    if w < 32 or h < 32 or w % 16 or h % 16:
        raise InputError("size", f"size {w}x{h}: each side a multiple of 16, at least 32 "
                                 "(the VAE downsamples x8, then latents are packed 2x2)")
    if w * h > max_half_pixels:
        raise InputError("size", f"size {w}x{h}: at most {max_half_pixels:,} pixels per half", status=413)
    return h, w


def request_sample(person: np.ndarray, garment: np.ndarray, garment_mask: np.ndarray, group: str,
                   cfg: Config, half_hw: tuple[int, int]) -> TryOnSample:
    """The canvas and general mask canvas of one request, by the training code.

    ``garment`` is a product photo: all of it is the garment (the cut-out keeps it whole and fits
    it with the configured margin). ``garment_mask`` marks the garment worn on ``person``, from the
    request or the auto-masker; :func:`build_sample` generalises it with the training rule."""
    canvas = canvas_at(cfg.canvas, half_hw)
    whole = np.ones(garment.shape[:2], dtype=bool)
    return build_sample(garment, whole, person, garment_mask, group, canvas, cfg.mask)


def canvas_at(canvas: CanvasConfig, half_hw: tuple[int, int]) -> CanvasConfig:
    """The canvas section at another half size (the request's ``size``)."""
    return dataclasses.replace(canvas, half_height=half_hw[0], half_width=half_hw[1])


def to_person_size(result: np.ndarray, person: np.ndarray, garment_mask: np.ndarray, group: str,
                   cfg: Config) -> np.ndarray:
    """The try-on at the person photo's own size, ``(h, w, 3)`` uint8.

    ``result``: the generated canvas ``(H, 2W, 3)`` in [0, 1]. Its person half is scaled back
    through the window :func:`catvton.data.canvas.fit_box` cut from the photo, and used only inside
    the general mask at the photo's resolution; every other pixel is the uploaded photo's. When the
    photo already has the half's size this is the person half of ``result`` exactly (as uint8)."""
    h, w = person.shape[:2]
    H, W2 = result.shape[:2]
    W = W2 // 2
    top, left, win_h, win_w = fit_box((h, w), (H, W), cfg.canvas.person_fit)
    half = Image.fromarray(to_uint8(result[:, W:]))
    window = np.asarray(half if (win_w, win_h) == (W, H) else half.resize((win_w, win_h), Image.BICUBIC))
    generated = person.copy()
    sy0, sx0 = max(0, top), max(0, left)
    sy1, sx1 = min(h, top + win_h), min(w, left + win_w)
    generated[sy0:sy1, sx0:sx1] = window[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
    general = general_mask(garment_mask, group, cfg.mask)
    return np.where(general[..., None], generated, person)


