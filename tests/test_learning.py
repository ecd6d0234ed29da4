"""Does the default job learn? (marker ``slow``: the whole default job, ~10 CPU minutes, then the
one evaluation, :func:`catvton.eval.report.evaluate`, on every held-out pair and on the shape
benchmark's 40 cross-type cases a kind, which must be there.) Thresholds are half
of the smallest margins seen over seeds 0, 1 and 2 with ``python bench/learning_margins.py --seeds
0 1 2`` on the same evaluation (docs/PERFORMANCE.md); the garment-transfer margins must reach issue
12's bar of 3 dB.

    python -m pytest -m slow tests/test_learning.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from catvton.offline.shape import SHAPE_KINDS

ROOT = Path(__file__).resolve().parents[1]

# smallest margins over 3 seeds (docs/PERFORMANCE.md, "The default job now"), halved and rounded
# down; half_psnr margins are not listed: they equal the masked_psnr ones (outside the mask every
# model keeps the input, so the per-image offset between the two PSNRs cancels in a margin)
HALF_SMALLEST = {  # from outputs/learning_margins.json, 2026-12-06 (128 wide, hull masks, flux_shift, 3000 steps)
    "lower_masked_psnr_vs_alpha": 1.40, "lower_masked_ssim_vs_alpha": 0.087, "lower_half_ssim_vs_alpha": 0.010,
    "lower_masked_psnr_vs_grey": 2.37, "lower_masked_ssim_vs_grey": 0.166, "lower_half_ssim_vs_grey": 0.027,
    "full_masked_psnr_vs_alpha": 0.76, "full_masked_ssim_vs_alpha": 0.036, "full_half_ssim_vs_alpha": 0.008,
    "full_masked_psnr_vs_grey": 1.97, "full_masked_ssim_vs_grey": 0.085, "full_half_ssim_vs_grey": 0.030,
}
# does the person wear the garment given? The own-vs-swapped garment margins must reach issue 12's
# bar itself, not half of it: seen 4.11-4.14 (lower), 3.17 on every seed (full), 3.49 (the alpha on
# tops); the spread over seeds is under 0.04 dB, and the base and alpha are the shipped ones
TRANSFER_BAR_DB = {"lower_transfer_margin_db": 3.0, "full_transfer_margin_db": 3.0,
                   "upper_alpha_transfer_margin_db": 3.0}
# colour following: the bar (0.8 on lower), on every group (seen at least 0.914, 0.912, 0.934)
COLOUR_FOLLOWING_FLOOR = {"lower_colour_following": 0.8, "full_colour_following": 0.8,
                          "upper_alpha_colour_following": 0.8}
# "tops stay about as good as the alpha's": a drop of at most 1 dB and 0.06 masked SSIM (seen: no
# drop, +0.13 to +0.19 dB and +0.016 to +0.019 over the alpha; the box-mask preset lost ~1 dB)
UPPER_TOLERANCE = {"upper_masked_psnr_vs_alpha": 1.0, "upper_masked_ssim_vs_alpha": 0.06}
# the lower-body val loss of the LoRA against the alpha's, end / start: seen at most 0.570
VAL_RATIO_CEILING = 0.65


def _bench():
    spec = importlib.util.spec_from_file_location("learning_margins", ROOT / "bench" / "learning_margins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~15 CPU minutes on 2 shared cores, over the default 900 s
def test_default_job_learns_lower_body_and_keeps_tops(tmp_path, ray_session):
    bench = _bench()
    result = bench.run_seed(0, str(ROOT / "configs" / "tiny.yaml"),
                            [f"run.output_dir={tmp_path / 'out'}", f"run.storage_path={tmp_path / 'ray'}"])
    assert not result["reused"], "a fresh run: trained here, not found"
    m = bench.margins(result)
    assert m["val_lower_end_over_start"] <= VAL_RATIO_CEILING, m
    for k, floor in HALF_SMALLEST.items():
        assert m[k] > floor, (k, m[k], floor)
    for k, bar in TRANSFER_BAR_DB.items():
        assert m[k] >= bar, (k, m[k], bar)
    for k, floor in COLOUR_FOLLOWING_FLOOR.items():
        assert m[k] > floor, (k, m[k], floor)
    for k, tolerance in UPPER_TOLERANCE.items():
        assert m[k] > -tolerance, (k, m[k], tolerance)
    for group in ("lower", "full"):
        assert result["groups"][group]["pids"] >= 40
    assert (Path(result["run_dir"]) / "eval" / "report.json").is_file()
    # the shape benchmark (issue 26) is part of the evaluation: every kind, at least 40 held-out cases each
    shape = result["shape"]
    assert {k: v["n"] >= 40 for k, v in shape["kinds"].items()} == {k: True for k in SHAPE_KINDS}, shape["kinds"]
    assert set(shape["metrics"]) == {f"shape.{k}.{q}" for k in SHAPE_KINDS for q in ("iou", "psnr")}
    assert all(0.0 <= m[f"shape.{k}.iou"] <= 1.0 for k in SHAPE_KINDS), "margins() carries the LoRA's shape figures"
    eval_dir = Path(result["run_dir"]) / "eval"
    assert json.loads((eval_dir / "report.json").read_text())["shape"]["metrics"] == shape["metrics"]
    assert "`shape.trousers_to_skirt.iou`" in (eval_dir / "report.md").read_text()
    assert all((eval_dir / name).is_file() for name in shape["grids"].values())
