"""`easy_train.py setup` end to end: offline default, and a hub-layout folder with planted bad rows."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from catvton.data import validate as V
from conftest import make_row, person_and_mask, png_cell

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def check_consistency(report: dict) -> None:
    assert report["rows_valid"] + sum(report["bad_rows"].values()) == report["rows_total"]
    assert sum(report["by_group"].values()) == report["rows_valid"]
    assert sum(report["by_cloth_type"].values()) == report["rows_valid"]
    assert sum(report["image_sizes"].values()) <= report["rows_total"]
    pairs = sum(sum(g.values()) for g in report["pairs_before_category_filter"].values())
    assert pairs > 0
    assert sum(sum(g.values()) for g in report["pairs"].values()) <= pairs
    for key in ("rows_total", "rows_valid", "bad_rows", "by_cloth_type", "by_group", "by_view", "pids", "pairs",
                "image_sizes", "mask_coverage", "storage_estimate_bytes", "ready", "reasons"):
        assert key in report, key


def test_setup_with_no_arguments_runs_offline(tmp_path, ray_session):
    """The README's command with its defaults, in this process on the session's Ray (the docs tier
    runs it word for word in a process of its own: tests/test_documented_commands.py, "setup")."""
    from easy_train import app

    out = tmp_path / "setup"
    result = CliRunner().invoke(app, ["setup", "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads((out / "dataset_report.json").read_text())
    check_consistency(report)
    assert report["source"] == "synthetic"
    assert report["ready"] is True, report["reasons"]
    assert report["bad_rows"] == {}
    assert report["image_sizes"] == {"256x256": report["rows_total"]}
    for g in ("lower", "full"):
        assert report["pairs"]["train"][g] >= 100
        assert (out / f"samples_{g}.png").stat().st_size > 1000
    assert (out / "dataset_report.md").read_text().startswith("# Dataset readiness")
    assert "ready: True" in result.output


PLANTED = {
    V.MISSING_IMAGE: [{"images": None}],
    V.UNDECODABLE_IMAGE: [{"images": {"bytes": b"GIF89a not really", "path": "x.gif"}}],
    V.TRUNCATED_IMAGE: [],  # filled in below (needs real bytes)
    V.MISSING_MASK: [{"mask": None}],
    V.UNDECODABLE_MASK: [{"mask": {"bytes": b"\x00\x01\x02", "path": None}}],
    V.MASK_SIZE_MISMATCH: [{"mask": png_cell(np.full((32, 64), 255, np.uint8))}],
    V.EMPTY_MASK: [{"mask": png_cell(np.zeros((64, 64), np.uint8))}],
    V.MASK_COVERS_IMAGE: [{"mask": png_cell(np.full((64, 64), 255, np.uint8))}],
    V.UNKNOWN_CLOTH_TYPE: [{"cloth_type": "Socks"}, {"cloth_type": "pants"}],
    V.UNPARSEABLE_POSE: [{"pose": "front"}, {"pose": "01_1_back"}],
}


def planted_rows() -> tuple[list[dict], int]:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(person_and_mask(256)[0]).save(buf, format="JPEG", quality=95)
    cut = buf.getvalue()[: len(buf.getvalue()) * 2 // 3]
    PLANTED[V.TRUNCATED_IMAGE] = [{"images": {"bytes": cut, "path": None}, "mask": png_cell(np.full((256, 256), 0, np.uint8))}]
    rows = []
    for i, (reason, overrides) in enumerate(PLANTED.items()):
        for j, o in enumerate(overrides):
            rows.append(make_row(pid=f"id_9{i:02d}{j:05d}", **o))
    photo, mask = person_and_mask()
    odd = [
        make_row(pid="id_99000001", pose="01_1_front", images=png_cell(photo[..., 0], mode="L")),
        make_row(pid="id_99000001", pose="01_2_side", images=png_cell(np.dstack([photo, np.full((64, 64), 200, np.uint8)]))),
        make_row(pid="id_99000001", pose="01_3_back", mask=png_cell(np.dstack([mask] * 3))),
        make_row(pid="id_99000001", pose="01_4_full", mask=png_cell((mask > 0).astype(np.uint8))),
    ]
    return rows + odd, len(odd)


def test_setup_on_a_folder_with_planted_bad_rows(tmp_path, ray_session):
    from catvton.offline.synthetic import write_dataset
    from easy_train import app

    extra, n_odd = planted_rows()
    folder = tmp_path / "deepfashion"
    shards = write_dataset(folder, num_pids=12, image_size=64, seed=3, extra_rows=extra)
    assert all(p.parent == folder / "data" and p.name.startswith("train-") for p in shards)
    n_synth = sum(pq.ParquetFile(p).metadata.num_rows for p in shards) - len(extra)
    schema = pq.ParquetFile(shards[-1]).schema_arrow
    assert str(schema.field("images").type) == "struct<bytes: binary, path: string>"

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["setup", "--data", str(folder), "--out", str(out),
                                      "--set", "data.min_pairs_per_group=1", "--set", "data.val_fraction=0.2",
                                      "--set", "data.test_fraction=0.2"])
    report = json.loads((out / "dataset_report.json").read_text())
    check_consistency(report)
    expected_bad = {reason: len(o) for reason, o in PLANTED.items()}
    assert report["bad_rows"] == expected_bad
    assert report["rows_valid"] == n_synth + n_odd
    assert report["rows_total"] == n_synth + len(extra)
    assert report["bad_row_values"]["unknown_cloth_type"] == {"Socks": 1, "pants": 1}
    assert report["image_sizes"]["64x64"] >= n_odd
    # the exit code is the verdict (0 ready, 1 not ready), never a crash after the report was written
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == (0 if report["ready"] else 1), result.output
    assert any("bad and excluded" in r or "are bad" in r for r in report["reasons"])
