"""The shape benchmark's cases (catvton.offline.shape) and its metric (catvton.eval.shape), on planted
results: the truth itself must score outline IoU 1, the old outline painted in the new garment's
colour must score low, the unchanged input 0. The cases must be held out, deterministic, and at least
40 a kind. Drawn at 96 px (the tiny preset draws 256): the geometry is the same, in a third the time.
"""

from __future__ import annotations

import numpy as np
import pytest

from catvton.config import load_config
from catvton.data.pairs import split_of
from catvton.eval.shape import (CASE_SEPARATION, OUTLINE_THRESHOLD, evaluate_shape, garment_colour_mask, outline_iou,
                                score_shape_cases, shape_grids, shape_metrics, shape_summary)
from catvton.offline.shape import SHAPE_KINDS, held_out_plans, shape_cases
from catvton.offline.synthetic import plan_pid
from conftest import ROOT

SIZE = 96
LOWER_KINDS = ("trousers_to_skirt", "shorts_to_trousers", "skirt_to_trousers")


@pytest.fixture(scope="module")
def data():
    return load_config(ROOT / "configs" / "tiny.yaml").data


@pytest.fixture(scope="module")
def cases(data):
    return shape_cases(held_out_plans(data), size=SIZE)


def _stack(cases, key):
    return np.stack([getattr(c, key) for c in cases])


def _summary(cases, results):
    return shape_summary(score_shape_cases(cases, results))


def _old_outline(cases):
    """The input with the worn garment (two trouser legs, the shorts, the skirt; the top and the
    trousers for a dress) filled with the given garment's colour: what a model that keeps the
    mask's outline paints."""
    out = _stack(cases, "person").copy()
    for img, c in zip(out, cases):
        img[c.mask] = c.colour
    return out


def test_every_kind_has_40_held_out_cases(cases, data):
    kinds = [c.kind for c in cases]
    assert {k: kinds.count(k) for k in SHAPE_KINDS} == {k: 40 for k in SHAPE_KINDS}
    for c in cases:
        assert all(split_of(pid, data) == "test" for pid in c.pids), (c.kind, c.pids)
        assert c.person.shape == c.truth.shape == c.garment.shape == (SIZE, SIZE, 3)
        assert c.group == ("full" if c.kind == "top_trousers_to_dress" else "lower")
        # the truth differs from the input only inside the region masked PSNR scores
        changed = (c.truth != c.person).any(axis=-1)
        assert changed.any() and not (changed & ~c.region).any(), c.pids
        assert c.mask.mean() >= data.min_mask_fraction and c.truth_mask.mean() >= data.min_mask_fraction
    # many people and several garments a kind, not one garment 40 times
    for kind in SHAPE_KINDS:
        of_kind = [c for c in cases if c.kind == kind]
        assert len({c.person_pid for c in of_kind}) >= 30, kind
        assert len({(c.garment_pid, c.colour) for c in of_kind}) >= 8, kind


def test_the_truth_scores_iou_1_and_the_unchanged_input_0(cases):
    truth = _summary(cases, _stack(cases, "truth"))
    unchanged = _summary(cases, _stack(cases, "person"))
    for kind in SHAPE_KINDS:
        assert truth[kind]["iou"] == 1.0 and truth[kind]["psnr"] >= 99.0, truth[kind]
        # the cases keep the input CASE_SEPARATION away from the garment's colour: nothing passes the rule
        assert unchanged[kind]["iou"] == 0.0 and unchanged[kind]["psnr"] < 15.0, unchanged[kind]
        assert truth[kind]["n"] == unchanged[kind]["n"] == 40


def test_the_old_outline_scores_low(cases):
    """Painting the worn garment's outline in the new colour gets the colour right and the shape wrong.
    Trousers and a skirt share only the hips: trousers reach the ankles (hem >= 0.90 of the figure's
    height), a skirt ends at <= 0.76 and fills the gap between the legs, shorts end at <= 0.62; so in
    each of the three bottom kinds the two outlines share less than half their union (measured: at most
    0.47, 0.30 and 0.45 at 96 px). Top and trousers against a dress share the torso as well, so that
    kind separates less (at most 0.73, 0.54 on average)."""
    results = _old_outline(cases)
    ious = outline_iou(results, _stack(cases, "truth"), _stack(cases, "truth_mask"), np.array([c.colour for c in cases]))
    kinds = np.array([c.kind for c in cases])
    for kind in LOWER_KINDS:
        assert ious[kinds == kind].max() < 0.5, (kind, ious[kinds == kind].max())
        assert ious[kinds == kind].min() > 0.05, kind  # it does paint part of the garment in its colour
    dress = ious[kinds == "top_trousers_to_dress"]
    assert dress.max() < 0.8 and dress.mean() < 0.6, (dress.max(), dress.mean())
    summary = _summary(cases, results)
    assert all(summary[k]["psnr"] < 20.0 for k in SHAPE_KINDS), summary


def test_the_rule_is_a_colour_distance_threshold(cases):
    """The truth's garment repainted flat in a colour a few units off still counts in full; repainted
    just over OUTLINE_THRESHOLD off, not at all."""
    assert CASE_SEPARATION == 2 * OUTLINE_THRESHOLD
    c = next(c for c in cases if c.kind == "trousers_to_skirt")
    truth, mask, colour = c.truth[None], c.truth_mask[None], np.array([c.colour])
    fabric = garment_colour_mask(truth, colour)[0] & c.truth_mask
    direction = np.where(colour[0] > 127, -1.0, 1.0) / np.sqrt(3)  # towards mid-grey: stays in 0..255
    for shift, expected in ((5.0, 1.0), (OUTLINE_THRESHOLD + 1.0, 0.0)):
        repainted = c.truth.copy()
        repainted[fabric] = np.rint(colour[0] + direction * shift).astype(np.uint8)
        assert outline_iou(repainted[None], truth, mask, colour)[0] == expected, shift


def test_cases_are_deterministic_for_a_seed(cases, data):
    plans = held_out_plans(data)
    fewer = shape_cases(plans, size=SIZE, per_kind=3, kinds=["top_trousers_to_dress", "shorts_to_trousers"])
    # a kind's first cases depend neither on how many are asked for nor on the other kinds asked
    first = [c for k in ("top_trousers_to_dress", "shorts_to_trousers") for c in [c for c in cases if c.kind == k][:3]]
    assert [c.pids for c in fewer] == [c.pids for c in first]
    assert all((a.person == b.person).all() and (a.truth == b.truth).all() and (a.garment == b.garment).all()
               for a, b in zip(fewer, first))
    other = shape_cases(plans, size=SIZE, per_kind=3, seed=1, kinds=["shorts_to_trousers"])
    assert [c.pids for c in other] != [c.pids for c in first[3:]]


def test_no_case_uses_a_pid_marked_as_training(data):
    plans = [plan_pid(data.seed, i) for i in range(data.synthetic_pids)]
    training = {p.pid for p in plans if split_of(p.pid, data) == "train"}
    assert len(training) > 0.5 * len(plans)
    got = shape_cases(plans, size=SIZE, per_kind=5, exclude=training)
    used = {pid for c in got for pid in c.pids}
    assert len(got) == 5 * len(SHAPE_KINDS) and used and not used & training
    with pytest.raises(ValueError, match="trousers_to_skirt: an empty pool"):
        shape_cases(plans[:20], size=SIZE, per_kind=1, kinds=["trousers_to_skirt"],
                    exclude={p.pid for p in plans[:20] if p.gender == "WOMEN"})


def test_evaluate_shape_calls_the_try_on_per_kind_and_reports_each_kind(cases):
    calls = []

    def planted(batch):  # the truth for the first kind, the unchanged input for the others
        calls.append(batch[0].kind)
        return _stack(batch, "truth" if batch[0].kind == "trousers_to_skirt" else "person")

    summary, rows, results = evaluate_shape(cases, planted)
    assert calls == list(SHAPE_KINDS) and len(rows) == len(cases) and results.shape == (len(cases), SIZE, SIZE, 3)
    assert summary["trousers_to_skirt"]["iou"] == 1.0 and summary["shorts_to_trousers"]["iou"] == 0.0
    metrics = shape_metrics(summary)
    assert set(metrics) == {f"shape.{k}.{m}" for k in SHAPE_KINDS for m in ("iou", "psnr")}
    assert metrics["shape.trousers_to_skirt.iou"] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        evaluate_shape(cases[:2], lambda batch: _stack(batch, "truth") / 255.0)
    grids = shape_grids(cases, results, rows=2)
    assert list(grids) == list(SHAPE_KINDS)
    assert all(g.size == (5 * SIZE, 2 * SIZE + 14) for g in grids.values())
