"""The synthetic DeepFashion rows: real schema and hub layout, deterministic, learnable masks.

Fast (a few seconds): 12 pids at 96 px, one module-scoped render.
"""

from __future__ import annotations

import io
import itertools
import re
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catvton.offline import synthetic as syn
from catvton.schema import CLOTH_TYPE_GROUP, COLUMNS, IMAGE_COLUMNS, TEXT_COLUMNS, parse_pose

NUM_PIDS, SIZE, SEED = 12, 96, 0
IMAGE_CELL = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return list(syn.synthetic_rows(NUM_PIDS, SIZE, SEED))


def _by_pid(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["pid"]].append(r)
    return out


def _background_distance(img: np.ndarray) -> np.ndarray:
    """(H, W) max-channel distance of each pixel from its row's background, estimated as the
    median of the 4 leftmost and 4 rightmost pixels (the floor darkens towards the bottom)."""
    img = img.astype(np.int16)
    bg = np.median(np.concatenate([img[:, :4], img[:, -4:]], axis=1), axis=1)  # (H, 3)
    return np.abs(img - bg[:, None, :]).max(axis=-1)


def test_rows_have_the_hub_schema(rows: list[dict]) -> None:
    assert rows, "no rows"
    for r in rows:
        assert tuple(r) == COLUMNS
        assert isinstance(r["images"], Image.Image) and r["images"].mode == "RGB"
        assert isinstance(r["mask_overlay"], Image.Image) and r["mask_overlay"].mode == "RGB"
        assert isinstance(r["mask"], Image.Image) and r["mask"].mode == "L"
        for c in IMAGE_COLUMNS:
            assert r[c].size == (SIZE, SIZE), c
        for c in TEXT_COLUMNS:
            assert isinstance(r[c], str), c
        assert r["gender"] in ("WOMEN", "MEN")
        assert re.fullmatch(r"id_\d{8}", r["pid"])
        assert parse_pose(r["pose"]) is not None, r["pose"]
        assert r["cloth_type"] in CLOTH_TYPE_GROUP
        assert 26 <= len(r["caption"]) <= 169, r["caption"]
        assert set(np.unique(np.asarray(r["mask"]))) <= {0, 255}


def test_pids_are_ordered_items_in_3_to_6_views(rows: list[dict]) -> None:
    groups = _by_pid(rows)
    assert list(groups) == [f"id_{i:08d}" for i in range(1, NUM_PIDS + 1)]
    assert [r["pid"] for r in rows] == sorted(r["pid"] for r in rows)  # pid order
    for pid, rs in groups.items():
        assert 3 <= len(rs) <= 6, pid
        # One item per pid: same type, gender and caption in every view; poses unique.
        assert len({(r["cloth_type"], r["gender"], r["caption"]) for r in rs}) == 1, pid
        poses = [r["pose"] for r in rs]
        assert len(set(poses)) == len(poses)
        assert "01_1_front" in poses
    for r in rows:
        if r["gender"] == "MEN":
            assert r["cloth_type"] not in syn.MEN_FORBIDDEN


def test_same_seed_same_bytes_other_seed_differs(rows: list[dict]) -> None:
    def png(rs: list[dict]) -> list[bytes]:
        return [syn.encode_png(r[c]) for r in rs for c in IMAGE_COLUMNS]

    again = list(syn.synthetic_rows(NUM_PIDS, SIZE, SEED))
    assert png(again) == png(rows)
    assert [r["caption"] for r in again] == [r["caption"] for r in rows]
    # pid i does not depend on how many pids are drawn
    first3 = list(syn.synthetic_rows(3, SIZE, SEED))
    assert png(first3) == png(rows[: len(first3)])
    other = list(syn.synthetic_rows(3, SIZE, SEED + 1))
    assert png(other) != png(first3)


def test_mask_is_nonempty_and_on_the_figure(rows: list[dict]) -> None:
    for r in rows:
        m = np.asarray(r["mask"]) > 0
        assert m.sum() >= 20, (r["pid"], r["pose"], int(m.sum()))
        dist = _background_distance(np.asarray(r["images"]))
        # Anti-aliased stripes blend through the background's grey on a few pixels; a shifted or
        # wrong mask puts whole columns of it on the background.
        on_figure = (dist[m] > 6).mean()
        assert on_figure >= 0.95, (r["pid"], r["pose"], on_figure)
        # mask_overlay is the photo tinted red inside the mask, untouched outside.
        photo = np.asarray(r["images"]).astype(int)
        ov = np.asarray(r["mask_overlay"]).astype(int)
        assert np.array_equal(ov[~m], photo[~m])
        assert np.abs(ov[m] - (photo[m] + [255, 0, 0]) // 2).max() <= 1


def test_item_colour_reappears_in_every_view() -> None:
    # 128 px: at 96 px a side-view tank top is ~5 px wide and its dark outline dominates.
    rows = list(syn.synthetic_rows(NUM_PIDS, 128, SEED))
    means: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        if r["pose"].endswith("_flat"):
            continue
        m = np.asarray(r["mask"]) > 0
        means[r["pid"]].append(np.asarray(r["images"])[m].astype(float).mean(axis=0))
    for pid, ms in means.items():
        assert len(ms) >= 2, pid
        for a, b in itertools.combinations(ms, 2):
            assert np.linalg.norm(a - b) < 40, (pid, a, b)
    fronts = [ms[0] for ms in means.values()]
    far = [np.linalg.norm(a - b) >= 40 for a, b in itertools.combinations(fronts, 2)]
    assert np.mean(far) >= 0.8, np.mean(far)


def test_pants_shorts_skirt_share_the_waist_not_the_hem() -> None:
    rng = np.random.default_rng(7)
    person = syn.random_person(rng, "WOMEN")
    base = syn.make_outfit(rng, "Pants", "WOMEN")
    lowers = {t: syn.make_outfit(np.random.default_rng(i), t, "WOMEN").lower
              for i, t in enumerate(["Pants", "Shorts", "Skirts"])}
    tops, bottoms = {}, {}
    for t, lower in lowers.items():
        assert lower is not None and lower.cloth_type == t
        photo, masks = syn.render_view(person, replace(base, lower=lower), "front", 128)
        assert photo.shape == (128, 128, 3) and photo.dtype == np.uint8
        assert set(masks) == {"upper", "lower"}
        rows_on = np.nonzero(masks["lower"].any(axis=1))[0]
        tops[t], bottoms[t] = int(rows_on[0]), int(rows_on[-1])
        assert not (masks["lower"] & masks["upper"]).any()
    assert max(tops.values()) - min(tops.values()) <= 3, tops
    assert bottoms["Shorts"] < bottoms["Skirts"] < bottoms["Pants"], bottoms
    assert bottoms["Pants"] - bottoms["Shorts"] > 20


def test_render_view_canonical_and_flat() -> None:
    rng = np.random.default_rng(3)
    person = syn.random_person(rng, "MEN")
    outfit = syn.make_outfit(rng, "Shorts", "MEN")
    a, _ = syn.render_view(person, outfit, "side", 64)
    b, _ = syn.render_view(person, outfit, "side", 64)
    assert np.array_equal(a, b)  # rng=None: no jitter, no noise
    photo, masks = syn.render_view(person, outfit, "flat", 64, np.random.default_rng(0))
    assert masks["lower"].any() and not masks["upper"].any()
    # Nothing but the garment on the sheet: outside the mask is a flat near-white background.
    outside = photo[~masks["lower"]].astype(int)
    assert outside.min() >= 225 and np.ptp(outside) <= 8
    with pytest.raises(ValueError, match="view"):
        syn.render_view(person, outfit, "zoom", 64)
    with pytest.raises(ValueError, match="MEN"):
        syn.make_outfit(rng, "Dresses", "MEN")
    with pytest.raises(ValueError, match="cloth_type"):
        syn.make_outfit(rng, "Hats", "WOMEN")


def test_item_mix_follows_the_dataset() -> None:
    plans = [syn.plan_pid(SEED, i) for i in range(600)]
    women = np.mean([p.gender == "WOMEN" for p in plans])
    groups = np.array([CLOTH_TYPE_GROUP[p.cloth_type] for p in plans])
    assert 0.78 <= women <= 0.92, women
    assert 0.32 <= np.mean(groups == "upper") <= 0.48
    assert 0.27 <= np.mean(groups == "lower") <= 0.43
    assert 0.18 <= np.mean(groups == "full") <= 0.32
    assert {p.cloth_type for p in plans} == set(CLOTH_TYPE_GROUP)  # all 17 appear
    for p in plans:
        assert p.outfit.item_garment.cloth_type == p.cloth_type
        if p.gender == "MEN":
            assert p.cloth_type not in syn.MEN_FORBIDDEN
            assert all(p.outfit.garment(s).cloth_type not in syn.MEN_FORBIDDEN
                       for s in p.outfit.slots)
    views = {parse_pose(pose).view for p in plans for pose in p.poses}
    assert views == {"front", "side", "back", "full", "additional", "flat"}
    assert any(pose.startswith("02_") for p in plans for pose in p.poses)


def test_write_dataset_hub_layout_with_planted_bad_rows(tmp_path, rows: list[dict]) -> None:
    import datasets

    good = rows[0]
    png = syn.encode_png(good["images"])
    bad = [
        dict(good, pid="id_bad_truncated", images={"bytes": png[: len(png) // 3], "path": None}),
        dict(good, pid="id_bad_missing", images=None),
        dict(good, pid="id_bad_garbage", mask=b"not a png"),
    ]
    paths = syn.write_dataset(tmp_path / "ds", NUM_PIDS, SIZE, SEED, num_shards=4, extra_rows=bad)
    assert [p.name for p in paths] == [f"train-0000{k}-of-00004.parquet" for k in range(4)]
    assert [p.parent for p in paths] == [tmp_path / "ds" / "data"] * 4
    assert not list((tmp_path / "ds" / "data").glob(".*"))  # no temp files left
    for p in paths:
        schema = pq.read_schema(p)
        assert schema.names == list(COLUMNS)
        for c in IMAGE_COLUMNS:
            assert schema.field(c).type == IMAGE_CELL, (c, schema.field(c).type)
        for c in TEXT_COLUMNS:
            assert schema.field(c).type == pa.string()
    table = pq.read_table([str(p) for p in paths])
    assert table.num_rows == len(rows) + len(bad)
    # The generated rows come back byte for byte, in order; the planted ones as given.
    got = table.to_pylist()
    assert [r["pose"] for r in got[: len(rows)]] == [r["pose"] for r in rows]
    assert got[0]["images"]["bytes"] == png
    assert Image.open(io.BytesIO(got[1]["mask"]["bytes"])).mode == "L"
    tail = {r["pid"]: r for r in got[-3:]}
    assert tail["id_bad_truncated"]["images"] == {"bytes": png[: len(png) // 3], "path": None}
    assert tail["id_bad_missing"]["images"] is None
    assert tail["id_bad_garbage"]["mask"]["bytes"] == b"not a png"

    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == table.num_rows
    assert list(ds.column_names) == list(COLUMNS)

    # Few rows: fewer shards. Stale shards of another layout are refused, not mixed in.
    one = syn.write_dataset(tmp_path / "one", 0, SIZE, SEED, num_shards=4, extra_rows=bad[:1])
    assert [p.name for p in one] == ["train-00000-of-00001.parquet"]
    with pytest.raises(FileExistsError, match="train-00000-of-00001"):
        syn.write_dataset(tmp_path / "one", 2, SIZE, SEED, num_shards=2)


def test_ensure_synthetic_dataset_builds_once(tmp_path) -> None:
    folder = syn.ensure_synthetic_dataset(tmp_path, 3, 64, 5)
    from catvton.artifacts import source_digest

    digest = source_digest("catvton.offline.synthetic")  # the renderer's source names the set
    assert len(digest) == 12 and folder == tmp_path / f"synthetic-3-64-5-{digest}"
    shards = sorted((folder / "data").glob("*.parquet"))
    assert shards and sum(pq.read_metadata(p).num_rows for p in shards) >= 9
    stamp = [p.stat().st_mtime_ns for p in shards]
    assert syn.ensure_synthetic_dataset(tmp_path, 3, 64, 5) == folder
    assert [p.stat().st_mtime_ns for p in shards] == stamp  # reused, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, f"{folder.name}.lock"]  # no temp folder left


def test_cli(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        syn.main(["--help"])
    assert e.value.code == 0
    assert "--pids" in capsys.readouterr().out
    assert syn.main(["--out", str(tmp_path / "cli"), "--pids", "2", "--size", "48"]) == 0
    out = capsys.readouterr().out
    assert "of 2 pids" in out and "pids_per_group" in out
    assert list((tmp_path / "cli" / "data").glob("train-*.parquet"))
