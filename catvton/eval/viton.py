"""Read a VITON-HD-layout test folder into try-on canvases (upper body: where the base model was
trained, so the LoRA can be checked not to make tops worse).

Layout (as VITON-HD ships it)::

    <root>/test_pairs.txt              "<person>.jpg <cloth>.jpg" per line
    <root>/test/image/<person>.jpg     the person photo (the ground truth in the paired setting)
    <root>/test/cloth/<cloth>.jpg      the garment, a product shot on white
    <root>/test/cloth-mask/<cloth>.jpg optional: the garment's mask (else the whole image)
    <root>/test/agnostic-mask/<person>_mask.png   the region to regenerate

Paired setting (the default): each person gets their own garment (``cloth/<person>.jpg``), so the
person photo is the ground truth. Unpaired lines have no ground truth and are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from catvton.config import Config
from catvton.data.canvas import fit_to_half, garment_cutout


class VitonError(ValueError):
    """The folder is not in the VITON-HD layout; names what is missing."""


def _image(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (OSError, ValueError) as e:
        raise VitonError(f"{path}: not a readable image ({e})") from e


def read_pairs(root: Path) -> list[tuple[str, str]]:
    pairs_file = root / "test_pairs.txt"
    if not pairs_file.is_file():
        raise VitonError(f"{pairs_file} is missing: a VITON-HD folder has test_pairs.txt and test/image, "
                         "test/cloth, test/agnostic-mask")
    pairs = []
    for n, line in enumerate(pairs_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise VitonError(f"{pairs_file}:{n}: expected '<person>.jpg <cloth>.jpg', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def viton_samples(root: str | Path, cfg: Config, limit: int | None = None) -> dict[str, dict]:
    """``{"upper": {"canvas": (N,H,2W,3) float32, "mask": (N,H,2W) float32, "pid": [...]}}``,
    paired setting; skipped lines (missing files) are counted in ``"skipped"``."""
    root = Path(root)
    half = (cfg.canvas.half_height, cfg.canvas.half_width)
    canvases, masks, names, skipped = [], [], [], {}
    for person_name, _ in read_pairs(root):
        stem = Path(person_name).stem
        person_path = root / "test" / "image" / person_name
        cloth_path = root / "test" / "cloth" / person_name  # paired: the person's own garment
        mask_path = root / "test" / "agnostic-mask" / f"{stem}_mask.png"
        missing = [p for p in (person_path, cloth_path, mask_path) if not p.is_file()]
        if missing:
            skipped[stem] = f"missing {', '.join(str(p.relative_to(root)) for p in missing)}"
            continue
        cloth = _image(cloth_path, "RGB")
        cloth_mask_path = root / "test" / "cloth-mask" / person_name
        cmask = (_image(cloth_mask_path, "L") > 127) if cloth_mask_path.is_file() else np.ones(cloth.shape[:2], bool)
        garment = garment_cutout(cloth, cmask, half, cfg.canvas.garment_margin)
        person = fit_to_half(_image(person_path, "RGB"), half, cfg.canvas.person_fit)
        region = fit_to_half((_image(mask_path, "L") > 127).astype(np.uint8), half, cfg.canvas.person_fit,
                             nearest=True, fill=0) > 0
        if not region.any():
            skipped[stem] = "empty agnostic mask"
            continue
        canvases.append(np.concatenate([garment, person], axis=1).astype(np.float32) / 255.0)
        masks.append(np.concatenate([np.zeros(half, np.float32), region.astype(np.float32)], axis=1))
        names.append(stem)
        if limit is not None and len(names) >= limit:
            break
    if not names:
        raise VitonError(f"{root}: no usable pair ({len(skipped)} skipped: {dict(list(skipped.items())[:3])})")
    return {"upper": {"canvas": np.stack(canvases), "mask": np.stack(masks), "pid": names, "skipped": skipped}}
