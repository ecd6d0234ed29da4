"""What the masks mark: where a row's mask lies on the person, and what that says per garment group.

The garment cut-out, the general mask and the auto-mask check all assume that a row's ``mask``
marks *the one garment* of its ``cloth_type``. If the dataset's masks mark all clothing, or the
whole person, a lower-body item's mask covers the torso too and the garment half of a training
canvas shows much more than the garment: the LoRA learns nothing useful, silently. This module
measures it, per row, and judges it per group (``upper``/``lower``/``full``).

**The person's silhouette is estimated**, because neither the dataset nor the synthetic rows
carry one (their columns: the photo, the garment ``mask`` and ``mask_overlay``, which is the photo
with the mask tinted). The estimate, on a copy at most :data:`MEASURE_SIDE` pixels tall: the
background colour is the median of the photo's border (top row, left and right columns: studio
photos stand the person on a plain background, whose feet or legs may touch the bottom); a
pixel differs from it by more than :data:`BG_TOLERANCE` on some channel -> person; specks are
opened away, blobs smaller than 5% of the largest are dropped, and the row's mask is added (a
white shirt on a white background is still the person). A row is not measured when the border is
not plain (under 60% of it within the tolerance) or the estimate covers under 3% or over 90% of
the photo; flat and zoom views (no whole person) are not measured either.

Per measured row (:class:`Placement`), heights are fractions of the person's height, from the
top of the silhouette (0) to its bottom (1; the image's bottom when the legs are cut off); the
body's upper and lower halves are the silhouette above and below its mid-height.

**Legs are judged only where the whole person is in the photo.** On a full-length photo the lower
half of the silhouette is the legs, and an upper-body mask that covers much of it is an
all-clothing mask. On a photo that cuts the person off at the bottom (from the head to the waist or
to the thighs, common for tops) the lower half is torso, or torso and thighs, and a correct top
mask covers it. A row whose silhouette touches the photo's bottom edge (:data:`BOTTOM_EDGE`) is
*cut off*: its ``lower_cover`` is not measured (-1), and the legs check of the upper group counts
it as not judged, with that reason, instead of as a pass or a fail. The other checks still use
cut-off rows: a whole-person mask covers the whole silhouette from the top of the head on any crop
(:data:`WHOLE_PERSON_TOP`: a long-sleeved top on a waist-up photo covers 85% of it too, but starts
below the head), and a lower-body mask that reaches up over the upper half covers the torso on a
waist-up or thigh-up photo as well. The rule
does not tell a thigh-up photo from a waist-up one (both reach the edge): on thigh-up photos an
all-clothing mask is only caught through the group's full-length rows, or its lower-body masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

MEASURE_SIDE = 128
"""Rows are measured on a copy at most this many pixels tall (stride sampling): ~0.3 ms a row."""
BG_TOLERANCE = 12
"""A pixel whose every channel is within this of the border colour is background."""
UNMEASURED_VIEWS = ("flat", "zoom")
"""Views that show no whole person: their masks say nothing about what is marked on one."""
BOTTOM_EDGE = 0.015
"""A silhouette that ends within this share of the photo's height from its bottom edge touches it:
the person is cut off by the frame (two pixel rows at the measuring size, so that a JPEG-blurred or
dark last row is not taken for a gap under the feet)."""
MIN_ROWS = 5
"""A group with fewer measured rows is reported but not judged."""

WHOLE_PERSON_COVER = 0.85
"""Median share of the silhouette under the mask above which a group's masks are whole-person
masks (when they also reach the head: :data:`WHOLE_PERSON_TOP`)."""
WHOLE_PERSON_TOP = 0.10
"""Median mask top (fraction of the person's height) at or above which masks reach the head: a
whole-person mask starts at 0, a correct top below the neck (about 0.15 full-length, 0.25 and more
waist-up, where a long-sleeved top can cover 85% of the silhouette)."""
TORSO_COVER = 0.40
"""Median share of the upper body under *lower-body* masks above which they cover the torso."""
LEGS_COVER = 0.40
"""Median share of the lower body under *upper-body* masks above which they cover the legs, over
the rows that show the whole person (not cut off at the bottom: see the module docstring)."""

FIELDS = ("mask_top", "mask_bottom", "upper_cover", "lower_cover", "person_cover", "mask_outside")


@dataclass
class Placement:
    """Where one row's mask lies on its person (see the module docstring for the silhouette)."""

    mask_top: float
    """Top of the mask, as a fraction of the person's height (0 = top of the head)."""
    mask_bottom: float
    """Bottom of the mask, as a fraction of the person's height (1 = the soles)."""
    upper_cover: float
    """Share of the silhouette's upper half under the mask (head, arms and torso above mid-height)."""
    lower_cover: float
    """Share of the silhouette's lower half (the legs) under the mask; -1 (not measured) when the
    silhouette touches the photo's bottom edge: a person cut off by the frame, whose lower half
    may be torso (see the module docstring)."""
    person_cover: float
    """Share of the whole silhouette under the mask."""
    mask_outside: float
    """Share of the mask outside the estimated silhouette before the mask is added to it: how
    much the estimate missed (a garment the colour of the background)."""


def _small(a: np.ndarray) -> np.ndarray:
    step = max(1, -(-a.shape[0] // MEASURE_SIDE))
    return a[::step, ::step]


def estimate_silhouette(photo: np.ndarray) -> np.ndarray | None:
    """The person's pixels of an ``(H, W, 3)`` uint8 photo as an (H, W) bool array, or None when
    the background is not plain enough to tell (see the module docstring)."""
    img = np.ascontiguousarray(photo)
    border = np.concatenate([img[0], img[:, 0], img[:, -1]])[:, None]  # (W + H + H, 1, 3)
    bg = np.median(border, axis=0)[0]
    lo = np.clip(bg - BG_TOLERANCE, 0, 255).astype(np.uint8)
    hi = np.clip(bg + BG_TOLERANCE, 0, 255).astype(np.uint8)
    if (cv2.inRange(border, lo, hi) > 0).mean() < 0.6:  # inRange: 255 where every channel is in [lo, hi]
        return None
    person = (cv2.inRange(img, lo, hi) == 0).astype(np.uint8)
    person = cv2.morphologyEx(person, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(person, connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, dtype=bool)
    keep[1:] = areas >= 0.05 * areas.max()
    return keep[labels]


def _person(photo: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(the silhouette with the mask added, the share of the mask the estimate missed), on the
    measuring-size copies; None when the silhouette cannot be estimated."""
    est = estimate_silhouette(photo)
    if est is None or not mask.any() or not 0.03 <= est.mean() <= 0.9:
        return None
    return est | mask, float((mask & ~est).sum() / mask.sum())


def measure(photo: np.ndarray, mask: np.ndarray) -> Placement | None:
    """Where ``mask`` ((H, W) bool) lies on the person of ``photo`` ((H, W, 3) uint8), measured on
    a copy at most :data:`MEASURE_SIDE` tall; None when the silhouette cannot be estimated."""
    photo, mask = _small(photo), _small(mask)
    found = _person(photo, mask)
    if found is None:
        return None
    person, outside = found
    ys = np.flatnonzero(person.any(axis=1))
    top, bottom = int(ys[0]), int(ys[-1]) + 1
    height = bottom - top
    mys = np.flatnonzero(mask.any(axis=1))
    upper = person & (np.arange(person.shape[0])[:, None] < top + height / 2)
    lower = person & ~upper
    on = mask & person

    def share(part: np.ndarray) -> float:
        n = part.sum()
        return float((on & part).sum() / n) if n else 0.0

    cut_off = bottom > (1 - BOTTOM_EDGE) * person.shape[0]  # the silhouette touches the photo's bottom edge
    return Placement(mask_top=(int(mys[0]) - top) / height, mask_bottom=(int(mys[-1]) + 1 - top) / height,
                     upper_cover=share(upper), lower_cover=-1.0 if cut_off else share(lower),
                     person_cover=share(person), mask_outside=outside)


def picture(photo: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """What :func:`measure` saw, ``(h, w, 3)`` uint8 at the measuring size: the estimated
    silhouette grey, the mask red over it, the silhouette's mid-height (the line between the body
    halves) blue; None when the silhouette cannot be estimated."""
    photo, mask = _small(photo), _small(mask)
    found = _person(photo, mask)
    if found is None:
        return None
    person = found[0]
    out = np.zeros(photo.shape, np.uint8)
    out[person] = (150, 150, 150)
    out[mask] = (220, 40, 40)
    ys = np.flatnonzero(person.any(axis=1))
    out[(int(ys[0]) + int(ys[-1]) + 1) // 2, :] = (60, 90, 230)
    return out


def _median(values: list[float]) -> float:
    return round(float(np.median(values)), 3)


def summarize_groups(rows: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per group: rows measured, of those how many show the whole person (``full_length``: the legs
    measured) and how many are cut off at the bottom, and the medians (and p10/p90 of the extent) of
    the placement fields over valid rows that carry them (``mask_top >= 0``; ``lower_cover`` over
    the full-length rows only, None when there are none)."""
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        valid = [r for r in rows if r["valid"] and r["group"] == g and r.get("view") not in UNMEASURED_VIEWS]
        done = [r for r in valid if r.get("mask_top", -1.0) >= 0]
        legs = [r["lower_cover"] for r in done if r["lower_cover"] >= 0]
        s: dict[str, Any] = {"rows": len(valid), "measured": len(done), "full_length": len(legs),
                             "cut_off": len(done) - len(legs)}
        if done:
            for f in FIELDS:
                s[f] = _median([r[f] for r in done]) if f != "lower_cover" else (_median(legs) if legs else None)
            for f in ("mask_top", "mask_bottom"):
                p10, p90 = np.percentile([r[f] for r in done], [10, 90])
                s[f"{f}_p10"], s[f"{f}_p90"] = round(float(p10), 3), round(float(p90), 3)
        out[g] = s
    return out


def not_judged(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Per group whose legs check left rows out (only the upper group has one): why, with the
    counts: the rows cut off by the photo's bottom edge, and whether enough full-length rows were
    left to run the check."""
    out = {}
    for g, s in summary.items():
        if g != "upper" or not s.get("cut_off"):
            continue
        out[g] = (f"legs not judged on {s['cut_off']} of {s['measured']} measured rows: the person touches the "
                  "photo's bottom edge (cut off by the frame, e.g. waist-up or thigh-up), so the lower half of "
                  "the silhouette need not be legs")
        if s["full_length"] < MIN_ROWS:
            out[g] += (f"; {s['full_length']} rows show the whole person, at least {MIN_ROWS} are needed: "
                       "the legs check was not run")
    return out


def judge(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Per group: ``(kind, why)``, kind one of ``garment`` (looks like the one garment),
    ``whole-person``, ``all-clothing`` or ``unknown`` (too few rows measured). The upper group's legs
    check runs on its full-length rows only (:func:`not_judged` says what it left out)."""
    out: dict[str, tuple[str, str]] = {}
    for g, s in summary.items():
        if s["measured"] < MIN_ROWS:
            others = " (on the others the silhouette could not be estimated)" if s["measured"] < s["rows"] else ""
            out[g] = ("unknown", f"only {s['measured']} of {s['rows']} rows measured{others}; "
                                 f"at least {MIN_ROWS} are needed to judge")
            continue
        extent = f"from {s['mask_top']:.2f} to {s['mask_bottom']:.2f} of the person's height"
        if s["lower_cover"] is None:
            on_legs = "the lower body not measured (every row is cut off at the bottom)"
        else:
            on_legs = f"{s['lower_cover']:.0%} of the lower body"
            on_legs += f" (median over the {s['full_length']} full-length rows)" if s["cut_off"] else ""
        legs = s["lower_cover"] is not None and s["full_length"] >= MIN_ROWS
        if s["person_cover"] >= WHOLE_PERSON_COVER and s["mask_top"] <= WHOLE_PERSON_TOP:
            out[g] = ("whole-person", f"the median mask covers {s['person_cover']:.0%} of the person's silhouette, "
                                      f"head included, {extent}")
        elif g == "lower" and s["upper_cover"] >= TORSO_COVER:
            out[g] = ("all-clothing", f"lower-body masks cover the torso: {s['upper_cover']:.0%} of the upper body "
                                      f"(median), {extent}")
        elif g == "upper" and legs and s["lower_cover"] >= LEGS_COVER:
            median = "" if s["cut_off"] else " (median)"  # else on_legs says over which rows
            out[g] = ("all-clothing", f"upper-body masks cover the legs: {on_legs}{median}, {extent}")
        else:
            out[g] = ("garment", f"median mask {extent}, {s['upper_cover']:.0%} of the upper body and {on_legs}")
    for g, why in not_judged(summary).items():
        if out[g][0] == "garment":  # the check that did not run could only have changed this verdict
            out[g] = (out[g][0], f"{out[g][1]}; {why}")
    return out


def suspicion(row: Mapping[str, Any], kind: str) -> float:
    """How strongly one measured row shows ``kind`` (to pick the rows of a sample grid; a cut-off
    row, whose legs are not measured, shows no all-clothing upper mask)."""
    if kind == "whole-person":
        return row["person_cover"]
    return row["upper_cover"] if row["group"] == "lower" else row["lower_cover"]


def markdown(summary: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, tuple[str, str]]) -> list[str]:
    """The report's "What the masks mark" section, as markdown lines."""
    lines = ["## What the masks mark", "",
             "Where each row's mask lies on its person, per garment group (medians over the measured rows; "
             "heights as fractions of the person's height, 0 = top of the head, 1 = the soles).", "",
             "| group | measured / rows | cut off at the bottom | mask top (p10-p90) | mask bottom (p10-p90) "
             "| upper body covered | lower body covered (full-length rows) | person covered "
             "| mask outside silhouette | looks like |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for g, s in summary.items():
        if not s["measured"]:
            lines.append(f"| {g} | 0 / {s['rows']} | | | | | | | | {kinds[g][0]} |")
            continue
        lower = "not measured" if s["lower_cover"] is None else f"{s['lower_cover']:.2f}"
        lines.append(
            f"| {g} | {s['measured']} / {s['rows']} | {s['cut_off']} "
            f"| {s['mask_top']:.2f} ({s['mask_top_p10']:.2f}-{s['mask_top_p90']:.2f}) "
            f"| {s['mask_bottom']:.2f} ({s['mask_bottom_p10']:.2f}-{s['mask_bottom_p90']:.2f}) | {s['upper_cover']:.2f} "
            f"| {lower} | {s['person_cover']:.2f} | {s['mask_outside']:.2f} | {kinds[g][0]} |")
    lines += [""] + [f"- **{g}**: {kind} — {why}" for g, (kind, why) in kinds.items()]
    lines += ["", "Garment masks differ by group: upper-body masks end near mid-height, lower-body masks start "
              "there; the same extent in every group means the masks do not follow the garment. "
              f"A group is judged *whole-person* when its median mask covers {WHOLE_PERSON_COVER:.0%} of the "
              f"silhouette or more and starts at the head (median top {WHOLE_PERSON_TOP:.2f} or less), "
              f"*all-clothing* when lower-body masks cover {TORSO_COVER:.0%} of the upper "
              f"body or upper-body masks {LEGS_COVER:.0%} of the lower body (on a dress all the clothing is the "
              "garment: full-body masks can only be told from whole-person ones).", "",
              "Legs are judged only where they are in the photo: a row whose silhouette touches the photo's "
              "bottom edge (*cut off at the bottom*: waist-up or thigh-up, where the lower half of the "
              "silhouette is torso) has no lower-body share, and the upper group's legs check counts it as not "
              f"judged; it runs on the full-length rows, at least {MIN_ROWS} of them.", "",
              "The silhouette is an estimate (the data has none): the pixels that differ from the photo's "
              f"border colour by more than {BG_TOLERANCE} on some channel, plus the mask, on a copy at most "
              f"{MEASURE_SIDE} pixels tall; rows with a busy background, and flat and zoom views, are not "
              "measured. *Mask outside silhouette* is how much of the mask the estimate missed before the "
              "mask was added to it: near 0 means the estimate found the person.", ""]
    return lines
