"""The one evaluation path: generation gives the same results in-process and with Ray Data (one
seed per pair, whatever the batching), and the report holds exactly the documented keys.

Tiny base (no alpha), 32x32 halves, 2 denoising steps, a random LoRA: seconds, not minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_fill_case

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A config on the tiny base at 32x32 halves, a random LoRA folder on it, and 5 canvases."""
    return tiny_fill_case(tmp_path_factory.mktemp("lora"), n=5, steps=2)


@pytest.mark.ray
def test_in_process_and_ray_data_generation_agree_pair_by_pair(tiny, ray_session):
    from catvton.eval.generate import generate

    cfg, lora, canvas, mask = tiny
    seeds = [7, 8, 9, 10, 11]
    local = generate(cfg, canvas, mask, seeds, lora=lora, batch_size=5)
    ray = generate(cfg, canvas, mask, seeds, lora=lora, ray_data=True, batch_size=2)
    # the same stage, the same inputs: only float rounding of differently batched matmuls may differ
    assert np.abs(local - ray).max() < 1e-4
    alone = generate(cfg, canvas[2:3], mask[2:3], [9], lora=lora, batch_size=1)
    assert np.abs(alone[0] - local[2]).max() < 1e-4, "a pair's result does not depend on its batch"
    reseeded = generate(cfg, canvas[2:3], mask[2:3], [10], lora=lora)
    assert np.abs(reseeded[0] - local[2]).max() > 1e-3, "the pair's own seed sets its noise"
    base = generate(cfg, canvas[:2], mask[:2], seeds[:2])
    assert np.abs(base - local[:2]).max() > 1e-3, "the LoRA changes the results"


def test_report_holds_exactly_the_documented_keys(tiny, tmp_path, monkeypatch):
    from catvton.eval import metrics as M
    from catvton.eval.report import (GROUP_KEYS, HIGHER_IS_BETTER, METRICS, MODELS, PER_IMAGE, REPORT_KEYS,
                                     TRANSFER_KEYS, evaluate, grey_canvases)
    from catvton.infer.tryon import TryOn

    loads = []  # every pipeline the evaluation loads, by its LoRA (None: the base)
    real_load = TryOn.load.__func__
    monkeypatch.setattr(TryOn, "load", classmethod(lambda cls, cfg, lora=None, **kw: loads.append(lora)
                                                    or real_load(cls, cfg, lora=lora, **kw)))
    cfg, lora, canvas, mask = tiny
    w = canvas.shape[2] // 2
    region = mask[:, :, w:] > 0
    samples = {"lower": {"canvas": canvas[:3], "mask": mask[:3], "garment_mask": region[:3], "pid": ["a", "a", "b"]},
               "full": {"canvas": canvas[3:], "mask": mask[3:], "garment_mask": region[3:], "pid": ["c", "d"]}}
    report = evaluate(cfg, lora, samples, tmp_path, source="five random canvases")
    assert loads == [None, str(lora)], "each model is loaded once, for every group and both garments"
    assert list(report) == list(REPORT_KEYS)
    assert set(HIGHER_IS_BETTER) == set(METRICS) and MODELS == ("base", "lora", "grey")
    assert set(report["absent"]) <= {"lpips", "fid", "kid"}, "only network-based metrics may be absent"
    assert all(len(why) > 20 for why in report["absent"].values()), "an absent metric says why"
    for name, g in report["groups"].items():
        assert list(g) == list(GROUP_KEYS)
        assert g["metrics"] == [k for k in METRICS if k not in report["absent"]]
        assert set(g["metrics"]) >= set(PER_IMAGE)
        for model in MODELS:
            assert list(g[model]) == g["metrics"], (name, model)
        assert g["delta"] == {k: g["lora"][k] - g["base"][k] for k in g["metrics"]}
        for model in ("base", "lora"):
            t = g["transfer"][model]
            assert list(t) == list(TRANSFER_KEYS)
            assert t["margin_db"] == pytest.approx(t["own_masked_psnr"] - t["swapped_masked_psnr"])
            assert t["own_masked_psnr"] == pytest.approx(g[model]["masked_psnr"]), "own garments: the scored run"
            assert -1.0 <= t["colour_following"] <= 1.0
    lower = report["groups"]["lower"]
    assert (lower["pairs"], lower["pids"]) == (3, 2)
    grey = grey_canvases(canvas[:3], mask[:3])[:, :, w:]
    assert lower["grey"]["masked_psnr"] == pytest.approx(float(M.masked_psnr(grey, canvas[:3, :, w:], mask[:3, :, w:]).mean()))
    # the files hold the same report
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / "report.md").read_text()
    assert "| group | metric | base | LoRA | delta | grey fill |" in md and "| lower (3 pairs) | masked_psnr |" in md
    assert (tmp_path / "grid_lower.png").is_file() and (tmp_path / "grid_full.png").is_file()
    # documented where a user reads about releases
    release_doc = (ROOT / "docs" / "release.md").read_text()
    assert "| lower | margin_db |" in md and "| full | colour_following |" in md
    for key in METRICS + REPORT_KEYS + GROUP_KEYS + TRANSFER_KEYS:
        assert f"`{key}`" in release_doc, key


def test_colour_strength_is_how_much_of_a_colour_change_reaches_the_person():
    from catvton.eval import metrics as M

    given = np.random.default_rng(0).random((40, 3))
    assert M.colour_strength(given, given) == pytest.approx(1.0)
    hedged = 0.5 * given + 0.25  # half-way to an average colour: still perfectly correlated
    assert M.colour_strength(given, hedged) == pytest.approx(0.5)
    assert M.colour_following(given, hedged) == pytest.approx(1.0)
    assert M.colour_strength(given, np.full_like(given, 0.4)) == pytest.approx(0.0, abs=1e-9)
    flat = given.copy()
    flat[:, 1] = 0.3  # a channel that never varies is left out
    assert M.colour_strength(flat, np.stack([0.8 * flat[:, 0], flat[:, 1], 0.6 * flat[:, 2]], 1)) == pytest.approx(0.7)
