"""Held-out outfits with their true photos: any test person in any test top and test bottom.

The pairs of the dataset show one garment changed at a time (the item of a pid, on another view of
the same person). An outfit request changes two: a person, a top and a bottom from three different
held-out pids. The synthetic world can draw that person wearing exactly that top and bottom, so an
outfit try-on has a ground truth here that no real dataset has. :func:`outfit_triples` gives, per
triple (arrays: photos ``(S, S, 3)`` uint8, masks ``(S, S)`` bool, ``S`` the synthetic photo size):

- ``person``: a test-split pid whose outfit is a top and a bottom, in one of the views its test
  pairs show a person in (:func:`catvton.data.pairs.make_pairs`), pixel for pixel the dataset's row;
  ``upper_mask`` / ``lower_mask``: the visible pixels of its own top and bottom (the dataset's
  row marks only the item; the renderer knows both);
- ``top`` / ``top_mask``: the garment view of another test pid whose item is a top, worn, with its
  row mask; ``bottom`` / ``bottom_mask`` likewise from a third pid whose item is a bottom. These
  are what a model is given (``Piece(garment=top, garment_mask=top_mask)``): photos of someone
  wearing the garment, cut out as training cuts them (:func:`catvton.data.canvas.garment_cutout`),
  not product shots. Why: that is the case the model was trained on (every pair's garment is cut
  from a worn view), every pid has one, and only ~10% have a ``flat`` product shot;
- ``truth``: the person, same view and same jitter, wearing the new top and the new bottom;
  ``truth_upper``: the new top with their own bottom; ``truth_lower``: their own top with the new
  bottom (the truths of the single-garment passes); the masks of every slot of each.

Every render of the person replays the dataset's random stream up to that view
(:func:`catvton.offline.synthetic.render_pid` draws a pid's views from one stream) and draws it
from the same state, so the four photos differ only where the garments differ: outside the union of
both outfits' garment masks, grown by the renderer's one-pixel outline (:data:`OUTLINE_PX`), every
pixel is equal (``tests/test_outfit_truth.py`` checks it).

Deterministic in ``(data.seed, n)``; triple ``i`` does not depend on ``n`` (``outfit_triples(8)``
is the first 8 of ``outfit_triples(24)``). The person's pid, the top's and the bottom's are three
different pids; each top and bottom is given once until its pool is used up (~60 tops, ~48 bottoms
in the tiny preset's test split), so a swap between two triples gives other garments. Every garment
is visible in every photo of a triple (the dataset's ``min_mask_fraction``): a person whose coat
hides their shorts is passed over, and so is a new top that would hide the new bottom. People are
not matched by gender (garments are drawn on the wearer's body, so a blouse on a man is still a
well-formed picture).

    python -c "from catvton.config import load_config; from catvton.offline.outfits import outfit_triples; \\
               print(outfit_triples(4, load_config('configs/tiny.yaml').data)[0].pids)"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from catvton.config import DataConfig
from catvton.data.pairs import make_pairs, split_of
from catvton.offline.synthetic import Outfit, PidPlan, plan_pid, render_view
from catvton.schema import parse_pose

OUTLINE_PX = 1
"""The renderer darkens a pixel on each side of a boundary between two labels, so where the garment
boundary moves, a one-pixel ring of skin or background just outside both garments changes too."""

_STREAM = 15
"""Which triples: the pools are shuffled by ``default_rng([data.seed, _STREAM])``, and triple ``i``'s
person view is drawn from ``default_rng([data.seed, i, _STREAM])`` (15: the issue that asked for them)."""

SLOTS = ("upper", "lower")
TRUTHS = ("truth", "truth_upper", "truth_lower")
"""The true photos of a triple: the whole outfit, the top alone, the bottom alone."""


@dataclass(frozen=True)
class OutfitTriple:
    """One held-out outfit: who, what they are given, and the true photos (see the module docstring)."""

    person_pid: str
    top_pid: str
    bottom_pid: str
    person_pose: str
    """The person's view (a pose of the dataset's rows, e.g. ``01_2_side``)."""
    top_pose: str
    bottom_pose: str
    person: np.ndarray
    masks: dict[str, np.ndarray]
    """The person's own garments: ``{"upper": (S, S) bool, "lower": ...}``."""
    top: np.ndarray
    top_mask: np.ndarray
    bottom: np.ndarray
    bottom_mask: np.ndarray
    truth: np.ndarray
    truth_upper: np.ndarray
    truth_lower: np.ndarray
    truth_masks: dict[str, dict[str, np.ndarray]]
    """``{truth name: {"upper": mask, "lower": mask}}`` for each of :data:`TRUTHS`."""
    outfits: dict[str, Outfit]
    """The garments drawn: ``own`` and each of :data:`TRUTHS`."""

    @property
    def pids(self) -> tuple[str, str, str]:
        return self.person_pid, self.top_pid, self.bottom_pid


def _render_pose(plan: PidPlan, pose: str, size: int, seed: int,
                 outfits: list[Outfit]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The row ``pose`` of ``plan`` as :func:`~catvton.offline.synthetic.render_pid` draws it, once
    per outfit in ``outfits``: the pid's stream is replayed up to that pose, and each outfit is
    drawn from the same state (the renderer's draws do not depend on the outfit)."""
    rng = np.random.default_rng([seed, plan.index, 1])
    for earlier in plan.poses[:plan.poses.index(pose)]:
        group, _, view = earlier.split("_")
        render_view(plan.person, plan.outfit, view, size, rng, photo_group=int(group))
    state = rng.bit_generator.state
    group, _, view = pose.split("_")
    out = []
    for outfit in outfits:
        r = np.random.default_rng()
        r.bit_generator.state = state
        out.append(render_view(plan.person, outfit, view, size, r, photo_group=int(group)))
    return out


def _pair_poses(plan: PidPlan, data: DataConfig) -> tuple[str, list[str]]:
    """(the garment pose, the person poses) of the pid's pairs, by the pairing rule itself."""
    rows = []
    for pose in plan.poses:
        p = parse_pose(pose)
        assert p is not None  # plan_pid writes NN_K_view poses
        rows.append({"pid": plan.pid, "pose": pose, "cloth_type": plan.cloth_type, "valid": True,
                     "group": plan.outfit.item, "view": p.view})
    pairs, _ = make_pairs(rows, data)
    if not pairs:
        raise ValueError(f"{plan.pid} has no try-on pair (poses {plan.poses})")
    return pairs[0].garment_pose, [p.person_pose for p in pairs]


def outfit_pools(data: DataConfig, split: str = "test") -> dict[str, list[PidPlan]]:
    """The ``split`` pids of the synthetic set by role, in pid order: ``person`` (item upper or
    lower: they wear a top and a bottom), ``top`` (item upper), ``bottom`` (item lower)."""
    plans = [plan_pid(data.seed, i) for i in range(data.synthetic_pids)]
    held = [p for p in plans if split_of(p.pid, data) == split]
    return {"person": [p for p in held if p.outfit.item in SLOTS],
            "top": [p for p in held if p.outfit.item == "upper"],
            "bottom": [p for p in held if p.outfit.item == "lower"]}


class _Cursor:
    """Walks a pool in a fixed shuffled order, each pid once until the pool is used up (then again),
    so that the triples' garments differ and a swap between two triples gives other garments."""

    def __init__(self, pool: list[PidPlan], order: np.ndarray):
        self.pool, self.order, self.at = pool, order, 0

    def next(self, avoid: str) -> PidPlan:
        """The next pid that is not ``avoid`` (the person's own)."""
        while True:
            plan = self.pool[self.order[self.at % len(self.pool)]]
            self.at += 1
            if plan.pid != avoid:
                return plan


def outfit_triples(n: int, data: DataConfig, split: str = "test", *, allow_fewer: bool = False) -> list[OutfitTriple]:
    """``n`` held-out outfits of the synthetic set ``data`` describes (``synthetic_pids``,
    ``synthetic_image_size``, ``seed``, the split fractions, ``garment_views``); see the module
    docstring. ValueError when ``split`` has fewer than ``n`` people who wear a top and a bottom.

    Every garment is visible in every photo of a triple (its mask covers at least
    ``data.min_mask_fraction``, the dataset's own bar for a mask that is not empty): a person whose
    coat hides their shorts is passed over, and so is a new top that would hide the new bottom.
    ``allow_fewer``: a small set gives as many as it has (maybe none) instead of the ValueError."""
    pools = outfit_pools(data, split)
    if allow_fewer and (len(pools["top"]) < 2 or len(pools["bottom"]) < 2):
        return []
    if n < 0 or (n > len(pools["person"]) and not allow_fewer):
        raise ValueError(f"n={n}: the {split} split of {data.synthetic_pids} synthetic pids has "
                         f"{len(pools['person'])} people in a top and a bottom; ask for at most that many "
                         "or raise data.synthetic_pids")
    if len(pools["top"]) < 2 or len(pools["bottom"]) < 2:
        raise ValueError(f"the {split} split has {len(pools['top'])} tops and {len(pools['bottom'])} bottoms: "
                         "an outfit needs another pid's, at least 2 of each")
    base = np.random.default_rng([data.seed, _STREAM])
    order = {role: base.permutation(len(pool)) for role, pool in pools.items()}
    tops, bottoms = _Cursor(pools["top"], order["top"]), _Cursor(pools["bottom"], order["bottom"])
    out: list[OutfitTriple] = []
    for k in order["person"]:
        if len(out) == n:
            break
        triple = _triple(tops, bottoms, len(out), pools["person"][k], data)
        if triple is not None:
            out.append(triple)
    if len(out) < n and not allow_fewer:
        raise ValueError(f"n={n}: only {len(out)} people of the {split} split can be dressed so that every "
                         f"garment stays visible (data.min_mask_fraction); raise data.synthetic_pids")
    return out


def _visible(masks: dict[str, np.ndarray], data: DataConfig) -> bool:
    return all(masks[s].mean() >= data.min_mask_fraction for s in SLOTS)


def _triple(tops: _Cursor, bottoms: _Cursor, i: int, person: PidPlan, data: DataConfig) -> OutfitTriple | None:
    """Triple ``i`` for ``person``, or None when their own top or bottom is hidden (a coat over
    shorts): there is no region to dress. A top and bottom that would hide each other in the true
    photo are passed over for the next ones (the region to score would show no new garment)."""
    size, seed = data.synthetic_image_size, data.seed
    _, person_poses = _pair_poses(person, data)
    rng = np.random.default_rng([data.seed, i, _STREAM])
    person_pose = person_poses[int(rng.integers(len(person_poses)))]
    own = person.outfit
    assert own.upper is not None and own.lower is not None  # the person pool wears both
    (photo, masks), = _render_pose(person, person_pose, size, seed, [own])
    if not _visible(masks, data):
        return None
    for _ in range(min(len(tops.pool), len(bottoms.pool))):
        top, bottom = tops.next(avoid=person.pid), bottoms.next(avoid=person.pid)
        new_top, new_bottom = top.outfit.upper, bottom.outfit.lower
        assert new_top is not None and new_bottom is not None
        outfits = {"own": own,
                   "truth": Outfit(item=own.item, upper=new_top, lower=new_bottom),
                   "truth_upper": Outfit(item=own.item, upper=new_top, lower=own.lower),
                   "truth_lower": Outfit(item=own.item, upper=own.upper, lower=new_bottom)}
        renders = dict(zip(TRUTHS, _render_pose(person, person_pose, size, seed, [outfits[k] for k in TRUTHS])))
        if not all(_visible(renders[k][1], data) for k in TRUTHS):
            continue
        top_pose, _ = _pair_poses(top, data)
        bottom_pose, _ = _pair_poses(bottom, data)
        (top_photo, top_masks), = _render_pose(top, top_pose, size, seed, [top.outfit])
        (bottom_photo, bottom_masks), = _render_pose(bottom, bottom_pose, size, seed, [bottom.outfit])
        return OutfitTriple(
            person_pid=person.pid, top_pid=top.pid, bottom_pid=bottom.pid, person_pose=person_pose,
            top_pose=top_pose, bottom_pose=bottom_pose, person=photo, masks=masks,
            top=top_photo, top_mask=top_masks["upper"], bottom=bottom_photo, bottom_mask=bottom_masks["lower"],
            truth=renders["truth"][0], truth_upper=renders["truth_upper"][0], truth_lower=renders["truth_lower"][0],
            truth_masks={k: renders[k][1] for k in TRUTHS}, outfits=outfits)
    return None


def triple_arrays(triples: list[OutfitTriple]) -> dict[str, Any]:
    """The triples stacked for :mod:`catvton.eval.outfits` (which takes arrays, not this module):
    ``person``, ``top``, ``bottom`` and each of :data:`TRUTHS` ``(N, S, S, 3)`` uint8; ``upper_mask``,
    ``lower_mask`` (the person's own), ``top_mask``, ``bottom_mask`` ``(N, S, S)`` bool;
    ``truth_masks[truth][slot]`` ``(N, S, S)`` bool (where each truth shows each garment); ``pid``,
    ``top_pid``, ``bottom_pid``: lists of str."""
    if not triples:
        raise ValueError("no triples to stack")
    out: dict[str, Any] = {k: np.stack([getattr(t, k) for t in triples])
                           for k in ("person", "top", "top_mask", "bottom", "bottom_mask") + TRUTHS}
    for slot in SLOTS:
        out[f"{slot}_mask"] = np.stack([t.masks[slot] for t in triples])
    out["truth_masks"] = {name: {slot: np.stack([t.truth_masks[name][slot] for t in triples]) for slot in SLOTS}
                          for name in TRUTHS}
    out["pid"] = [t.person_pid for t in triples]
    out["top_pid"] = [t.top_pid for t in triples]
    out["bottom_pid"] = [t.bottom_pid for t in triples]
    return out
