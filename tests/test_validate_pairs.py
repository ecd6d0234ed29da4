import io
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from catvton.config import DataConfig
from catvton.data import validate as V
from catvton.data.pairs import make_pairs, pid_selected, split_of
from conftest import make_row, person_and_mask, png_cell

CFG = DataConfig()


def reason(row):
    check, _, _ = V.check_row(row, CFG)
    return check.reason if not check.valid else "ok"


def test_a_clean_row_is_valid():
    check, photo, mask = V.check_row(make_row(), CFG)
    assert check.valid and check.group == "lower" and check.view == "front" and check.photo_group == 1
    assert (check.width, check.height) == (64, 64)
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert 0.2 < check.mask_fraction < 0.5
    assert check.mask_levels == 2


def truncated(row_cell):
    return {"bytes": row_cell["bytes"][: len(row_cell["bytes"]) // 2], "path": None}


@pytest.mark.parametrize("override,expected", [
    ({"images": None}, V.MISSING_IMAGE),
    ({"images": {"bytes": b"", "path": None}}, V.MISSING_IMAGE),
    ({"images": {"bytes": b"this is not an image", "path": None}}, V.UNDECODABLE_IMAGE),
    ({"mask": None}, V.MISSING_MASK),
    ({"mask": {"bytes": b"\x89PNG garbage", "path": None}}, V.UNDECODABLE_MASK),
    ({"mask": png_cell(np.zeros((64, 64), np.uint8))}, V.EMPTY_MASK),
    ({"mask": png_cell(np.full((64, 64), 255, np.uint8))}, V.MASK_COVERS_IMAGE),
    ({"mask": png_cell(np.full((32, 64), 255, np.uint8))}, V.MASK_SIZE_MISMATCH),
    ({"cloth_type": "Socks"}, V.UNKNOWN_CLOTH_TYPE),
    ({"cloth_type": None}, V.UNKNOWN_CLOTH_TYPE),
    ({"pose": "front"}, V.UNPARSEABLE_POSE),
    ({"pid": ""}, V.MISSING_PID),
])
def test_bad_rows_get_their_reason(override, expected):
    assert reason(make_row(**override)) == expected


def test_truncated_image_and_mask():
    row = make_row()
    assert reason(dict(row, images=truncated(row["images"]))) in (V.TRUNCATED_IMAGE, V.UNDECODABLE_IMAGE)
    # a JPEG cut in its scan data opens but fails to load: that is "truncated"
    buf = io.BytesIO()
    Image.fromarray(person_and_mask(256)[0]).save(buf, format="JPEG", quality=95)
    cut = {"bytes": buf.getvalue()[: len(buf.getvalue()) * 2 // 3], "path": None}
    assert reason(make_row(size=256, images=cut)) == V.TRUNCATED_IMAGE
    assert reason(dict(row, mask=truncated(row["mask"]))) in (V.TRUNCATED_MASK, V.UNDECODABLE_MASK)


def test_odd_but_usable_rows_are_converted():
    photo, mask = person_and_mask()
    gray = make_row(images=png_cell(photo[..., 0], mode="L"))
    rgba = make_row(images=png_cell(np.dstack([photo, np.full((64, 64), 255, np.uint8)])))
    rgb_mask = make_row(mask=png_cell(np.dstack([mask] * 3)))
    red_mask = make_row(mask=png_cell(np.dstack([mask, np.zeros_like(mask), np.zeros_like(mask)])))
    zero_one_mask = make_row(mask=png_cell((mask > 0).astype(np.uint8)))
    for row in (gray, rgba, rgb_mask, red_mask, zero_one_mask):
        check, img, m = V.check_row(row, CFG)
        assert check.valid, check
        assert V.to_rgb(img).shape == (64, 64, 3)
        assert np.array_equal(m, mask > 0)


def test_rgba_is_composited_over_white():
    photo = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    img = V.decode(png_cell(photo))
    assert (V.to_rgb(img) == 255).all()


def test_validator_stage_counts_every_row_and_keeps_no_pixels_by_default():
    rows = [make_row(), make_row(images=None), make_row(cloth_type="Socks"), make_row(pose="01_2_side")]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = V.RowValidator(asdict(CFG))(batch)
    assert list(out["valid"]) == [True, False, False, True]
    assert list(out["reason"]) == ["", V.MISSING_IMAGE, V.UNKNOWN_CLOTH_TYPE, ""]
    assert out["detail"][2] == "Socks"
    assert "image_bytes" not in out
    kept = V.RowValidator(asdict(CFG), keep_images="valid")(batch)
    assert [b is not None for b in kept["image_bytes"]] == [True, False, False, True]


def meta(pid, pose, cloth_type="Pants", valid=True):
    from catvton.schema import cloth_group, parse_pose

    p = parse_pose(pose)
    return {"pid": pid, "pose": pose, "cloth_type": cloth_type, "valid": valid,
            "group": cloth_group(cloth_type), "view": p.view if p else ""}


def test_pairs_take_the_garment_from_the_preferred_view():
    rows = [meta("a", "01_2_side"), meta("a", "01_4_full"), meta("a", "01_1_front"), meta("a", "01_3_back"),
            meta("a", "01_5_zoom")]
    pairs, skipped = make_pairs(rows, CFG)
    assert {p.garment_pose for p in pairs} == {"01_1_front"}
    assert sorted(p.person_pose for p in pairs) == ["01_2_side", "01_3_back", "01_4_full"]  # no zoom person
    assert all(rows[p.garment]["pose"] == p.garment_pose and rows[p.person]["pose"] == p.person_pose for p in pairs)
    assert all(p.garment != p.person for p in pairs)
    flat = rows + [meta("a", "01_6_flat")]
    pairs, _ = make_pairs([meta("b", "01_6_flat"), meta("b", "01_2_side")], CFG)
    assert [(p.garment_pose, p.person_pose) for p in pairs] == [("01_6_flat", "01_2_side")]
    assert len(make_pairs(flat, CFG)[0]) == 3


def test_pairs_skip_invalid_single_and_duplicate_rows():
    rows = [meta("a", "01_1_front"), meta("a", "01_2_side", valid=False), meta("b", "01_1_front"),
            meta("c", "01_1_front"), meta("c", "01_1_front"), meta("c", "01_2_side")]
    pairs, skipped = make_pairs(rows, CFG)
    assert [(p.pid, p.person_pose) for p in pairs] == [("c", "01_2_side")]
    assert skipped == {"single_view": 2, "duplicate_pose": 1}


def test_split_by_pid_is_deterministic_disjoint_and_near_its_fractions():
    pids = [f"id_{i:08d}" for i in range(4000)]
    splits = [split_of(p, CFG) for p in pids]
    assert splits == [split_of(p, CFG) for p in pids]
    share = {s: splits.count(s) / len(pids) for s in ("train", "val", "test")}
    assert abs(share["val"] - 0.1) < 0.02 and abs(share["test"] - 0.1) < 0.02
    other = [split_of(p, DataConfig(seed=1)) for p in pids]
    assert other != splits
    # every pair of a pid has that pid's split: no pid in two splits
    rows = [meta(p, pose) for p in pids[:300] for pose in ("01_1_front", "01_2_side", "01_3_back")]
    pairs, _ = make_pairs(rows, CFG)
    by_pid = {}
    for p in pairs:
        by_pid.setdefault(p.pid, set()).add(p.split)
    assert all(len(s) == 1 for s in by_pid.values())


def test_category_filter_keeps_a_share_of_tops():
    cfg = DataConfig(groups=["lower", "full"], upper_share=0.25)
    pids = [f"id_{i:08d}" for i in range(2000)]
    kept = sum(pid_selected(p, "upper", cfg) for p in pids) / len(pids)
    assert abs(kept - 0.25) < 0.04
    assert all(pid_selected(p, "lower", cfg) and pid_selected(p, "full", cfg) for p in pids[:50])
    assert not any(pid_selected(p, "upper", DataConfig(upper_share=0.0)) for p in pids)
