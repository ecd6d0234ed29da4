"""What the masks mark (issue 13, item 3): the setup report measures where each mask lies on its
person and says plainly when masks look like whole-person or all-clothing masks; on photos that
cut the person off at the waist or the thighs (issue 25, item 4) it judges the legs only where they
are in the photo and counts the rest as not judged.

Three planted kinds of mask on the same drawn people (a label map, so every kind is exact): the
one garment of the row's cloth_type (correct), all the clothing the person wears, the whole
person. The report must flag the first two by name, with a grid of the suspicious rows, and pass
the third.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from catvton.config import load_config
from catvton.data import placement as P
from catvton.data.report import build_report, write_report
from catvton.data.validate import RowValidator
from conftest import ROOT, png_cell

SKIN, HAIR, SHOES, TOP, BOTTOM, DRESS = 1, 2, 3, 10, 20, 30
CLOTHES = (TOP, BOTTOM, DRESS)
ITEMS = [("Tees_Tanks", TOP), ("Pants", BOTTOM), ("Dresses", DRESS), ("Shorts", BOTTOM),
         ("Blouses_Shirts", TOP), ("Skirts", BOTTOM)]
GARMENT_COLOURS = [(200, 30, 40), (30, 40, 90), (50, 140, 60), (236, 200, 40), (110, 50, 140), (28, 28, 32)]


def draw_person(cloth_type: str, rng: np.random.Generator, size: int = 96, long_sleeves: bool = False) -> np.ndarray:
    """A (size, size) uint8 label map: a standing person (head, arms, legs, shoes) in a top and
    trousers / shorts / a skirt, or in a dress; 0 is the background."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    h = size * rng.uniform(0.82, 0.92)
    y0 = size * 0.97 - h
    cx = size / 2 + rng.uniform(-0.05, 0.05) * size

    def y(f: float) -> float:
        return y0 + f * h

    def box(x0: float, f0: float, x1: float, f1: float, label: int) -> None:
        d.rectangle([cx + x0 * h, y(f0), cx + x1 * h, y(f1)], fill=label)

    box(-0.04, 0.0, 0.04, 0.05, HAIR)
    d.ellipse([cx - 0.045 * h, y(0.02), cx + 0.045 * h, y(0.15)], fill=SKIN)
    box(-0.02, 0.14, 0.02, 0.19, SKIN)                      # neck
    box(-0.16, 0.19, -0.11, 0.50, SKIN)                     # arms
    box(0.11, 0.19, 0.16, 0.50, SKIN)
    box(-0.10, 0.50, -0.01, 0.95, SKIN)                     # legs
    box(0.01, 0.50, 0.10, 0.95, SKIN)
    box(-0.11, 0.95, -0.01, 1.0, SHOES)
    box(0.01, 0.95, 0.11, 1.0, SHOES)
    box(-0.11, 0.18, 0.11, 0.50, SKIN)                      # torso
    if cloth_type == "Dresses":
        d.polygon([(cx - 0.11 * h, y(0.18)), (cx + 0.11 * h, y(0.18)), (cx + 0.17 * h, y(0.78)),
                   (cx - 0.17 * h, y(0.78))], fill=DRESS)
        return np.asarray(img)
    if cloth_type == "Skirts":
        d.polygon([(cx - 0.11 * h, y(0.44)), (cx + 0.11 * h, y(0.44)), (cx + 0.16 * h, y(0.70)),
                   (cx - 0.16 * h, y(0.70))], fill=BOTTOM)
    else:
        hem = 0.62 if cloth_type == "Shorts" else 0.93
        box(-0.11, 0.44, 0.11, 0.52, BOTTOM)                # waistband and seat
        box(-0.105, 0.50, -0.005, hem, BOTTOM)
        box(0.005, 0.50, 0.105, hem, BOTTOM)
    box(-0.115, 0.18, 0.115, 0.50, TOP)
    sleeve = 0.50 if long_sleeves else 0.30
    box(-0.165, 0.19, -0.11, sleeve, TOP)                   # sleeves
    box(0.11, 0.19, 0.165, sleeve, TOP)
    return np.asarray(img)


CROPS = {"full-length": None, "thigh-up": 0.72, "waist-up": 0.52}
"""Where the photo's bottom edge cuts the person, as a fraction of the person's height."""


def framed(labels: np.ndarray, crop: str, size: int) -> np.ndarray:
    """The (size, size) label map of a photo of the drawn person cut off at ``CROPS[crop]`` of its
    height (a square window from just above the head, scaled to ``size``); full-length: as drawn."""
    if CROPS[crop] is None:
        return np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))
    ys, xs = np.nonzero(labels)
    top, h = ys.min(), ys.max() + 1 - ys.min()
    y0, y1 = max(0, int(top - 0.04 * h)), int(top + CROPS[crop] * h)
    cx, half = int(xs.mean()), (y1 - y0) // 2
    window = labels[y0:y1, max(0, cx - half):cx + half]
    return np.asarray(Image.fromarray(window).resize((size, size), Image.NEAREST))


def colourize(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Label map -> (H, W, 3) uint8 photo on a light studio background with grain."""
    bg = rng.uniform(200, 225) + rng.uniform(-3, 3, 3)
    lut = np.zeros((256, 3))
    lut[0] = bg
    lut[SKIN] = (230, 180, 150) if rng.random() < 0.5 else (140, 92, 62)
    lut[HAIR], lut[SHOES] = (40, 30, 25), (90, 60, 40)
    for label in CLOTHES:
        lut[label] = GARMENT_COLOURS[rng.integers(len(GARMENT_COLOURS))]
    photo = lut[labels] + rng.integers(-2, 3, labels.shape + (3,)) * (labels == 0)[..., None]
    return np.clip(photo, 0, 255).astype(np.uint8)


VIEWS = ("1_front", "2_side", "3_back")


def planted_rows(kind: str, pids: int = 48, size: int = 96, seed: int = 0,
                 upper_crop: str | tuple[str, ...] = "full-length", long_sleeves: bool = False) -> list[dict]:
    """Rows in the dataset schema, 3 views per pid; ``kind``: which mask every row carries;
    ``upper_crop``: how the tops' photos frame the person (:data:`CROPS`), one for every view or
    one per view of :data:`VIEWS`; the other garments are photographed full-length."""
    crops = dict(zip(VIEWS, (upper_crop,) * 3 if isinstance(upper_crop, str) else upper_crop))
    rows = []
    for i in range(pids):
        cloth_type, item = ITEMS[i % len(ITEMS)]
        for view in VIEWS:
            rng = np.random.default_rng([seed, i, int(view[0])])
            if item == TOP and crops[view] != "full-length":
                labels = framed(draw_person(cloth_type, rng, 2 * size, long_sleeves), crops[view], size)
            else:
                labels = draw_person(cloth_type, rng, size, long_sleeves)
            mask = {"garment": labels == item, "all-clothing": np.isin(labels, CLOTHES),
                    "whole-person": labels > 0}[kind]
            photo = colourize(labels, rng)
            rows.append({"images": png_cell(photo), "gender": "WOMEN", "pose": f"01_{view}",
                         "cloth_type": cloth_type, "pid": f"id_{i + 1:08d}", "caption": "a woman",
                         "mask": png_cell(mask.astype(np.uint8) * 255), "mask_overlay": png_cell(photo)})
    return rows


def config():
    return load_config(ROOT / "configs" / "tiny.yaml", ["data.min_pairs_per_group=1", "data.val_fraction=0.2",
                                                         "data.test_fraction=0.2"])


def validated(rows: list[dict], cfg) -> list[dict]:
    """The setup scan's per-row metadata, without Ray: the same RowValidator stage, called directly."""
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = RowValidator(dataclasses.asdict(cfg.data), keep_images="sample", sample_rate=1.0, placement=True)(batch)
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in out.items()} for i in range(len(rows))]


@pytest.fixture(scope="module")
def reports():
    cfg = config()
    return {kind: build_report(validated(planted_rows(kind), cfg), cfg, kind)
            for kind in ("garment", "all-clothing", "whole-person")}


def test_the_measure_on_a_drawn_rectangle_person():
    """A grey person from row 10 to row 90 of a white photo, the mask on rows 50-90: the numbers
    are known exactly."""
    photo = np.full((100, 60, 3), 240, np.uint8)
    photo[10:90, 20:40] = 100
    mask = np.zeros((100, 60), bool)
    mask[50:90, 20:40] = True
    p = P.measure(photo, mask)
    assert (p.mask_top, p.mask_bottom) == (0.5, 1.0)
    assert (p.upper_cover, p.lower_cover, p.person_cover, p.mask_outside) == (0.0, 1.0, 0.5, 0.0)
    mask[:] = False
    mask[10:30, 20:40] = True  # the top quarter
    p = P.measure(photo, mask)
    assert (p.mask_top, p.mask_bottom, p.upper_cover, p.lower_cover) == (0.0, 0.25, 0.5, 0.0)


def test_no_plain_background_means_not_measured():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[30:60, 20:40] = True
    assert P.measure(noise, mask) is None
    assert P.estimate_silhouette(noise) is None


def test_correct_garment_masks_pass(reports):
    r = reports["garment"]
    assert {g: k["kind"] for g, k in r["mask_kinds"].items()} == {"upper": "garment", "lower": "garment", "full": "garment"}
    where = r["mask_placement"]
    assert {g: (s["measured"], s["rows"]) for g, s in where.items()} == {"upper": (48, 48), "lower": (72, 72), "full": (24, 24)}
    # upper masks end near mid-height, lower masks start there: the groups differ
    assert where["upper"]["mask_bottom"] < 0.56 and where["lower"]["mask_top"] > 0.4
    assert where["lower"]["upper_cover"] < 0.1 and where["upper"]["lower_cover"] < 0.1
    assert all(s["mask_outside"] == 0.0 for s in where.values())
    # nothing about masks in the verdict (with 8 dress pids, the pid split may leave a group
    # without test pairs: that finding is not this test's business)
    assert not [x for x in r["reasons"] if "mask" in x and "latent cache" not in x], r["reasons"]


def test_all_clothing_masks_are_flagged_by_name(reports):
    r = reports["all-clothing"]
    kinds = {g: k["kind"] for g, k in r["mask_kinds"].items()}
    assert kinds["lower"] == kinds["upper"] == "all-clothing"
    assert kinds["full"] == "garment"  # a dress is all the clothing: nothing to tell there
    assert r["mask_placement"]["lower"]["upper_cover"] > 0.6
    assert r["mask_placement"]["lower"]["mask_top"] < 0.2
    assert not r["ready"]
    blocking = [b for b in r["blocking"] if "all-clothing" in b]
    assert any("group 'lower'" in b and "cover the torso" in b for b in blocking), r["blocking"]


def test_whole_person_masks_are_flagged_by_name(reports):
    r = reports["whole-person"]
    assert {k["kind"] for k in r["mask_kinds"].values()} == {"whole-person"}
    assert all(s["person_cover"] == 1.0 and s["mask_top"] == 0.0 and s["mask_bottom"] == 1.0
               for s in r["mask_placement"].values())
    assert not r["ready"]
    # lower and full are trained, upper kept at data.upper_share: each one blocks
    assert sum("whole-person masks" in b for b in r["blocking"]) == 3
    assert any("group 'lower' masks look like whole-person masks" in b for b in r["blocking"])


def mask_reasons(report: dict) -> list[str]:
    """The verdict's findings about masks (the latent cache note names no mask finding)."""
    return [x for x in report["reasons"] if "mask" in x and "latent cache" not in x]


@pytest.fixture(scope="module")
def cropped():
    """Reports on sets whose tops are photographed cut off by the frame (issue 25, item 4): 8 top
    pids, 24 rows; long sleeves, the hardest case for the whole-person rule."""
    cfg = config()

    def report(kind: str, crop) -> dict:
        return build_report(validated(planted_rows(kind, pids=24, upper_crop=crop, long_sleeves=True), cfg), cfg, kind)

    return {**{("garment", c): report("garment", c) for c in CROPS},
            ("whole-person", "waist-up"): report("whole-person", "waist-up"),
            ("all-clothing", "waist-up"): report("all-clothing", "waist-up"),
            ("all-clothing", "mixed"): report("all-clothing", ("full-length", "waist-up", "thigh-up"))}


def test_a_person_cut_off_by_the_frame_has_no_legs_share():
    """The rectangle person of the first test, reaching the photo's bottom edge: its lower half may
    be torso, so the lower-body share is not measured (-1); the rest is."""
    photo = np.full((100, 60, 3), 240, np.uint8)
    photo[10:, 20:40] = 100
    mask = np.zeros((100, 60), bool)
    mask[30:, 20:40] = True  # a top from the shoulders to the bottom edge: a waist-up photo
    p = P.measure(photo, mask)
    assert p.lower_cover == -1.0
    assert (p.mask_top, p.mask_bottom, p.upper_cover, p.person_cover) == (pytest.approx(20 / 90), 1.0, 25 / 45, 70 / 90)
    photo[99:], mask[99:] = 240, False  # a row of background under it: within BOTTOM_EDGE, still cut off
    assert P.measure(photo, mask).lower_cover == -1.0
    photo[95:], mask[95:] = 240, False  # five rows: the whole person is in the photo, its lower half is measured
    assert P.measure(photo, mask).lower_cover == 1.0


@pytest.mark.parametrize("crop", list(CROPS))
def test_correct_upper_masks_pass_on_every_crop(cropped, crop):
    r = cropped[("garment", crop)]
    assert {g: k["kind"] for g, k in r["mask_kinds"].items()} == {"upper": "garment", "lower": "garment", "full": "garment"}
    assert not mask_reasons(r), r["reasons"]
    upper = r["mask_placement"]["upper"]
    if crop == "full-length":
        assert (upper["cut_off"], upper["full_length"]) == (0, 24) and r["mask_not_judged"] == {}
        return
    assert (upper["cut_off"], upper["full_length"], upper["lower_cover"]) == (24, 0, None)
    if crop == "waist-up":
        # the top reaches down to the bottom edge (the old mid-height split called that covering the
        # legs), and a long-sleeved top covers over 85% of the silhouette, but below the head
        assert upper["mask_bottom"] > 0.95
        assert upper["person_cover"] > P.WHOLE_PERSON_COVER and upper["mask_top"] > 0.25
    # not judged is said, with the count and the reason, not passed silently
    why = r["mask_not_judged"]["upper"]
    assert why.startswith("legs not judged on 24 of 24 measured rows: the person touches the photo's bottom edge")
    assert "the legs check was not run" in why and why in r["mask_kinds"]["upper"]["why"]
    assert "| upper | 24 / 24 | 24 |" in "\n".join(placement_markdown(r))
    assert r["mask_placement"]["lower"]["cut_off"] == 0  # trousers and dresses photographed full-length


def placement_markdown(report: dict) -> list[str]:
    return P.markdown(report["mask_placement"], {g: (k["kind"], k["why"]) for g, k in report["mask_kinds"].items()})


def test_whole_person_masks_on_waist_up_photos_are_still_flagged(cropped):
    r = cropped[("whole-person", "waist-up")]
    assert {k["kind"] for k in r["mask_kinds"].values()} == {"whole-person"}
    assert r["mask_placement"]["upper"]["cut_off"] == 24 and r["mask_placement"]["upper"]["mask_top"] == 0.0
    assert any("group 'upper' masks look like whole-person masks" in b and "head included" in b for b in r["blocking"])
    assert not r["ready"]


def test_all_clothing_masks_are_judged_on_the_full_length_rows_of_a_mixed_group(cropped):
    """Front views full-length, side views waist-up, back views thigh-up: the legs check runs on the
    8 front views, the 16 others are counted as not judged."""
    r = cropped[("all-clothing", "mixed")]
    upper = r["mask_placement"]["upper"]
    assert (upper["full_length"], upper["cut_off"]) == (8, 16) and upper["lower_cover"] > 0.8
    assert r["mask_kinds"]["upper"]["kind"] == "all-clothing"
    assert r["mask_not_judged"]["upper"].startswith("legs not judged on 16 of 24 measured rows")
    assert any("group 'upper' masks look like all-clothing masks" in b and "cover the legs" in b
               and "(median over the 8 full-length rows), from" in b for b in r["blocking"]), r["blocking"]
    assert not r["ready"]


def test_all_clothing_tops_on_cropped_photos_are_reported_not_judged(cropped):
    """Every top cut off at the waist: the legs cannot be seen, so the upper group's legs check is
    reported as not run, not as a pass; the lower group's all-clothing masks still block."""
    r = cropped[("all-clothing", "waist-up")]
    assert r["mask_kinds"]["upper"]["kind"] == "garment"
    assert "the legs check was not run" in r["mask_not_judged"]["upper"]
    assert "the lower body not measured" in r["mask_kinds"]["upper"]["why"]
    assert r["mask_kinds"]["lower"]["kind"] == "all-clothing" and not r["ready"]
    assert any("group 'lower' masks look like all-clothing masks" in b for b in r["blocking"])


def test_the_report_files_show_the_section_and_a_grid_of_the_suspicious_rows(tmp_path):
    cfg = config()
    rows = validated(planted_rows("all-clothing", pids=12), cfg)
    report = write_report(tmp_path, rows, cfg, "planted")
    md = (tmp_path / "dataset_report.md").read_text()
    assert "## What the masks mark" in md and "**lower**: all-clothing" in md
    assert report["mask_grids"] == ["mask_suspicious.png", "mask_placement.png"]
    grid = Image.open(tmp_path / "mask_suspicious.png")
    assert grid.height > 4 * 96  # 4 rows of the upper group, 4 of the lower
    assert json.loads((tmp_path / "dataset_report.json").read_text())["mask_kinds"]["lower"]["kind"] == "all-clothing"
    # a correct set afterwards in the same folder leaves no stale suspicious grid behind
    report = write_report(tmp_path, validated(planted_rows("garment", pids=12), cfg), cfg, "planted")
    assert report["mask_grids"] == ["mask_placement.png"] and not (tmp_path / "mask_suspicious.png").exists()


@pytest.mark.ray
def test_setup_exits_1_on_whole_person_masks(tmp_path, ray_session):
    """Through the real command: parquet in the hub layout, the Ray scan, the verdict's exit code."""
    from typer.testing import CliRunner

    from catvton.offline.synthetic import write_dataset
    from easy_train import app

    folder = tmp_path / "planted"
    write_dataset(folder, num_pids=0, extra_rows=planted_rows("whole-person", pids=18), num_shards=1)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["setup", "--data", str(folder), "--out", str(out), "--num-actors", "1",
                                      "--set", "data.min_pairs_per_group=1", "--set", "data.val_fraction=0.2",
                                      "--set", "data.test_fraction=0.2"])
    assert result.exit_code == 1, result.output
    assert "look like whole-person masks" in result.output
    assert (out / "mask_suspicious.png").is_file()


@pytest.mark.ray
def test_setup_passes_correct_masks_on_waist_up_photos(tmp_path, ray_session):
    """Through the real command (issue 25, item 4): tops photographed waist-up, correct masks. No
    mask finding in the verdict; the legs check of the upper group is printed as not judged."""
    from typer.testing import CliRunner

    from catvton.offline.synthetic import write_dataset
    from easy_train import app

    folder = tmp_path / "waist-up"
    write_dataset(folder, num_pids=0, num_shards=1,
                  extra_rows=planted_rows("garment", pids=24, upper_crop="waist-up", long_sleeves=True))
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["setup", "--data", str(folder), "--out", str(out), "--num-actors", "1",
                                      "--set", "data.min_pairs_per_group=1", "--set", "data.val_fraction=0.2",
                                      "--set", "data.test_fraction=0.2"])
    assert "masks look like: upper garment, lower garment, full garment" in result.output, result.output
    assert "  upper: legs not judged on 24 of 24 measured rows" in result.output
    reasons = result.output.split("ready:")[1].split("wrote ")[0].splitlines()
    assert not [x for x in reasons if "mask" in x and "latent cache" not in x], result.output
    assert json.loads((out / "dataset_report.json").read_text())["mask_not_judged"]["upper"].startswith("legs not judged")
