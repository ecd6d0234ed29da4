"""The shape benchmark in the evaluation report (issue 26): the report writer puts each kind's
``shape.<kind>.iou`` / ``.psnr`` into report.json and a table into report.md, with a grid per kind;
and the try-on it measures is the service's request path (the config's mask rule on the case's worn
garment, the result pasted back at the photo's size, uint8). No model: planted results, and a stub
in place of the pipeline (:class:`catvton.infer.tryon.TryOn`'s ``fill_canvases``) behind the real
:class:`~catvton.infer.serving.TryOnService`. Cases drawn at 96 px, 3 a kind (the report draws 40 at 256).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT

from catvton.config import load_config
from catvton.data.masks import general_mask
from catvton.eval.report import HIGHER_IS_BETTER, write_evaluation
from catvton.eval.shape import (
    GRID_FILE,
    KIND_KEYS,
    SECTION_KEYS,
    evaluate_shape,
    service_tryon,
    shape_markdown,
    shape_section,
)
from catvton.infer.serving import ServeConfig, TryOnService
from catvton.offline.shape import SHAPE_KINDS, held_out_plans, shape_cases

SIZE, PER_KIND = 96, 3
RED = np.array([1.0, 0.0, 0.0], np.float32)


@pytest.fixture(scope="module")
def cases():
    return shape_cases(held_out_plans(load_config(ROOT / "configs" / "tiny.yaml").data), per_kind=PER_KIND, size=SIZE)


def _stack(cases, key):
    return np.stack([getattr(c, key) for c in cases])


def _report(shape: dict) -> dict:
    """A report with no garment groups and the shape section: what the writer needs, no model run."""
    return {"base": "tiny", "transformer_override": "tiny-alpha", "lora": "planted", "source": "planted results",
            "generation": "in-process", "seed": 0, "steps": 8, "guidance": 1.0, "groups": {}, "absent": {},
            "higher_is_better": HIGHER_IS_BETTER, "shape": shape}


def test_the_report_carries_shape_metrics_per_kind_and_a_table(cases, tmp_path):
    # planted: the base leaves the person as they are (IoU 0), the LoRA paints the truth (IoU 1)
    section = shape_section(cases, {"base": _stack(cases, "person"), "lora": _stack(cases, "truth")}, tmp_path)
    assert list(section) == list(SECTION_KEYS[:SECTION_KEYS.index("grids") + 1])
    section.update(seed=0, steps=8, guidance=1.0, mask_rules={"lower": "hull", "full": "hull"}, wall_s=0.0)
    write_evaluation(_report(section), tmp_path)

    report = json.loads((tmp_path / "report.json").read_text())
    shape = report["shape"]
    assert list(shape) == list(SECTION_KEYS) and shape["cases"] == PER_KIND * len(SHAPE_KINDS)
    assert set(shape["metrics"]) == {f"shape.{k}.{q}" for k in SHAPE_KINDS for q in ("iou", "psnr")}
    for kind in SHAPE_KINDS:
        k = shape["kinds"][kind]
        assert list(k) == list(KIND_KEYS) and k["n"] == PER_KIND
        assert shape["metrics"][f"shape.{kind}.iou"] == k["lora"]["iou"] == 1.0
        assert shape["metrics"][f"shape.{kind}.psnr"] == k["lora"]["psnr"] >= 99.0
        assert k["base"]["iou"] == 0.0 and k["base"]["psnr"] < 15.0
        assert k["delta"]["iou"] == 1.0
        assert (tmp_path / GRID_FILE.format(kind=kind)).is_file()
        assert shape["grids"][kind] == GRID_FILE.format(kind=kind)

    md = (tmp_path / "report.md").read_text()
    assert shape_markdown(shape) in md
    assert "| metric | cases | base | LoRA | delta |" in md and "masks lower: hull, full: hull" in md
    assert f"| `shape.trousers_to_skirt.iou` | {PER_KIND} | 0.000 | 1.000 | +1.000 |" in md
    psnr = shape["kinds"]["top_trousers_to_dress"]
    assert (f"| `shape.top_trousers_to_dress.psnr` | {PER_KIND} | {psnr['base']['psnr']:.2f} | "
            f"{psnr['lora']['psnr']:.2f} | {psnr['delta']['psnr']:+.2f} |") in md
    assert all(f"![{kind}]({GRID_FILE.format(kind=kind)})" in md for kind in SHAPE_KINDS)


class PaintRed:
    """Stands in for :class:`catvton.infer.tryon.TryOn` (its ``fill_canvases``): paints the mask
    canvas red, as a generated result pasted back inside the mask; records each call's seeds."""

    def __init__(self):
        self.seeds: list[list[int]] = []

    def fill_canvases(self, canvases, masks, seed=None, steps=None, guidance=None):
        self.seeds.append(list(seed))
        assert canvases.dtype == np.float32 and canvases.shape[:3] == masks.shape
        m = masks[..., None]
        return canvases * (1 - m) + RED * m


@pytest.mark.parametrize("rule", ["hull", "box_to_bottom"])
def test_the_service_path_dresses_each_case_at_its_photo_size_under_the_mask_rule(cases, rule):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"mask.lower_rule={rule}", f"mask.full_rule={rule}"])
    stub = PaintRed()
    tryon = service_tryon(TryOnService(ServeConfig(), cfg, stub, None), seed=5)
    of_kind = [c for c in cases if c.kind == "trousers_to_skirt"]
    out = tryon(of_kind)
    assert out.shape == (PER_KIND, SIZE, SIZE, 3) and out.dtype == np.uint8
    assert stub.seeds == [[5, 6, 7]], "one request a case, case i with seed + i"
    for img, c in zip(out, of_kind):
        general = general_mask(c.mask, c.group, cfg.mask)  # the config's rule on the worn garment's mask
        changed = (img != c.person).any(axis=-1)
        assert not (changed & ~general).any(), "outside the general mask every pixel is the photo's own"
        assert changed.sum() >= 0.5 * general.sum()
        assert (img[changed] == (255, 0, 0)).all(axis=-1).mean() > 0.9
    # the whole benchmark on it: every kind dressed, n per kind
    summary, _, results = evaluate_shape(cases, tryon)
    assert results.shape == (len(cases), SIZE, SIZE, 3) and results.dtype == np.uint8
    assert {k: v["n"] for k, v in summary.items()} == {k: PER_KIND for k in SHAPE_KINDS}
    assert all(v["iou"] == 0.0 for v in summary.values()), "red is no case's garment colour"
