"""Procedural DeepFashion rows in the real schema and hub layout: the project's offline dataset.

Real rows cannot be downloaded everywhere, so every offline path (tests, the tiny CPU run, the
setup report) reads synthetic rows that look like ``SaffalPoosh/deepFashion-with-masks`` to the
code: the same columns (:data:`catvton.schema.COLUMNS`), the same ``NN_K_view`` poses, the
same 17 ``cloth_type`` values, ``id_00000001``-style pids, image cells stored in parquet as
``{bytes, path}`` structs under ``data/train-0000k-of-0000n.parquet``.

What a row shows: a flat-shaded 2D person (head, hair, neck, torso, arms, legs, shoes) on a light
studio background, wearing an outfit (upper + lower garment, or one full-body garment). Each pid
is one *item* of one ``cloth_type``; the row ``mask`` marks only that item's visible garment
region in that photo. The item's colour and pattern reappear in every view of the pid (front,
side, back, zoomed-out ``full``, shifted ``additional`` and, for some pids, a ``flat`` product
shot without a person) -- that is what makes try-on learnable from pairs of views.

Everything is deterministic given ``(num_pids, image_size, seed)``: pid ``i`` draws from
``numpy.random.default_rng([seed, i, stream])``, so it is the same whatever ``num_pids`` is.

This module is long because it is a renderer: a person's body, the cut of every garment type,
patterns, views and the hub writer, all procedural and deterministic; splitting the drawing code
across files would scatter one picture's geometry. Nothing in the library imports it.

Build a folder by hand (a tqdm bar over pids, then a summary)::

    python -m catvton.offline.synthetic --out /tmp/synth --pids 480 --size 256 --seed 0
    python -m catvton.offline.synthetic --out /tmp/synth_tiny --pids 12 --size 96   # seconds
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from catvton.artifacts import build_once, synthetic_dir
from catvton.schema import CLOTH_TYPE_GROUP, COLUMNS, IMAGE_COLUMNS, VIEW_NAMES, parse_pose

RGB = tuple[int, int, int]

GENDERS = ("WOMEN", "MEN")

RENDER_VIEWS = ("front", "side", "back", "full", "additional", "flat")
"""Views :func:`render_view` can draw (``zoom``, code 5, is not synthesised)."""

VIEW_CODE: dict[str, int] = {name: code for code, name in VIEW_NAMES.items()}

MEN_FORBIDDEN = frozenset({"Skirts", "Dresses", "Rompers_Jumpsuits"})
"""Cloth types a MEN item never has (DeepFashion's menswear has none)."""

# Which types each gender's items are drawn from: DeepFashion In-shop's own split (menswear has
# Shirts_Polos, Jackets_Vests and Suiting; womenswear the rest), so all 17 types appear.
_ITEM_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "WOMEN": {
        "upper": ("Tees_Tanks", "Graphic_Tees", "Blouses_Shirts", "Sweaters", "Sweatshirts_Hoodies",
                  "Cardigans", "Jackets_Coats"),
        "lower": ("Pants", "Denim", "Shorts", "Skirts", "Leggings"),
        "full": ("Dresses", "Rompers_Jumpsuits"),
    },
    "MEN": {
        "upper": ("Tees_Tanks", "Shirts_Polos", "Sweaters", "Sweatshirts_Hoodies", "Jackets_Vests",
                  "Suiting"),
        "lower": ("Pants", "Denim", "Shorts"),
    },
}
# Group shares per gender, chosen so that with 85% WOMEN the whole set is about 40% upper,
# 35% lower, 25% full (MEN have no full-body items): 0.85*0.29 ~ 0.25, 0.85*0.36+0.15*0.6 ~ 0.40.
_GROUP_SHARE: dict[str, dict[str, float]] = {
    "WOMEN": {"upper": 0.36, "lower": 0.35, "full": 0.29},
    "MEN": {"upper": 0.60, "lower": 0.40},
}
WOMEN_SHARE = 0.85

# The garment worn with the item (never the item itself): everyday pieces.
_COMPLEMENT_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "WOMEN": {"upper": ("Tees_Tanks", "Blouses_Shirts", "Graphic_Tees", "Sweaters", "Cardigans"),
              "lower": ("Pants", "Denim", "Shorts", "Skirts", "Leggings")},
    "MEN": {"upper": ("Tees_Tanks", "Shirts_Polos", "Sweaters", "Sweatshirts_Hoodies"),
            "lower": ("Pants", "Denim", "Shorts")},
}

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots")
_PATTERN_WORD = {"solid": "", "hstripes": "striped", "vstripes": "pinstriped", "checks": "checked",
                 "dots": "polka-dot"}

# Garment colours. Each differs from the studio greys (200-218, +-2 grain) by > 10 on some
# channel even after the 7% side shading (white: 250 -> 232), so a garment pixel never passes
# for background. Blends of a light and a dark pattern colour can, on a few edge pixels.
PALETTE: tuple[tuple[str, RGB], ...] = (
    ("black", (28, 28, 32)), ("white", (250, 250, 248)), ("grey", (135, 136, 140)),
    ("charcoal", (62, 64, 70)), ("navy", (30, 40, 90)), ("blue", (40, 90, 200)),
    ("light blue", (140, 180, 232)), ("teal", (20, 128, 130)), ("green", (50, 140, 60)),
    ("olive", (110, 115, 50)), ("yellow", (236, 200, 40)), ("mustard", (198, 148, 30)),
    ("orange", (236, 120, 30)), ("red", (200, 30, 40)), ("burgundy", (110, 20, 42)),
    ("pink", (240, 140, 172)), ("purple", (110, 50, 140)), ("lavender", (176, 156, 224)),
    ("brown", (110, 70, 40)), ("beige", (210, 182, 140)),
)
_DENIM: tuple[tuple[str, RGB], ...] = (
    ("light blue", (128, 158, 200)), ("blue", (64, 94, 148)), ("dark blue", (36, 50, 88)),
    ("black", (38, 38, 44)),
)
_SKIN: tuple[RGB, ...] = (
    (246, 214, 192), (236, 198, 170), (224, 178, 142), (198, 146, 108), (170, 118, 84),
    (140, 92, 62), (112, 72, 48), (86, 56, 40),
)
_HAIR: tuple[RGB, ...] = (
    (24, 20, 20), (56, 38, 28), (96, 64, 40), (140, 70, 40), (196, 160, 96), (150, 150, 150),
)
_SHOES: tuple[tuple[str, RGB], ...] = (
    ("black", (26, 26, 28)), ("white", (244, 244, 242)), ("brown", (96, 60, 36)),
    ("tan", (176, 130, 84)), ("red", (170, 30, 36)),
)

# Label ids of the painter's-algorithm label map (uint8, one per pixel).
_BG, _SKIN_L, _HAIR_L, _SHOE_L, _EYE_L, _MOUTH_L = 0, 1, 2, 3, 4, 5
class _SlotLabels(NamedTuple):
    """The labels of one garment slot; all three belong to the slot's mask."""

    main: int
    """The garment's fabric: main colour, carries the pattern."""
    trim: int
    """Collar and print: the second colour."""
    dark: int
    """Lapels, an open front, the inseam of trousers: the main colour darkened."""


_SLOT_LABELS: dict[str, _SlotLabels] = {
    "upper": _SlotLabels(10, 11, 12), "lower": _SlotLabels(20, 21, 22),
    "full": _SlotLabels(30, 31, 32)}

# Figure landmarks in figure heights: y = 0 at the top of the head, 1 at the soles.
_HEAD_CY, _HEAD_RX, _HEAD_RY = 0.068, 0.045, 0.062
_NECK_Y = 0.158
_SHOULDER_Y = 0.18
_WAIST_Y = 0.395
_HIP_Y = 0.49
_CROTCH_Y = 0.53
_LEG_TOP_Y = 0.475
_ANKLE_Y = 0.935


# --------------------------------------------------------------------------------------------
# Public dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Garment:
    """One garment: colours, pattern and the shape parameters its cloth type implies."""

    cloth_type: str
    """One of :data:`catvton.schema.CLOTH_TYPE_GROUP`; its group is the garment's slot."""
    noun: str
    """Caption word (``tee``, ``jeans``, ``jumpsuit``...)."""
    colour: RGB
    """Main colour."""
    colour_name: str
    colour2: RGB
    """Second colour: pattern stripes/checks/dots and solid trim (collar, print, hood)."""
    colour2_name: str
    pattern: str
    """One of :data:`PATTERNS`, drawn inside the garment silhouette in figure coordinates, so it
    lands on the same part of the garment in every view."""
    period: float
    """Pattern period in figure heights (0.025-0.05: 6-12 px on a 256-px front view)."""
    sleeve: str = "none"
    """Upper and full garments: ``strap`` (tank), ``none`` (sleeveless / vest), ``short``,
    ``mid`` (three-quarter) or ``long``."""
    hem: float = 0.5
    """Where the garment ends, in figure heights (0 top of head, 1 soles): 0.5 a tee, 0.6 shorts,
    0.7 a skirt, 0.92 trousers."""
    ease: float = 0.01
    """How far the garment stands off the body, in figure heights (leggings 0.002, coats 0.02)."""
    flare: float = 0.0
    """Extra half width at the hem of a skirt or dress, in figure heights."""
    detail: str = "none"
    """``none``, ``collar``, ``hood``, ``open`` (open front), ``lapels`` or ``graphic`` (print)."""

    @property
    def slot(self) -> str:
        """``upper``, ``lower`` or ``full``."""
        return CLOTH_TYPE_GROUP[self.cloth_type]


@dataclass(frozen=True)
class Outfit:
    """What a person wears: the item (the pid's garment) and at most one complementary garment.

    Either ``full`` is set (and ``upper``/``lower`` are None), or both ``upper`` and ``lower``.
    """

    item: str
    """The slot of the pid's item: ``upper``, ``lower`` or ``full`` (what the row mask marks)."""
    upper: Garment | None = None
    lower: Garment | None = None
    full: Garment | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.item not in _SLOT_LABELS:
            problems.append(f"item={self.item!r} is not one of {sorted(_SLOT_LABELS)}")
        elif self.garment(self.item) is None:
            problems.append(f"item={self.item!r} but that slot is empty")
        if self.full is not None and (self.upper is not None or self.lower is not None):
            problems.append("a full-body garment is worn alone (upper and lower must be None)")
        for slot in _SLOT_LABELS:
            g = self.garment(slot)
            if g is not None and g.slot != slot:
                problems.append(f"{slot}={g.cloth_type} belongs to the {g.slot} slot")
        if problems:
            raise ValueError("invalid Outfit: " + "; ".join(problems))

    def garment(self, slot: str) -> Garment | None:
        """The garment in ``slot`` (``upper``/``lower``/``full``), or None."""
        return {"upper": self.upper, "lower": self.lower, "full": self.full}[slot]

    @property
    def slots(self) -> tuple[str, ...]:
        """The filled slots, in drawing order."""
        return tuple(s for s in ("lower", "full", "upper") if self.garment(s) is not None)

    @property
    def item_garment(self) -> Garment:
        """The pid's garment."""
        g = self.garment(self.item)
        assert g is not None  # checked in __post_init__
        return g


@dataclass(frozen=True)
class Person:
    """A model: body proportions, skin, hair and shoes (the same in every view of a pid)."""

    gender: str
    """``WOMEN`` or ``MEN`` (the dataset's values)."""
    skin: RGB
    hair: RGB
    hair_style: str
    """``long``, ``bob``, ``bun`` or ``short``."""
    width: float
    """Body width factor, 0.92-1.08 (shoulders, waist, hips, limbs)."""
    height: float
    """Figure height factor, 0.94-1.0 of the view's frame (feet stay on the floor line)."""
    shoes: RGB
    shoes_name: str


# --------------------------------------------------------------------------------------------
# Sampling people and outfits
# --------------------------------------------------------------------------------------------


def _check_gender(gender: str) -> None:
    if gender not in GENDERS:
        raise ValueError(f"gender={gender!r}: expected one of {GENDERS}")


def random_person(rng: np.random.Generator, gender: str) -> Person:
    """A random model of ``gender`` (``WOMEN``/``MEN``)."""
    _check_gender(gender)
    skin = np.array(_SKIN[rng.integers(len(_SKIN))], dtype=float) + rng.uniform(-6, 6, 3)
    hair = _HAIR[rng.integers(len(_HAIR))]
    if gender == "WOMEN":
        style = str(rng.choice(["long", "long", "bob", "bun"]))
    else:
        style = "short"
    shoes_name, shoes = _SHOES[rng.integers(len(_SHOES))]
    return Person(
        gender=gender,
        skin=_rgb(skin),
        hair=hair,
        hair_style=style,
        width=float(rng.uniform(0.92, 1.08)),
        height=float(rng.uniform(0.94, 1.0)),
        shoes=shoes,
        shoes_name=shoes_name,
    )


def _rgb(c: Iterable[float]) -> RGB:
    r, g, b = (int(np.clip(round(float(v)), 0, 255)) for v in c)
    return (r, g, b)


def _dist(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _pick_colour(rng: np.random.Generator, palette: Sequence[tuple[str, RGB]],
                 avoid: Sequence[RGB] = (), min_dist: float = 90.0) -> tuple[str, RGB]:
    """A palette colour at least ``min_dist`` (RGB) from every colour in ``avoid``."""
    ok = [c for c in palette if all(_dist(c[1], a) >= min_dist for a in avoid)]
    if not ok:  # cannot happen with PALETTE (black and white are 350 apart); stay loud if edited
        raise ValueError(f"no palette colour is {min_dist} away from {list(avoid)}")
    return ok[rng.integers(len(ok))]


_SLEEVES = ("strap", "none", "short", "long")


def _make_garment(rng: np.random.Generator, cloth_type: str, gender: str,
                  avoid: Sequence[RGB] = (), plain: bool = False) -> Garment:
    """A garment of ``cloth_type``; ``plain`` makes a solid colour more likely (complements)."""
    u = rng.random  # shorthand: one uniform draw
    palette: Sequence[tuple[str, RGB]] = PALETTE
    if cloth_type == "Denim":
        palette = _DENIM
    elif cloth_type == "Leggings" and u() < 0.6:
        palette = [c for c in PALETTE if c[0] in ("black", "charcoal", "navy", "grey")]
    elif cloth_type == "Suiting" and u() < 0.7:
        palette = [c for c in PALETTE if c[0] in ("navy", "charcoal", "black", "grey", "beige")]
    name, colour = _pick_colour(rng, palette, avoid)
    name2, colour2 = _pick_colour(rng, PALETTE, [colour], min_dist=110.0)

    if cloth_type in ("Denim", "Suiting", "Graphic_Tees"):
        pattern = "solid"  # jeans, suits and printed tees read as one colour
    elif plain:
        pattern = str(rng.choice(PATTERNS, p=[0.7, 0.1, 0.05, 0.1, 0.05]))
    else:
        pattern = str(rng.choice(PATTERNS, p=[0.4, 0.2, 0.1, 0.15, 0.15]))
    kw: dict[str, Any] = {}
    noun = ""
    if cloth_type == "Tees_Tanks":
        tank = u() < 0.4
        noun, kw = ("tank top", dict(sleeve="strap")) if tank else ("tee", dict(sleeve="short"))
        kw.update(hem=rng.uniform(0.49, 0.51), ease=0.008)
    elif cloth_type == "Graphic_Tees":
        noun, kw = "graphic tee", dict(sleeve="short", hem=rng.uniform(0.49, 0.51), ease=0.01,
                                       detail="graphic")
    elif cloth_type == "Blouses_Shirts":
        noun = "blouse" if gender == "WOMEN" else "shirt"
        kw = dict(sleeve=str(rng.choice(["long", "short", "mid"], p=[0.5, 0.3, 0.2])),
                  hem=rng.uniform(0.48, 0.51), ease=0.01, detail="collar")
    elif cloth_type == "Shirts_Polos":
        polo = u() < 0.5
        noun = "polo shirt" if polo else "shirt"
        kw = dict(sleeve="short" if polo else "long", hem=rng.uniform(0.49, 0.52), ease=0.01,
                  detail="collar")
    elif cloth_type == "Sweaters":
        noun, kw = "sweater", dict(sleeve="long", hem=rng.uniform(0.5, 0.52), ease=0.013)
    elif cloth_type == "Sweatshirts_Hoodies":
        hood = u() < 0.5
        noun = "hoodie" if hood else "sweatshirt"
        kw = dict(sleeve="long", hem=rng.uniform(0.5, 0.52), ease=0.015,
                  detail="hood" if hood else "none")
    elif cloth_type == "Cardigans":
        noun, kw = "cardigan", dict(sleeve="long", hem=rng.uniform(0.52, 0.58), ease=0.014,
                                    detail="open")
    elif cloth_type == "Jackets_Coats":
        hem = rng.uniform(0.56, 0.7)
        noun = "coat" if hem > 0.62 else "jacket"
        kw = dict(sleeve="long", hem=hem, ease=0.018, flare=0.01, detail="open")
    elif cloth_type == "Jackets_Vests":
        vest = u() < 0.5
        noun = "vest" if vest else "jacket"
        kw = dict(sleeve="none" if vest else "long", hem=rng.uniform(0.5, 0.55), ease=0.014,
                  detail="open")
    elif cloth_type == "Suiting":
        noun, kw = "blazer", dict(sleeve="long", hem=rng.uniform(0.54, 0.58), ease=0.014,
                                  detail="lapels")
    elif cloth_type == "Pants":
        noun, kw = "pants", dict(hem=rng.uniform(0.91, 0.93), ease=rng.uniform(0.01, 0.016))
    elif cloth_type == "Denim":
        noun, kw = "jeans", dict(hem=rng.uniform(0.91, 0.93), ease=rng.uniform(0.005, 0.009))
    elif cloth_type == "Leggings":
        noun, kw = "leggings", dict(hem=rng.uniform(0.9, 0.92), ease=0.002)
    elif cloth_type == "Shorts":
        noun, kw = "shorts", dict(hem=rng.uniform(0.57, 0.62), ease=rng.uniform(0.012, 0.018))
    elif cloth_type == "Skirts":
        hem = rng.uniform(0.63, 0.76)
        noun = "mini skirt" if hem < 0.66 else "skirt"
        kw = dict(hem=hem, ease=0.006, flare=rng.uniform(0.02, 0.07))
    elif cloth_type == "Dresses":
        noun = "dress"
        kw = dict(sleeve=str(rng.choice(_SLEEVES, p=[0.35, 0.25, 0.3, 0.1])),
                  hem=rng.uniform(0.66, 0.8), ease=0.008, flare=rng.uniform(0.03, 0.08))
    elif cloth_type == "Rompers_Jumpsuits":
        romper = u() < 0.3
        noun = "romper" if romper else "jumpsuit"
        kw = dict(sleeve=str(rng.choice(_SLEEVES, p=[0.3, 0.2, 0.3, 0.2])),
                  hem=rng.uniform(0.57, 0.61) if romper else rng.uniform(0.9, 0.92),
                  ease=rng.uniform(0.008, 0.014))
    else:
        raise ValueError(f"cloth_type={cloth_type!r}: expected one of {sorted(CLOTH_TYPE_GROUP)}")
    return Garment(cloth_type=cloth_type, noun=noun, colour=colour, colour_name=name,
                   colour2=colour2, colour2_name=name2, pattern=pattern,
                   period=float(rng.uniform(0.025, 0.05)), **kw)


def make_outfit(rng: np.random.Generator, cloth_type: str, gender: str) -> Outfit:
    """An outfit whose item is a random garment of ``cloth_type``, plus a random complementary
    garment (a lower one for an upper item, an upper one for a lower item; none for full-body).

    Raises ValueError for an unknown type or gender, and for MEN with a skirt, dress or romper.
    """
    _check_gender(gender)
    if cloth_type not in CLOTH_TYPE_GROUP:
        raise ValueError(f"cloth_type={cloth_type!r}: expected one of {sorted(CLOTH_TYPE_GROUP)}")
    if gender == "MEN" and cloth_type in MEN_FORBIDDEN:
        raise ValueError(f"MEN items are never {cloth_type} (DeepFashion menswear has none)")
    item = _make_garment(rng, cloth_type, gender)
    slot = item.slot
    if slot == "full":
        return Outfit(item="full", full=item)
    other = "lower" if slot == "upper" else "upper"
    choices = _COMPLEMENT_TYPES[gender][other]
    comp = _make_garment(rng, str(choices[rng.integers(len(choices))]), gender,
                         avoid=[item.colour], plain=True)
    return Outfit(item=slot, **{slot: item, other: comp})


def sample_cloth_type(rng: np.random.Generator, gender: str) -> str:
    """A pid's item type: group by :data:`_GROUP_SHARE`, then uniform within the group."""
    _check_gender(gender)
    shares = _GROUP_SHARE[gender]
    groups = list(shares)
    group = groups[rng.choice(len(groups), p=list(shares.values()))]
    types = _ITEM_TYPES[gender][group]
    return str(types[rng.integers(len(types))])


def caption_for(person: Person, outfit: Outfit) -> str:
    """A DeepFashion-style caption, 26-169 characters: ``a woman in blue striped pants and a
    white tee``."""
    who = "a woman" if person.gender == "WOMEN" else "a man"

    def phrase(g: Garment) -> str:
        words = " ".join(w for w in (g.colour_name, _PATTERN_WORD[g.pattern], g.noun) if w)
        if g.noun.endswith("s") and g.noun not in ("dress",):  # pants, jeans, shorts, leggings
            return words
        return ("an " if words[0] in "aeiou" else "a ") + words

    if outfit.full is not None:
        # "a woman in a red jumpsuit" is 25 characters: the shoes keep every caption >= 26.
        text = f"{who} in {phrase(outfit.full)} and {person.shoes_name} shoes"
    else:
        assert outfit.upper is not None and outfit.lower is not None
        text = f"{who} in {phrase(outfit.upper)} and {phrase(outfit.lower)}"
    assert 26 <= len(text) <= 169, text
    return text


# --------------------------------------------------------------------------------------------
# Geometry: shapes in figure coordinates (x from the body's centre line, y from the head top,
# both in figure heights), rasterised through a _Frame into a label map.
# --------------------------------------------------------------------------------------------

Shape = tuple[int, str, Any]
"""(label, kind, params): kind ``poly`` (list of (x, y)), ``ellipse`` (cx, cy, rx, ry) or
``chord`` (cx, cy, rx, ry): the upper half of an ellipse."""


@dataclass(frozen=True)
class _Frame:
    """Figure coordinates -> pixels: ``px = cx + x * scale``, ``py = top + y * scale``."""

    cx: float
    top: float
    scale: float


@dataclass(frozen=True)
class _Stance:
    arm_angle: float
    """Degrees the arms hang out from vertical."""
    leg_spread: float
    """Extra ankle distance from the centre line, figure heights."""


@dataclass(frozen=True)
class _Body:
    """The body outline of one view (half widths already scaled for a side view)."""

    view: str
    sw: float
    ww: float
    hw: float
    arms: tuple[np.ndarray, ...]
    """Polylines (3, 2): shoulder, elbow, wrist. One (the near arm) in a side view."""
    arm_w: np.ndarray
    """(3,) full widths at shoulder, elbow, wrist."""
    legs: tuple[np.ndarray, ...]
    """Polylines (3, 2): hip, knee, ankle."""
    leg_w: np.ndarray

    def half_width(self, y: float) -> float:
        """Torso outline half width at height ``y`` (shoulders down to the upper thigh)."""
        xs = 0.62 if self.view == "side" else 1.0
        return float(np.interp(y, [0.165, _SHOULDER_Y, 0.26, _WAIST_Y, _HIP_Y, _CROTCH_Y, 0.7],
                               [self.sw * 0.6, self.sw, self.sw - 0.012 * xs, self.ww, self.hw,
                                self.hw * 0.97, self.hw * 0.9]))


def _build_body(person: Person, view: str, stance: _Stance) -> _Body:
    # A side view shows the torso's depth (about 0.6 of its width); limbs keep their width.
    xs = 0.62 if view == "side" else 1.0
    w = person.width
    if person.gender == "WOMEN":
        sw, ww, hw, limb = 0.097, 0.07, 0.094, 1.0
    else:
        sw, ww, hw, limb = 0.118, 0.088, 0.09, 1.12
    sw, ww, hw = sw * w * xs, ww * w * xs, hw * w * xs
    arm_w = np.array([0.038, 0.031, 0.025]) * w * limb
    leg_w = np.array([0.09, 0.058, 0.036]) * w * limb
    a = np.deg2rad(stance.arm_angle)
    arms = []
    sides = (1.0,) if view == "side" else (-1.0, 1.0)
    for s in sides:
        # The near arm of a side view hangs on the centre line, slightly forward (+x).
        joint = np.array([0.0 if view == "side" else s * (sw - 0.016), 0.19])
        d1 = np.array([np.sin(a) * s, np.cos(a)])
        d2 = np.array([np.sin(a * 0.6) * s, np.cos(a * 0.6)])  # forearm bends back in a little
        elbow = joint + 0.165 * d1
        arms.append(np.stack([joint, elbow, elbow + 0.17 * d2]))
    legs = []
    for s in (-1.0, 1.0):
        if view == "side":  # one leg a little ahead of the other
            hip, knee, ankle = (s * 0.012, _LEG_TOP_Y), (s * 0.02, 0.715), (s * 0.03, _ANKLE_Y)
        else:
            hx = s * 0.046 * w
            hip, knee = (hx, _LEG_TOP_Y), (hx + s * (0.004 + stance.leg_spread * 0.5), 0.715)
            ankle = (hx + s * (0.006 + stance.leg_spread), _ANKLE_Y)
        legs.append(np.array([hip, knee, ankle]))
    return _Body(view=view, sw=sw, ww=ww, hw=hw, arms=tuple(arms), arm_w=arm_w,
                 legs=tuple(legs), leg_w=leg_w)


def _limb(points: np.ndarray, widths: np.ndarray) -> list[tuple[float, float]]:
    """Polygon around a polyline (N, 2), ``widths[i]`` wide at point i."""
    n = len(points)
    left, right = [], []
    for i in range(n):
        d = points[min(i + 1, n - 1)] - points[max(i - 1, 0)]
        d = d / max(float(np.hypot(*d)), 1e-9)
        nrm = np.array([-d[1], d[0]]) * widths[i] / 2
        left.append(tuple(points[i] + nrm))
        right.append(tuple(points[i] - nrm))
    return left + right[::-1]


def _cut(points: np.ndarray, widths: np.ndarray, start: float, stop: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """The part of a polyline (N, 2) between arc-length fractions ``start`` and ``stop``, with
    interpolated widths. A negative ``start`` extends the first segment backwards (a sleeve
    starts above the shoulder joint so that it covers the shoulder)."""
    seg = np.hypot(*(points[1:] - points[:-1]).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)]) / seg.sum()
    ts = np.array([start] + [t for t in cum if start < t < stop] + [stop])
    xy = np.stack([np.interp(ts, cum, points[:, k]) for k in (0, 1)], axis=1)
    before = ts < 0  # np.interp clamps there: extrapolate along the first segment instead
    if before.any():
        d = (points[1] - points[0]) / seg[0]
        xy[before] = points[0] + np.outer(ts[before] * seg.sum(), d)
    return xy, np.interp(ts, cum, widths)


def _cut_at_y(points: np.ndarray, widths: np.ndarray, y: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of a (downward) polyline above height ``y``."""
    ys = points[:, 1]
    keep = [i for i in range(len(points)) if ys[i] < y]
    j = keep[-1]
    if j + 1 < len(points):
        t = (y - ys[j]) / (ys[j + 1] - ys[j])
        end = points[j] + t * (points[j + 1] - points[j])
        w_end = widths[j] + t * (widths[j + 1] - widths[j])
        return np.vstack([points[: j + 1], end]), np.append(widths[: j + 1], w_end)
    return points, widths


def _mirror(right: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Right-side outline (top to bottom) -> closed symmetric polygon."""
    return right + [(-x, y) for x, y in reversed(right)]


def _torso_garment(body: _Body, g: Garment, hem: float, skirt: bool) -> list[tuple[float, float]]:
    """Outline of a garment's torso part from the neckline down to ``hem``: a top (``skirt``
    False; straight below the hips) or a dress (flares from the hips to ``flare`` at the hem)."""
    e = g.ease
    xs = 0.62 if body.view == "side" else 1.0
    if g.sleeve in ("strap", "none"):
        inner, outer = (0.045, 0.066) if g.sleeve == "strap" else (0.036, body.sw - 0.01)
        right = [(inner * xs, 0.163), (outer * (xs if g.sleeve == "strap" else 1.0), 0.163),
                 (body.half_width(0.27) + e, 0.27)]
        dip = 0.215 if g.sleeve == "strap" else 0.2
    else:
        right = [(0.028, _NECK_Y), (body.sw + e, _SHOULDER_Y - 0.004),
                 (body.half_width(0.26) + e, 0.26)]
        dip = {"collar": 0.185, "open": 0.24, "lapels": 0.24}.get(g.detail, 0.175)
    if body.view == "back":
        dip = 0.165  # necklines are high at the back
    knots = [0.33, _WAIST_Y, 0.45, _HIP_Y]
    if skirt:
        right += [(body.half_width(y) + e, y) for y in knots if y < hem]
        right.append((body.half_width(_HIP_Y) + e + g.flare * (0.85 if body.view == "side" else 1),
                      hem))
    else:
        knots += [_CROTCH_Y, 0.6, 0.7]
        # Below the hips a coat hangs straight (plus its small flare) instead of following legs.
        def hwb(y: float) -> float:
            return body.half_width(min(y, _HIP_Y)) + e + g.flare * max(0.0, y - _HIP_Y) / 0.2
        right += [(hwb(y), y) for y in knots if y < hem]
        right.append((hwb(hem), hem))
    return [(0.0, dip)] + _mirror(right)


def _sleeves(body: _Body, g: Garment, lab: _SlotLabels) -> list[Shape]:
    stop = {"short": 0.32, "mid": 0.72, "long": 1.0}.get(g.sleeve)
    if stop is None:
        return []
    out: list[Shape] = []
    for arm in body.arms:
        pts, ws = _cut(arm, body.arm_w, -0.06, stop)
        out.append((lab.main, "poly", _limb(pts, ws + 2 * (g.ease * 0.7 + 0.004))))
    return out


def _trouser_legs(body: _Body, g: Garment, lab: _SlotLabels) -> list[Shape]:
    """Two leg tubes down to the hem, and a dark inseam where they overlap: without it shorts
    and rompers read as a skirt and a dress."""
    out: list[Shape] = []
    for leg in body.legs:
        pts, ws = _cut_at_y(leg, body.leg_w, g.hem)
        out.append((lab.main, "poly", _limb(pts, ws + 2 * g.ease)))
    if body.view != "side":
        leg = body.legs[1]  # the right leg; the left one is its mirror image
        ys = np.linspace(_CROTCH_Y, g.hem, 24)
        half = np.interp(ys, leg[:, 1], body.leg_w) / 2 + g.ease
        touching = ys[np.interp(ys, leg[:, 1], leg[:, 0]) - half < 0]
        if len(touching):
            y0, y1 = _CROTCH_Y - 0.01, float(touching[-1])
            out.append((lab.dark, "poly", [(-0.002, y0), (0.002, y0), (0.002, y1), (-0.002, y1)]))
    return out


def _lower_shapes(body: _Body, g: Garment, lab: _SlotLabels) -> list[Shape]:
    """A lower garment: waistband to hips fitted the same for every type (0.005 off the body),
    so that pants, shorts and a skirt on one person share their waist line."""
    e0 = 0.005
    top = [(body.half_width(y) + e0, y) for y in (_WAIST_Y, 0.45, _HIP_Y)]
    if g.cloth_type == "Skirts":
        flare = g.flare * (0.85 if body.view == "side" else 1.0)
        hem = (body.half_width(_HIP_Y) + e0 + flare, g.hem)
        return [(lab.main, "poly", _mirror(top + [hem]))]
    seat = top + [(body.half_width(_CROTCH_Y) + g.ease, _CROTCH_Y)]
    return [(lab.main, "poly", _mirror(seat))] + _trouser_legs(body, g, lab)


def _trim_shapes(body: _Body, g: Garment, lab: _SlotLabels, hem: float) -> list[Shape]:
    """Details: collar and print in the second colour, lapels and an open front dark, a hood in
    the garment's own fabric. Prints, lapels and openings are on the front only."""
    v = body.view
    if g.detail == "collar" and v != "back":
        return [(lab.trim, "poly", [(0.004, 0.172), (0.03, _NECK_Y - 0.004), (0.046, 0.2)]),
                (lab.trim, "poly", [(-0.004, 0.172), (-0.03, _NECK_Y - 0.004), (-0.046, 0.2)])]
    if g.detail == "collar":
        return [(lab.trim, "poly", [(-0.034, 0.152), (0.034, 0.152), (0.036, 0.172),
                                    (-0.036, 0.172)])]
    if g.detail == "hood":
        if v == "back":
            return [(lab.main, "poly", [(-0.06, 0.15), (0.06, 0.15), (0.045, 0.27), (0.0, 0.29),
                                        (-0.045, 0.27)])]
        return [(lab.main, "poly", [(-0.062, 0.185), (-0.056, 0.145), (-0.03, 0.128),
                                    (0.03, 0.128), (0.056, 0.145), (0.062, 0.185), (0.0, 0.175)])]
    if g.detail == "open" and v == "front":
        # The opening as a dark line: a wide strip of the shirt beneath would be another
        # garment inside the mask, and would shift the item's colour between front and back.
        return [(lab.dark, "poly", [(-0.004, 0.24), (0.004, 0.24), (0.004, hem), (-0.004, hem)])]
    if g.detail == "lapels" and v == "front":
        return [(lab.dark, "poly", [(0.0, 0.31), (0.03, _NECK_Y), (0.07, 0.21)]),
                (lab.dark, "poly", [(0.0, 0.31), (-0.03, _NECK_Y), (-0.07, 0.21)])]
    if g.detail == "graphic" and v == "front":
        return [(lab.trim, "ellipse", (0.0, 0.27, 0.035, 0.035))]
    return []


def _garment_layers(body: _Body, outfit: Outfit) -> tuple[list[Shape], list[Shape]]:
    """(torso-level shapes drawn before the arms, sleeve shapes drawn after them)."""
    before: list[Shape] = []
    sleeves: list[Shape] = []
    if outfit.lower is not None:
        before += _lower_shapes(body, outfit.lower, _SLOT_LABELS["lower"])
    if outfit.full is not None:
        g, lab = outfit.full, _SLOT_LABELS["full"]
        if g.cloth_type == "Dresses":
            before.append((lab.main, "poly", _torso_garment(body, g, g.hem, skirt=True)))
        else:  # rompers and jumpsuits: a top down to the crotch, then trouser legs
            top = _torso_garment(body, g, _CROTCH_Y + 0.01, skirt=False)
            before += [(lab.main, "poly", top)] + _trouser_legs(body, g, lab)
        before += _trim_shapes(body, g, lab, g.hem)
        sleeves += _sleeves(body, g, lab)
    if outfit.upper is not None:
        g, lab = outfit.upper, _SLOT_LABELS["upper"]
        before.append((lab.main, "poly", _torso_garment(body, g, g.hem, skirt=False)))
        before += _trim_shapes(body, g, lab, g.hem)
        sleeves += _sleeves(body, g, lab)
    return before, sleeves


def _figure_shapes(person: Person, outfit: Outfit, body: _Body) -> list[Shape]:
    """Every shape of a person in back-to-front (painter's) order."""
    v = body.view
    shapes: list[Shape] = []
    long_hair = person.hair_style in ("long", "bob")
    hair_end = 0.245 if person.hair_style == "long" else 0.14
    back_hair: list[Shape] = []
    if long_hair:
        x0, x1 = (-0.062, 0.012) if v == "side" else (-0.056, 0.056)
        back_hair = [(_HAIR_L, "poly", [(x0, 0.06), (x1, 0.06), (x1 + 0.004, hair_end),
                                        (x0 - 0.004, hair_end)])]
        if v != "back":
            shapes += back_hair  # behind the head and shoulders
    # Bare body: legs, torso with neck.
    for leg in body.legs:
        shapes.append((_SKIN_L, "poly", _limb(leg, body.leg_w)))
    torso = [(0.024, 0.11), (0.026, _NECK_Y), (body.sw, _SHOULDER_Y + 0.006),
             (body.half_width(0.26), 0.26)] + [(body.half_width(y), y) for y in
                                              (_WAIST_Y, _HIP_Y, _CROTCH_Y)]
    shapes.append((_SKIN_L, "poly", _mirror(torso)))
    before, sleeves = _garment_layers(body, outfit)
    shapes += before
    for arm in body.arms:
        shapes.append((_SKIN_L, "poly", _limb(arm, body.arm_w)))
    shapes += sleeves
    for arm in body.arms:  # hands
        d = arm[2] - arm[1]
        c = arm[2] + d / np.hypot(*d) * 0.022
        shapes.append((_SKIN_L, "ellipse", (c[0], c[1], 0.016, 0.026)))
    for leg in body.legs:  # shoes point outwards (forwards in a side view)
        s = 1.0 if v == "side" else np.sign(leg[2, 0])
        shapes.append((_SHOE_L, "ellipse", (leg[2, 0] + s * 0.01, _ANKLE_Y + 0.03, 0.032, 0.02)))
    head_x = 0.006 if v == "side" else 0.0
    if v == "back":
        shapes.append((_HAIR_L, "ellipse", (0.0, _HEAD_CY, _HEAD_RX + 0.003, _HEAD_RY + 0.003)))
        shapes += back_hair  # over the garment's back
    else:
        shapes.append((_SKIN_L, "ellipse", (head_x, _HEAD_CY, _HEAD_RX, _HEAD_RY)))
        if v == "side":
            shapes.append((_SKIN_L, "poly", [(0.044, 0.06), (0.058, 0.082), (0.044, 0.088)]))
        shapes.append((_HAIR_L, "chord", (head_x - (0.006 if v == "side" else 0.0), 0.05,
                                          _HEAD_RX + 0.004, 0.05)))
    if person.hair_style == "bun":
        shapes.append((_HAIR_L, "ellipse", (0.0 if v != "side" else -0.03, 0.004, 0.022, 0.02)))
    if v == "front":
        shapes += [(_EYE_L, "ellipse", (-0.016, 0.072, 0.006, 0.005)),
                   (_EYE_L, "ellipse", (0.016, 0.072, 0.006, 0.005)),
                   (_MOUTH_L, "ellipse", (0.0, 0.104, 0.011, 0.004))]
    elif v == "side":
        shapes += [(_EYE_L, "ellipse", (0.03, 0.072, 0.005, 0.005)),
                   (_MOUTH_L, "ellipse", (0.036, 0.104, 0.006, 0.004))]
    return shapes


def _rasterize(shapes: list[Shape], frame: _Frame, size: int) -> np.ndarray:
    """Paint the shapes' labels in order: (size, size) uint8 label map."""
    img = Image.new("L", (size, size), _BG)
    draw = ImageDraw.Draw(img)
    cx, top, sc = frame.cx, frame.top, frame.scale
    for label, kind, p in shapes:
        if kind == "poly":
            draw.polygon([(cx + x * sc, top + y * sc) for x, y in p], fill=label)
        else:
            ex, ey, rx, ry = p
            box = (cx + (ex - rx) * sc, top + (ey - ry) * sc,
                   cx + (ex + rx) * sc, top + (ey + ry) * sc)
            if kind == "ellipse":
                draw.ellipse(box, fill=label)
            else:
                draw.chord(box, 180, 360, fill=label)
    return np.asarray(img)


def _coverage(x0: np.ndarray, x1: np.ndarray, duty: float) -> np.ndarray:
    """Mean of a periodic 0/1 signal (1 on the first ``duty`` of each unit period) over the
    intervals [x0, x1] (in periods): exact box-filtered anti-aliasing of stripes."""

    def cum(x: np.ndarray) -> np.ndarray:  # integral of the signal from 0 to x
        f = np.floor(x)
        return f * duty + np.minimum(x - f, duty)

    return (cum(x1) - cum(x0)) / (x1 - x0)


def _pattern_alpha(g: Garment, frame: _Frame, h: int, w: int) -> np.ndarray:
    """Share of the second colour in each pixel, float32 in [0, 1], broadcastable to (H, W).

    The pattern lives in figure coordinates, so it sits on the same part of the garment in every
    view (and scales with the figure). It is anti-aliased (pixel coverage, not a 0/1 test): a
    1-px stripe falling between pixel centres otherwise vanished from whole views at 96 px and
    the garment's mean colour jumped between views of one pid.
    """
    step = 1.0 / (g.period * frame.scale)  # one pixel, in periods
    cols = ((np.arange(w, dtype=np.float64) - 0.5 - frame.cx) / frame.scale / g.period)[None, :]
    rows = ((np.arange(h, dtype=np.float64) - 0.5 - frame.top) / frame.scale / g.period)[:, None]
    if g.pattern == "hstripes":
        a = _coverage(rows, rows + step, 0.4)
    elif g.pattern == "vstripes":
        a = _coverage(cols, cols + step, 0.35)
    elif g.pattern == "checks":
        cu, cv = _coverage(cols, cols + step, 0.5), _coverage(rows, rows + step, 0.5)
        a = cu * (1 - cv) + cv * (1 - cu)  # exact over a pixel box: the xor of two stripe sets
    elif g.pattern == "dots":
        du = (cols + step / 2) % 1.0 - 0.5
        dv = (rows + step / 2) % 1.0 - 0.5
        # Distance inside the dot's rim (radius 0.25 period), in pixels, through a 1-px ramp.
        a = np.clip((0.25 - np.sqrt(du * du + dv * dv)) / step + 0.5, 0.0, 1.0)
    else:
        raise ValueError(f"pattern {g.pattern!r} has no second colour; "
                         f"expected one of {PATTERNS[1:]}")
    return a.astype(np.float32)


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels (H, W) bool on a boundary between two labels: drawn darker, for a drawn look and so
    that garment edges stay visible on any background. Patterns are not labels, so stripes get
    no outline."""
    edge = np.zeros(labels.shape, dtype=bool)
    diff_x = labels[:, 1:] != labels[:, :-1]
    diff_y = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    return edge


def _colourize(labels: np.ndarray, edge: np.ndarray, person: Person | None, outfit: Outfit,
               frame: _Frame, bg: RGB, rng: np.random.Generator | None, shade: bool
               ) -> np.ndarray:
    """Label map (H, W) -> photo (H, W, 3) uint8: flat colours, dark outlines and,
    with ``shade``, soft round shading and a darker floor; with ``rng``, background grain."""
    h, w = labels.shape
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[_BG] = bg
    if person is not None:
        skin = np.array(person.skin, dtype=np.float32)
        lut[_SKIN_L], lut[_HAIR_L], lut[_SHOE_L] = skin, person.hair, person.shoes
        lut[_EYE_L] = (40, 30, 30)
        lut[_MOUTH_L] = skin * 0.7 + np.array([40, 0, 0], dtype=np.float32)
    for slot, (main, trim, dark) in _SLOT_LABELS.items():
        g = outfit.garment(slot)
        if g is not None:
            lut[main] = g.colour
            lut[trim] = g.colour2
            lut[dark] = np.array(g.colour, dtype=np.float32) * 0.6
    photo = np.take(lut, labels, axis=0)  # (H, W, 3) float32; 3x faster than lut[labels]
    for slot, (main, _, _) in _SLOT_LABELS.items():
        g = outfit.garment(slot)
        if g is not None and g.pattern != "solid":
            alpha = np.where(labels == main, _pattern_alpha(g, frame, h, w), np.float32(0.0))
            photo += alpha[:, :, None] * np.subtract(g.colour2, g.colour, dtype=np.float32)
    fig = labels != _BG
    # One gain map (H, W) for the figure and one offset map for the background, applied in a
    # single pass: this function runs once per row, thousands of times per dataset.
    if shade:
        # A rounded body: up to 7% darker towards the silhouette's sides.
        xn = (np.arange(w, dtype=np.float32) - frame.cx) / (0.16 * frame.scale)
        gain = np.where(fig, (1.0 - 0.07 * np.minimum(xn * xn, 1.0))[None, :], np.float32(1.0))
    else:
        gain = np.ones((h, w), dtype=np.float32)
    # 0.72: darker than any garment colour times 0.8 would be, so that an outlined white
    # garment (250 -> 180) never matches the grey studio background (200-221).
    gain[edge & fig] *= 0.72
    offset = np.zeros((h, w), dtype=np.float32)
    if shade:  # the studio floor darkens towards the bottom
        rows = np.arange(h, dtype=np.float32) / h
        offset += (np.clip((rows - 0.75) / 0.25, 0, 1) * -8.0)[:, None]
    if rng is not None:
        # Grain in 2x2 blocks: per-pixel noise made PNG encoding 2x slower and files 3x larger.
        grain = rng.integers(-2, 3, size=((h + 1) // 2, (w + 1) // 2), dtype=np.int8)
        offset += np.repeat(np.repeat(grain, 2, axis=0), 2, axis=1)[:h, :w]
    offset[fig] = 0.0
    photo *= gain[:, :, None]
    photo += offset[:, :, None] + 0.5  # + 0.5: astype truncates, this rounds
    return np.clip(photo, 0, 255).astype(np.uint8)


def _stance(photo_group: int, view: str, rng: np.random.Generator | None) -> _Stance:
    # Photo group 2 is another shoot of the same outfit: arms further out, feet apart.
    arm, spread = (8.0, 0.0) if photo_group <= 1 else (20.0, 0.03)
    if view == "additional":
        arm += 8.0
    if rng is not None:
        arm += float(rng.uniform(-2.0, 2.0))
        spread += float(rng.uniform(0.0, 0.01))
    return _Stance(arm_angle=arm, leg_spread=spread)


def _frame_for(view: str, size: int, person: Person, photo_group: int,
               rng: np.random.Generator | None) -> _Frame:
    """Where the figure stands: 0.9 of the photo's height in front/side/back, 0.66 in ``full``,
    1.0 and off-centre (feet cut) in ``additional``; +-5% scale and position jitter."""
    j = rng.uniform(-1.0, 1.0, size=3) if rng is not None else np.zeros(3)
    floor, height, cx = 0.955 * size, 0.9 * size, size / 2
    if view == "full":
        floor, height = 0.88 * size, 0.66 * size
    elif view == "additional":
        side = 1.0 if rng is None or rng.random() < 0.5 else -1.0
        floor, height, cx = 1.04 * size, 1.0 * size, size * (0.5 + 0.08 * side)
    if photo_group > 1:
        cx += 0.04 * size
    height *= person.height * (1.0 + 0.05 * j[0])
    cx += 0.05 * size * j[1]
    floor += 0.02 * size * j[2]
    return _Frame(cx=cx, top=floor - height, scale=height)


def _bg_colour(rng: np.random.Generator | None) -> RGB:
    if rng is None:
        return (212, 212, 214)
    base = rng.uniform(203, 215)
    return _rgb(base + rng.uniform(-3, 3, 3))


def _shape_bbox(shapes: list[Shape]) -> tuple[float, float, float, float]:
    xs: list[float] = []
    ys: list[float] = []
    for _, kind, p in shapes:
        if kind == "poly":
            xs += [x for x, _ in p]
            ys += [y for _, y in p]
        else:
            ex, ey, rx, ry = p
            xs += [ex - rx, ex + rx]
            ys += [ey - ry, ey + ry]
    return min(xs), min(ys), max(xs), max(ys)


def render_view(person: Person, outfit: Outfit, view: str, size: int,
                rng: np.random.Generator | None = None, *, photo_group: int = 1
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw one photo of ``person`` wearing ``outfit``.

    Args:
        view: one of :data:`RENDER_VIEWS`. ``flat`` draws the item garment alone on white.
        size: side of the square photo, >= 32.
        rng: per-view jitter (position, scale +-5%, arm angle), background tint and noise.
            None draws the canonical, noise-free view: two calls with the same person differ
            only where their outfits differ.
        photo_group: the pose's ``NN``; group 2 is another shoot (arms out, feet apart).

    Returns:
        ``(photo, masks)``: photo (size, size, 3) uint8; masks maps each filled slot of the
        outfit (``upper``/``lower``/``full``) to a (size, size) bool array of that garment's
        *visible* pixels (hair, hands and arms in front of it are excluded). In a ``flat`` view
        only the item is drawn, so the other slot's mask is all False.
    """
    if view not in RENDER_VIEWS:
        raise ValueError(f"view={view!r}: render_view draws {RENDER_VIEWS}")
    if size < 32:
        raise ValueError(f"size={size}: at least 32 pixels are needed to draw a person")
    if photo_group < 1:
        raise ValueError(f"photo_group={photo_group}: poses number their groups from 01")
    if view == "flat":
        return _render_flat(person, outfit, size, rng)
    bg = _bg_colour(rng)
    stance = _stance(photo_group, view, rng)
    frame = _frame_for(view, size, person, photo_group, rng)
    body = _build_body(person, "front" if view in ("full", "additional") else view, stance)
    labels = _rasterize(_figure_shapes(person, outfit, body), frame, size)
    edge = _outline(labels)
    photo = _colourize(labels, edge, person, outfit, frame, bg, rng, shade=True)
    masks = {s: np.isin(labels, _SLOT_LABELS[s]) for s in outfit.slots}
    return photo, masks


def _render_flat(person: Person, outfit: Outfit, size: int, rng: np.random.Generator | None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The item laid flat on a near-white sheet: sleeves and legs spread, filling ~80%. The
    person only sets the garment's cut (their body's proportions); no one is drawn."""
    stance = _Stance(arm_angle=30.0 + (float(rng.uniform(-3, 3)) if rng is not None else 0.0),
                     leg_spread=0.04)
    body = _build_body(person, "front", stance)
    only = Outfit(item=outfit.item, **{outfit.item: outfit.item_garment})
    before, sleeves = _garment_layers(body, only)
    shapes = before + sleeves
    x0, y0, x1, y1 = _shape_bbox(shapes)
    fill = 0.8 * (1.0 + 0.04 * float(rng.uniform(-1, 1)) if rng is not None else 1.0)
    scale = fill * size / max(x1 - x0, y1 - y0)
    frame = _Frame(cx=size / 2 - (x0 + x1) / 2 * scale, top=size / 2 - (y0 + y1) / 2 * scale,
                   scale=scale)
    labels = _rasterize(shapes, frame, size)
    edge = _outline(labels)
    # Near-white, but >= 10 below the white garment (250) so that it stays distinguishable.
    bg = (236, 236, 236) if rng is None else _rgb(np.full(3, rng.uniform(232, 238)))
    photo = _colourize(labels, edge, None, only, frame, bg, rng, shade=False)
    masks = {s: np.zeros((size, size), dtype=bool) for s in outfit.slots}
    masks[outfit.item] = np.isin(labels, _SLOT_LABELS[outfit.item])
    return photo, masks


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PidPlan:
    """Everything random about one pid except the pixels (cheap to draw for all pids)."""

    index: int
    """0-based pid index; the pid string is ``id_{index + 1:08d}``."""
    pid: str
    gender: str
    cloth_type: str
    person: Person
    outfit: Outfit
    poses: tuple[str, ...]
    """``NN_K_view`` poses, in row order (3-6 of them)."""
    caption: str


def plan_pid(seed: int, index: int) -> PidPlan:
    """Draw pid ``index``'s person, outfit and views from ``default_rng([seed, index, 0])``."""
    rng = np.random.default_rng([seed, index, 0])
    gender = "WOMEN" if rng.random() < WOMEN_SHARE else "MEN"
    cloth_type = sample_cloth_type(rng, gender)
    person = random_person(rng, gender)
    outfit = make_outfit(rng, cloth_type, gender)
    # Group 01: front always, plus 2-4 of side/back/full/additional (3-5 rows).
    extra = ["side", "back", "full", "additional"]
    n_extra = int(rng.integers(2, 5))
    chosen = sorted(rng.choice(len(extra), size=n_extra, replace=False))
    views = [(1, "front")] + [(1, extra[i]) for i in chosen]
    if rng.random() < 0.10 and len(views) < 6:
        views.append((1, "flat"))
    if rng.random() < 0.15 and len(views) < 6:  # a second shoot of the same outfit
        views.append((2, "front"))
        if len(views) < 6 and rng.random() < 0.5:
            views.append((2, "side" if rng.random() < 0.5 else "back"))
    views.sort(key=lambda gv: (gv[0], VIEW_CODE[gv[1]]))
    poses = tuple(f"{g:02d}_{VIEW_CODE[v]}_{v}" for g, v in views)
    return PidPlan(index=index, pid=f"id_{index + 1:08d}", gender=gender, cloth_type=cloth_type,
                   person=person, outfit=outfit, poses=poses, caption=caption_for(person, outfit))


def overlay(photo: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo (H, W, 3) uint8 with the mask (H, W) bool region tinted red at 50%."""
    out = photo.copy()
    out[mask] = ((photo[mask].astype(np.uint16) + np.array([255, 0, 0], dtype=np.uint16)) // 2
                 ).astype(np.uint8)
    return out


def render_pid(plan: PidPlan, image_size: int, seed: int) -> list[dict]:
    """The rows of one pid (schema column order), images as PIL images."""
    rng = np.random.default_rng([seed, plan.index, 1])
    rows = []
    for pose in plan.poses:
        group, _, view = pose.split("_")
        photo, masks = render_view(plan.person, plan.outfit, view, image_size, rng,
                                   photo_group=int(group))
        mask = masks[plan.outfit.item]
        rows.append({
            "images": Image.fromarray(photo, "RGB"),
            "gender": plan.gender,
            "pose": pose,
            "cloth_type": plan.cloth_type,
            "pid": plan.pid,
            "caption": plan.caption,
            "mask": Image.fromarray(mask.astype(np.uint8) * 255, "L"),
            "mask_overlay": Image.fromarray(overlay(photo, mask), "RGB"),
        })
    return rows


def synthetic_rows(num_pids: int, image_size: int = 256, seed: int = 0) -> Iterator[dict]:
    """Rows of ``num_pids`` pids in pid order; ``images``/``mask_overlay`` are RGB PIL images,
    ``mask`` an ``L`` image (0 or 255), the rest strings. Deterministic in (seed, pid index)."""
    if num_pids < 0:
        raise ValueError(f"num_pids={num_pids}: must be >= 0")
    for i in range(num_pids):
        yield from render_pid(plan_pid(seed, i), image_size, seed)


# --------------------------------------------------------------------------------------------
# Parquet in the hub layout
# --------------------------------------------------------------------------------------------


def encode_png(img: Image.Image) -> bytes:
    """Lossless, deterministic PNG bytes. Level 1: ~3x faster than the default 6 for ~10% more
    bytes on these images."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _image_cell(value: Any, column: str) -> dict | None:
    """An image cell as the hub stores it: ``{"bytes": ..., "path": ...}`` (or None).

    Passing ready dicts keeps ``datasets`` from decoding or re-encoding anything, so a test can
    plant undecodable bytes as they would arrive from a damaged hub shard.
    """
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return {"bytes": encode_png(value), "path": None}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    raise TypeError(f"column {column!r}: expected a PIL image, bytes, a {{bytes, path}} dict or "
                    f"None, got {type(value).__name__}")


def _cells(row: dict) -> dict:
    """A row with its image fields as ``{bytes, path}`` cells, in schema column order."""
    missing = [c for c in COLUMNS if c not in row]
    unknown = [c for c in row if c not in COLUMNS]
    if missing or unknown:
        raise KeyError(f"row has missing columns {missing} and unknown columns {unknown}; "
                       f"the schema is {list(COLUMNS)}")
    return {c: _image_cell(row[c], c) if c in IMAGE_COLUMNS else row[c] for c in COLUMNS}


def hub_features():
    """The hub dataset's ``datasets.Features``: Image() for image columns, strings otherwise."""
    from datasets import Features, Value
    from datasets import Image as HFImage

    return Features({c: HFImage() if c in IMAGE_COLUMNS else Value("string") for c in COLUMNS})


def _write_shard(rows: list[dict], path: Path) -> None:
    """One parquet shard, atomically (temp file in the same folder, then rename)."""
    from datasets import Dataset

    # Image() features store {bytes, path} dicts as given, without decoding them (checked with
    # datasets 5.2): truncated bytes are written as they are, like a damaged hub shard.
    ds = Dataset.from_list(rows, features=hub_features())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        # Row groups of 100 rows, as datasets writes image datasets for the hub: readers that
        # stream by row group (Ray Data) then hold ~2 MB, not a whole shard.
        ds.to_parquet(str(tmp), batch_size=_ROW_GROUP_ROWS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_ROW_GROUP_ROWS = 100


def shard_names(n: int) -> list[str]:
    """``train-0000k-of-0000n.parquet`` for k < n (the hub adds a hash suffix; readers glob)."""
    return [f"train-{k:05d}-of-{n:05d}.parquet" for k in range(n)]


def write_dataset(folder: str | Path, num_pids: int, image_size: int = 256, seed: int = 0,
                  num_shards: int = 4, extra_rows: list[dict] | None = None, *,
                  progress: bool = False) -> list[Path]:
    """Write ``folder/data/train-0000k-of-0000n.parquet`` in the hub layout and return the paths.

    Rows are split into ``n = min(num_shards, rows)`` contiguous shards of near-equal size (a
    pid may straddle two shards, as nothing on the hub promises otherwise); ``extra_rows``
    (image fields as PIL images, bytes, ``{"bytes", "path"}`` dicts or None) go at the end of the
    last shard. Shards are rendered one at a time, so memory holds one shard's rows.
    ``progress`` shows a tqdm bar over pids.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards}: must be >= 1")
    extra = [_cells(r) for r in (extra_rows or [])]
    plans = [plan_pid(seed, i) for i in range(num_pids)]
    n_rows = sum(len(p.poses) for p in plans)
    total = n_rows + len(extra)
    if total == 0:
        raise ValueError("nothing to write: num_pids=0 and no extra_rows")
    n = max(1, min(num_shards, total))
    names = shard_names(n)
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in data.glob("*.parquet") if p.name not in names)
    if stale:
        raise FileExistsError(f"{data} already holds other shards {stale}: they would be read "
                              "with the new ones; remove them or write to a new folder")
    sizes = [len(a) for a in np.array_split(np.arange(n_rows), n)]

    from datasets.utils import (are_progress_bars_disabled, disable_progress_bars,
                                enable_progress_bars)
    from tqdm import tqdm

    bar = tqdm(total=num_pids, desc="synthetic pids", unit="pid", disable=not progress)

    def rows() -> Iterator[dict]:
        for plan in plans:
            yield from (_cells(r) for r in render_pid(plan, image_size, seed))
            bar.update(1)

    it = rows()
    paths = []
    quiet = not are_progress_bars_disabled()
    if quiet:  # datasets' per-shard "Creating parquet" bars would interleave with ours
        disable_progress_bars()
    try:
        for k, name in enumerate(names):
            shard = list(itertools.islice(it, sizes[k]))
            if k == n - 1:
                shard += extra
            path = data / name
            _write_shard(shard, path)
            paths.append(path)
        # Exhausting the generator also ticks the bar for the last pid.
        if next(it, None) is not None:
            raise RuntimeError("internal error: rendered more rows than planned")
    finally:
        bar.close()
        if quiet:
            enable_progress_bars()
    return paths


def is_dataset(folder: Path) -> bool:
    """A finished set: ``data/*.parquet`` present."""
    return any((Path(folder) / "data").glob("*.parquet"))


def ensure_synthetic_dataset(cache_root: str | Path, num_pids: int, image_size: int, seed: int,
                             *, progress: bool = False) -> Path:
    """Build the synthetic set once under ``cache_root`` and return its folder (with ``data/``).

    Through :func:`catvton.artifacts.build_once`: written into a temporary sibling folder and
    renamed into place under a lock, so a crash never leaves a half dataset and concurrent
    callers build it once.
    """
    final = synthetic_dir(cache_root, num_pids, image_size, seed)
    return build_once(final, lambda tmp: write_dataset(tmp, num_pids, image_size, seed, progress=progress),
                      is_dataset, log=lambda _: None, what="synthetic dataset")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def summarize(paths: Sequence[Path]) -> dict[str, Counter]:
    """Counts read back from written shards: rows per group, pids per group, rows per view and
    gender."""
    import pyarrow.parquet as pq

    table = pq.read_table([str(p) for p in paths], columns=["gender", "pose", "cloth_type", "pid"])
    rows = table.to_pylist()
    out: dict[str, Counter] = {"rows_per_group": Counter(), "pids_per_group": Counter(),
                               "rows_per_view": Counter(), "rows_per_gender": Counter(),
                               "pids_per_type": Counter()}
    seen: set[str] = set()
    for r in rows:
        group = CLOTH_TYPE_GROUP.get(r["cloth_type"], "unknown")
        pose = parse_pose(r["pose"])
        out["rows_per_group"][group] += 1
        out["rows_per_view"][pose.view if pose else "unparsed"] += 1
        out["rows_per_gender"][r["gender"]] += 1
        if r["pid"] not in seen:
            seen.add(r["pid"])
            out["pids_per_group"][group] += 1
            out["pids_per_type"][r["cloth_type"]] += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m catvton.offline.synthetic --out DIR [--pids N] [--size S] [--seed K]``."""
    parser = argparse.ArgumentParser(
        prog="python -m catvton.offline.synthetic",
        description="Write procedural DeepFashion-with-masks rows (same columns, poses, cloth "
                    "types and parquet layout as the hub dataset) to OUT/data/*.parquet.")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to write; the shards go to OUT/data/")
    parser.add_argument("--pids", type=int, default=480,
                        help="items to draw, each in 3-6 views (default 480: ~2,100 rows)")
    parser.add_argument("--size", type=int, default=256,
                        help="side of the square photos in pixels (default 256; the hub's are "
                             "reported as 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--shards", type=int, default=4, help="parquet shards (default 4, as on "
                                                               "the hub)")
    args = parser.parse_args(argv)
    errors = []
    if args.pids < 1:
        errors.append(f"--pids {args.pids}: at least 1")
    if args.size < 32:
        errors.append(f"--size {args.size}: at least 32")
    if args.shards < 1:
        errors.append(f"--shards {args.shards}: at least 1")
    if errors:
        parser.error("; ".join(errors))
    paths = write_dataset(args.out, args.pids, args.size, args.seed, args.shards, progress=True)
    counts = summarize(paths)
    n_rows = sum(counts["rows_per_group"].values())
    n_pids = sum(counts["pids_per_group"].values())
    print(f"wrote {n_rows} rows of {n_pids} pids ({args.size}x{args.size}, seed {args.seed}) to "
          f"{len(paths)} shards:")
    for p in paths:
        print(f"  {p}  ({p.stat().st_size / 1e6:.1f} MB)")
    for key in ("pids_per_group", "rows_per_group", "rows_per_gender", "rows_per_view",
                "pids_per_type"):
        print(f"{key}: " + ", ".join(f"{k} {v}" for k, v in counts[key].most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
