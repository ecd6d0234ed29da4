"""The DeepFashion-with-masks schema (SaffalPoosh/deepFashion-with-masks) and its vocabulary.

One parquet row is one photo: ``images`` (the photo), ``mask``, ``mask_overlay`` (image cells,
stored in parquet as ``{bytes, path}`` structs), ``gender``, ``pose`` (``NN_K_view``),
``cloth_type`` (17 values), ``pid`` and ``caption``. There is no garment-image column and no
validation split: pairs and splits are built by :mod:`catvton.data.pairs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HUB_DATASET_ID = "SaffalPoosh/deepFashion-with-masks"
"""The hub dataset this project trains on."""

IMAGE_COLUMNS = ("images", "mask", "mask_overlay")
TEXT_COLUMNS = ("gender", "pose", "cloth_type", "pid", "caption")
COLUMNS = ("images", "gender", "pose", "cloth_type", "pid", "caption", "mask", "mask_overlay")

GROUPS = ("upper", "lower", "full")

CLOTH_TYPE_GROUP: dict[str, str] = {
    # upper body (and mixed suits, which CatVTON-Flux already handles as tops)
    "Tees_Tanks": "upper",
    "Graphic_Tees": "upper",
    "Blouses_Shirts": "upper",
    "Shirts_Polos": "upper",
    "Sweaters": "upper",
    "Sweatshirts_Hoodies": "upper",
    "Cardigans": "upper",
    "Jackets_Coats": "upper",
    "Jackets_Vests": "upper",
    "Suiting": "upper",
    # lower body (Denim is mostly jeans)
    "Shorts": "lower",
    "Skirts": "lower",
    "Pants": "lower",
    "Leggings": "lower",
    "Denim": "lower",
    # full body
    "Dresses": "full",
    "Rompers_Jumpsuits": "full",
}

VIEW_NAMES: dict[int, str] = {
    1: "front",
    2: "side",
    3: "back",
    4: "full",
    5: "zoom",
    6: "flat",
    7: "additional",
}
"""DeepFashion In-shop view codes, the ``K`` in ``NN_K_view``."""

_POSE_RE = re.compile(r"^(\d{1,3})_(\d)_([a-z]+)$")


def cloth_group(cloth_type: str) -> str | None:
    """The garment group (``upper`` / ``lower`` / ``full``) of a ``cloth_type``; None if unknown.

    Unknown values are never guessed: the caller counts them as bad rows with their value.
    """
    return CLOTH_TYPE_GROUP.get(cloth_type)


@dataclass(frozen=True)
class Pose:
    """A parsed ``pose`` value such as ``06_1_front``."""

    photo_group: int
    """``NN``: which photo set of the item (one shoot of one model)."""
    view_code: int
    """``K``: 1 front, 2 side, 3 back, 4 full, 5 zoom, 6 flat, 7 additional."""
    view: str
    """The view name from the code (``front``, ``side``...)."""


def parse_pose(pose: str) -> Pose | None:
    """Parse ``NN_K_name``; None when the value does not have that form or K is no known view.

    The name part must agree with the code (``06_1_front``, not ``06_1_back``), since a
    disagreement means the value cannot be trusted to say which view the photo is.
    """
    if not isinstance(pose, str):
        return None
    m = _POSE_RE.match(pose.strip())
    if m is None:
        return None
    group, code, name = int(m.group(1)), int(m.group(2)), m.group(3)
    view = VIEW_NAMES.get(code)
    if view is None or view != name:
        return None
    return Pose(photo_group=group, view_code=code, view=view)
