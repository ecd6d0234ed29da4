"""Held-out outfit triples (catvton.offline.outfits): a test person, another test pid's top and a
third's bottom, and the true photo of the person wearing both. The scores of outfit try-on
(catvton.eval.outfits) are only as good as these truths: the person must be the dataset's own
held-out row, the garments the dataset's own garment views, and the truths must differ from the
person photo only where garments changed, showing the garments given.
"""

from __future__ import annotations

import numpy as np
import pytest

from catvton.config import load_config
from catvton.data.masks import dilate
from catvton.data.pairs import split_of
from catvton.offline.outfits import OUTLINE_PX, SLOTS, TRUTHS, outfit_triples, triple_arrays
from catvton.offline.synthetic import plan_pid, render_pid
from conftest import ROOT

N = 12


@pytest.fixture(scope="module")
def data():
    return load_config(ROOT / "configs" / "tiny.yaml").data


@pytest.fixture(scope="module")
def triples(data):
    return outfit_triples(N, data)


def _index(pid: str) -> int:
    return int(pid.removeprefix("id_")) - 1


def test_shapes_and_roles(triples, data):
    s = data.synthetic_image_size
    arrays = triple_arrays(triples)
    for key in ("person", "top", "bottom") + TRUTHS:
        assert arrays[key].shape == (N, s, s, 3) and arrays[key].dtype == np.uint8, key
    for key in ("upper_mask", "lower_mask", "top_mask", "bottom_mask"):
        assert arrays[key].shape == (N, s, s) and arrays[key].dtype == bool, key
        assert (arrays[key].mean(axis=(1, 2)) >= data.min_mask_fraction).all(), key
    for t in triples:
        assert len(set(t.pids)) == 3, t.pids
        assert all(split_of(pid, data) == "test" for pid in t.pids), t.pids
        assert plan_pid(data.seed, _index(t.top_pid)).outfit.item == "upper"
        assert plan_pid(data.seed, _index(t.bottom_pid)).outfit.item == "lower"
        assert plan_pid(data.seed, _index(t.person_pid)).outfit.item in SLOTS
        for name in TRUTHS:  # every garment is visible in every true photo
            assert all(t.truth_masks[name][slot].mean() >= data.min_mask_fraction for slot in SLOTS), (t.pids, name)
    # the garments differ across the triples, so a swap between two triples gives other garments
    assert len({t.top_pid for t in triples}) == N and len({t.bottom_pid for t in triples}) == N


def test_deterministic_and_independent_of_n(triples, data):
    again = outfit_triples(N, data)
    fewer = outfit_triples(N // 2, data)
    for a, b in zip(triples, again):
        assert a.pids == b.pids and a.person_pose == b.person_pose
        for key in ("person", "top", "bottom") + TRUTHS:
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert [t.pids for t in fewer] == [t.pids for t in triples[:N // 2]]
    np.testing.assert_array_equal(fewer[-1].truth, triples[N // 2 - 1].truth)


def test_person_and_garments_are_the_datasets_own_rows(triples, data):
    """The person photo is the held-out row at its pose, and the garments are the rows a test pair
    takes its garment from, with their row masks (what training cuts a garment out of)."""
    s = data.synthetic_image_size
    for t in triples[:4]:
        for pid, pose, photo, mask in ((t.person_pid, t.person_pose, t.person, None),
                                       (t.top_pid, t.top_pose, t.top, t.top_mask),
                                       (t.bottom_pid, t.bottom_pose, t.bottom, t.bottom_mask)):
            rows = {r["pose"]: r for r in render_pid(plan_pid(data.seed, _index(pid)), s, data.seed)}
            np.testing.assert_array_equal(np.asarray(rows[pose]["images"]), photo)
            if mask is not None:
                np.testing.assert_array_equal(np.asarray(rows[pose]["mask"]) > 0, mask)
        assert t.top_pose != t.person_pose or t.top_pid != t.person_pid
        item = plan_pid(data.seed, _index(t.person_pid)).outfit.item
        row_mask = np.asarray(render_pid(plan_pid(data.seed, _index(t.person_pid)), s, data.seed)
                              [plan_pid(data.seed, _index(t.person_pid)).poses.index(t.person_pose)]["mask"]) > 0
        np.testing.assert_array_equal(t.masks[item], row_mask)


def test_truths_differ_from_the_person_only_at_the_garments(triples):
    """Outside both outfits' garments (grown by the renderer's 1-px outline) every pixel of every
    truth is the person photo's; inside, the truths do differ."""
    for t in triples:
        for name in TRUTHS:
            union = np.logical_or.reduce([t.masks[s] for s in SLOTS] + [t.truth_masks[name][s] for s in SLOTS])
            outside = ~dilate(union, OUTLINE_PX)
            truth = getattr(t, name)
            np.testing.assert_array_equal(truth[outside], t.person[outside], err_msg=f"{t.pids} {name}")
            assert (truth[union] != t.person[union]).any(), (t.pids, name)
        # a single-garment truth keeps the other garment: the top-only truth shows the person's own
        # bottom wherever neither top covers it
        tops = t.masks["upper"] | t.truth_masks["truth_upper"]["upper"]
        keep = t.masks["lower"] & ~dilate(tops, OUTLINE_PX)
        assert keep.any(), t.pids
        np.testing.assert_array_equal(t.truth_upper[keep], t.person[keep])


def _mean(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return img[mask].astype(np.float64).mean(axis=0)


@pytest.mark.parametrize("slot,given", [("upper", "top"), ("lower", "bottom")])
def test_truth_shows_the_garment_given(triples, slot, given):
    """The truth's region of ``slot`` has the colour of the garment photo given for it (the same
    garment in another view: within a few RGB levels), not the person's own garment's."""
    for t in triples:
        garment = _mean(getattr(t, given), getattr(t, f"{given}_mask"))
        own = _mean(t.person, t.masks[slot])
        for name in ("truth", f"truth_{slot}"):
            worn = _mean(getattr(t, name), t.truth_masks[name][slot])
            assert np.linalg.norm(worn - garment) < 15.0, (t.pids, name, worn, garment)
            if np.linalg.norm(garment - own) > 30.0:
                assert np.linalg.norm(worn - garment) < np.linalg.norm(worn - own), (t.pids, name)


def test_outfit_scores_reward_the_garment_given(triples):
    """catvton.eval.outfits on stand-in results, no model. A "LoRA" that returns the outfit's true
    photo (and the unchanged person for another triple's garments) scores perfectly on the outfit
    with a positive margin in both regions, and imperfectly on the single-garment runs, each scored
    against its own truth; a "base" that ignores the garments (the person unchanged either way) has
    a margin of exactly 0 everywhere."""
    from catvton.data.masks import general_mask
    from catvton.eval.outfits import REGION_KEYS, RUN_KEYS, RUNS, TRUTH_OF, score_outfits, outfit_partners

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    arrays = triple_arrays(triples[:4])  # SSIM costs ~0.2 s an image here
    partners = outfit_partners(arrays["top_pid"], arrays["bottom_pid"])
    assert (np.array(arrays["top_pid"])[partners] != np.array(arrays["top_pid"])).all()
    generals = {r: np.stack([general_mask(m, r, cfg.mask) for m in arrays[f"{r}_mask"]]) for r in SLOTS}
    person = arrays["person"]
    generated = {"lora": {run: {"own": arrays["truth"], "swapped": person} for run in RUNS},
                 "base": {run: {"own": person, "swapped": person} for run in RUNS}}
    runs = score_outfits(arrays, generated, generals, partners, (cfg.canvas.half_height, cfg.canvas.half_width),
                         cfg.canvas.person_fit)
    assert list(runs) == ["outfit", "upper", "lower"]
    for run, r in runs.items():
        assert list(r) == list(RUN_KEYS) and r["passes"] == list(RUNS[run]) and r["truth"] == TRUTH_OF[run]
        assert 0.0 <= r["unreachable"] < 0.2, (run, r["unreachable"])
        for region, g in r["regions"].items():
            assert list(g) == list(REGION_KEYS)
            assert g["transfer"]["base"]["margin_db"] == 0.0
            assert g["grey"]["masked_psnr"] < 20.0 and g["base"]["masked_psnr"] < 25.0, (run, region)
            assert g["delta"]["masked_psnr"] == pytest.approx(g["lora"]["masked_psnr"] - g["base"]["masked_psnr"])
            if run == "outfit":
                assert g["lora"]["masked_psnr"] == pytest.approx(100.0) and g["lora"]["masked_ssim"] == pytest.approx(1.0)
                assert g["transfer"]["lora"]["margin_db"] > 70.0
            else:  # the outfit's truth is not the truth of one garment alone
                assert g["lora"]["masked_psnr"] < 60.0, (run, region)
