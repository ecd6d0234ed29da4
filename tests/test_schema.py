import pytest

from catvton.schema import CLOTH_TYPE_GROUP, COLUMNS, cloth_group, parse_pose


def test_seventeen_cloth_types_in_three_groups():
    assert len(CLOTH_TYPE_GROUP) == 17
    groups = {}
    for t, g in CLOTH_TYPE_GROUP.items():
        groups.setdefault(g, []).append(t)
    assert sorted(groups) == ["full", "lower", "upper"]
    assert sorted(groups["lower"]) == ["Denim", "Leggings", "Pants", "Shorts", "Skirts"]
    assert sorted(groups["full"]) == ["Dresses", "Rompers_Jumpsuits"]
    assert len(groups["upper"]) == 10


def test_unknown_cloth_type_is_not_guessed():
    assert cloth_group("Pants") == "lower"
    assert cloth_group("pants") is None
    assert cloth_group("Socks") is None


@pytest.mark.parametrize("pose,expected", [
    ("06_1_front", (6, 1, "front")),
    ("03_2_side", (3, 2, "side")),
    ("11_3_back", (11, 3, "back")),
    ("02_4_full", (2, 4, "full")),
    ("01_7_additional", (1, 7, "additional")),
    ("01_6_flat", (1, 6, "flat")),
])
def test_pose_parses(pose, expected):
    p = parse_pose(pose)
    assert (p.photo_group, p.view_code, p.view) == expected


@pytest.mark.parametrize("pose", ["front", "06_1_back", "06_9_front", "6-1-front", "", None, "06_1_front_x"])
def test_bad_pose_is_refused(pose):
    assert parse_pose(pose) is None


def test_columns_are_the_hub_schema():
    assert COLUMNS == ("images", "gender", "pose", "cloth_type", "pid", "caption", "mask", "mask_overlay")
