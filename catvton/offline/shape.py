"""Cross-type try-on cases with their true photos: a skirt for a person in trousers, and the like.

The renderer can draw any person in any garment, so a case whose garment changes type (trousers
to a skirt) has a ground truth here: the same person, view and jitter, wearing the new garment.
:func:`shape_cases` draws, per kind of :data:`SHAPE_KINDS`, cases of :class:`catvton.eval.shape.ShapeCase`
(which :mod:`catvton.eval.shape` scores; that module takes arrays, not this one):

- the person: a held-out pid's body, skin, hair and shoes, in a top and garment A, both from
  held-out pids (the people walked in a shuffled order, each once before any twice; the garments
  drawn at random); a top ends above the crotch (no coat hides the outline that is measured);
- garment B: a held-out pid's garment of the kind's given type, its cut and main colour, made solid
  (a pattern's second colour would count against the outline; keeping only the solid ones left 8
  skirts and 8 dresses in the tiny preset's test split), laid flat (``render_view(..., "flat")``,
  the product shot);
- the truth: the person, same jitter, in the top and B (for a dress: in B alone).

A case is kept only when its garment's colour is :data:`catvton.eval.shape.CASE_SEPARATION` (60)
from every pixel of the input and of the truth outside B, and the colour rule finds at least half
of B's pixels on the truth (see that module's docstring for why). Skirts and dresses go to women
only (the synthetic menswear has none, so no model has seen a man in one).

Held-out people: the cases are drawn from the plans the caller gives, so the caller decides what is
held out. Two ways that no trained model has seen:

- :func:`held_out_plans` ``(data, "test")``: the test split of the synthetic set ``data`` describes,
  chosen as the dataset chooses it (:func:`catvton.data.pairs.split_of`, per pid from the data
  seed): what ``ray_jobs/evaluate.py`` reports on;
- ``[plan_pid(data.seed, i) for i in range(data.synthetic_pids, data.synthetic_pids + n)]``: pids
  past the end of the set (pid ``i`` is the same whatever the set's size, and a set of ``N`` pids
  holds ``0..N-1`` only).

``exclude`` names pids to leave out whatever was given (e.g. the training split's): no case draws
on them. Deterministic in ``seed`` and the plans given; a kind's cases do not depend on the other
kinds asked for.

    python -c "from catvton.config import load_config; from catvton.offline.shape import held_out_plans, shape_cases; \\
               print([c.pids for c in shape_cases(held_out_plans(load_config('configs/tiny.yaml').data), per_kind=2)])"
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Collection, Iterable, Sequence

import numpy as np

from catvton.config import DataConfig
from catvton.data.masks import dilate
from catvton.data.pairs import split_of
from catvton.eval.shape import CASE_SEPARATION, ShapeCase, garment_colour_mask
from catvton.offline.outfits import OUTLINE_PX
from catvton.offline.synthetic import MEN_FORBIDDEN, Garment, Outfit, PidPlan, plan_pid, render_view

TROUSERS = ("Pants", "Denim", "Leggings")
"""The cloth types drawn as two legs down to the ankles."""


@dataclass(frozen=True)
class ShapeKind:
    """A kind of case: what the person wears below, what they are given."""

    worn: tuple[str, ...]
    """Cloth types of garment A (the person's lower garment, under a top)."""
    given: tuple[str, ...]
    """Cloth types of garment B; a full-body B replaces the top as well."""


SHAPE_KINDS: dict[str, ShapeKind] = {
    "trousers_to_skirt": ShapeKind(worn=TROUSERS, given=("Skirts",)),
    "shorts_to_trousers": ShapeKind(worn=("Shorts",), given=TROUSERS),
    "skirt_to_trousers": ShapeKind(worn=("Skirts",), given=TROUSERS),
    "top_trousers_to_dress": ShapeKind(worn=TROUSERS, given=("Dresses",)),
}

TOP_HEM_MAX = 0.53
"""The lowest hem of a kept top, in figure heights: the renderer's crotch line. Tees, shirts and
sweaters end above it; coats, blazers and long cardigans, which would hide garment A's or B's
outline, below."""
MIN_SHOWN = 0.5
"""The least share of B's truth mask the colour rule must find on the truth (a white garment loses
its darkened outline ring to the rule; a garment that loses more is not a clear outline)."""
_STREAM = 26
"""Random stream of the cases (26: the issue that asked for them)."""
_TRIES = 50
"""Draws per case before a kind gives up (most draws are kept; too few plans is the usual cause)."""


def held_out_plans(data: DataConfig, split: str = "test") -> list[PidPlan]:
    """The plans of the ``split`` pids of the synthetic set ``data`` describes, in pid order."""
    plans = (plan_pid(data.seed, i) for i in range(data.synthetic_pids))
    return [p for p in plans if split_of(p.pid, data) == split]


def _garments(plans: Sequence[PidPlan], types: Iterable[str]) -> list[tuple[PidPlan, Garment]]:
    wanted = set(types)
    return [(p, g) for p in plans for g in (p.outfit.garment(s) for s in p.outfit.slots)
            if g is not None and g.cloth_type in wanted]


def shape_cases(plans: Iterable[PidPlan], *, per_kind: int = 40, size: int = 256, seed: int = 0,
                kinds: Sequence[str] = tuple(SHAPE_KINDS), exclude: Collection[str] = (),
                view: str = "front") -> list[ShapeCase]:
    """``per_kind`` cases of each of ``kinds`` (in that order) drawn on ``plans`` less the pids in
    ``exclude``; photos ``size`` square in ``view``. See the module docstring. ValueError names the
    kind and its pools when the plans cannot give ``per_kind`` cases."""
    unknown = [k for k in kinds if k not in SHAPE_KINDS]
    if unknown:
        raise ValueError(f"unknown shape kinds {unknown}: expected some of {list(SHAPE_KINDS)}")
    given_plans = list(plans)
    usable = [p for p in given_plans if p.pid not in set(exclude)]
    out: list[ShapeCase] = []
    for kind in kinds:
        out += _kind_cases(kind, usable, per_kind, size, seed, view, dropped=len(given_plans) - len(usable))
    return out


def _kind_cases(kind: str, plans: list[PidPlan], n: int, size: int, seed: int, view: str,
                dropped: int) -> list[ShapeCase]:
    spec = SHAPE_KINDS[kind]
    women_only = bool(MEN_FORBIDDEN & {*spec.worn, *spec.given})
    people = [p for p in plans if p.gender == "WOMEN" or not women_only]
    tops = [(p, p.outfit.upper) for p in plans if p.outfit.upper is not None and p.outfit.upper.hem <= TOP_HEM_MAX]
    worn = _garments(plans, spec.worn)
    given = [(p, replace(g, pattern="solid")) for p, g in _garments(plans, spec.given)]
    pools = {"people": len(people), "tops": len(tops), "worn": len(worn), "given": len(given)}
    if min(pools.values()) == 0 and n > 0:
        raise ValueError(f"{kind}: an empty pool among {pools} of {len(plans)} plans ({dropped} excluded); "
                         "give more held-out plans (raise data.synthetic_pids, or add pids past the set's end)")
    k = list(SHAPE_KINDS).index(kind)  # by the kind's place in SHAPE_KINDS: other kinds asked change nothing
    rng = np.random.default_rng([seed, _STREAM, k])
    order = rng.permutation(len(people))
    cases: list[ShapeCase] = []
    draw = 0
    while len(cases) < n:
        if draw >= _TRIES * n:
            raise ValueError(f"{kind}: {len(cases)} of {n} cases after {draw} draws from pools {pools} of "
                             f"{len(plans)} plans ({dropped} excluded); give more held-out plans")
        person = people[order[draw % len(people)]]
        picks = [pool[rng.integers(len(pool))] for pool in (tops, worn, given)]
        case = _case(kind, person, *picks, size, np.random.SeedSequence([seed, _STREAM, k, draw]), view)
        draw += 1
        if case is not None:
            cases.append(case)
    return cases


def _case(kind: str, person: PidPlan, top: tuple[PidPlan, Garment], worn: tuple[PidPlan, Garment],
          given: tuple[PidPlan, Garment], size: int, jitter: np.random.SeedSequence, view: str) -> ShapeCase | None:
    """The case, or None when the given garment's colour is not separated (module docstring)."""
    b = given[1]
    before = Outfit(item="lower", upper=top[1], lower=worn[1])
    after = (Outfit(item="full", full=b) if b.slot == "full" else Outfit(item="lower", upper=top[1], lower=b))
    # The same seed for both: the renderer's draws do not depend on the outfit, so the two photos
    # differ only where the garments do.
    colour = np.array([b.colour])
    photo, masks = render_view(person.person, before, view, size, np.random.default_rng(jitter))
    if garment_colour_mask(photo[None], colour, CASE_SEPARATION).any():
        return None
    truth, truth_masks = render_view(person.person, after, view, size, np.random.default_rng(jitter))
    shown = truth_masks[b.slot]
    near_truth = garment_colour_mask(truth[None], colour, CASE_SEPARATION)[0]
    if (near_truth & ~shown).any() or (garment_colour_mask(truth[None], colour)[0] & shown).sum() < MIN_SHOWN * shown.sum():
        return None
    replaced = masks["lower"] | masks["upper"] if b.slot == "full" else masks["lower"]
    flat, flat_masks = render_view(given[0].person, Outfit(item=b.slot, **{b.slot: b}), "flat", size)
    return ShapeCase(kind=kind, group=b.slot, person_pid=person.pid, top_pid=top[0].pid, worn_pid=worn[0].pid,
                     garment_pid=given[0].pid, person=photo, mask=replaced, garment=flat,
                     garment_mask=flat_masks[b.slot], colour=b.colour, truth=truth, truth_mask=shown,
                     region=dilate(replaced | shown, OUTLINE_PX))
