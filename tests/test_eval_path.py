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


def numpy_psnr(result: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of one image's pixels (any shape, data range 1), straight from the formula."""
    return float(10 * np.log10(1.0 / np.mean((result.astype(np.float64) - truth.astype(np.float64)) ** 2)))


def test_report_holds_exactly_the_documented_keys(tiny, tmp_path, monkeypatch):
    import catvton.eval.report as R
    from catvton.eval.report import (GROUP_KEYS, HIGHER_IS_BETTER, METRICS, MODELS, PER_IMAGE, REPORT_KEYS,
                                     TRANSFER_KEYS, evaluate)
    from catvton.infer.tryon import TryOn

    loads = []  # every pipeline the evaluation loads, by its LoRA (None: the base)
    real_load = TryOn.load.__func__
    monkeypatch.setattr(TryOn, "load", classmethod(lambda cls, cfg, lora=None, **kw: loads.append(lora)
                                                    or real_load(cls, cfg, lora=lora, **kw)))
    made = {}  # what each model generated: own garments first, then the swapped ones (evaluate's one call)
    real_generate = R.generate
    monkeypatch.setattr(R, "generate", lambda cfg, canvas, mask, seeds, lora=None, **kw: made.setdefault(
        "lora" if lora else "base", real_generate(cfg, canvas, mask, seeds, lora=lora, **kw)))
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
    # the PSNR figures against plain numpy on the generated arrays (not the report's own metric code)
    person, inside = canvas[:, :, w:].astype(np.float64), mask[:, :, w:] > 0.5
    grey = np.where(inside[..., None], 0.5, person)
    own = {"base": made["base"][:5, :, w:], "lora": made["lora"][:5, :, w:], "grey": grey}
    swapped = {"base": made["base"][5:, :, w:], "lora": made["lora"][5:, :, w:]}

    def masked_psnr(result, rows):
        return np.mean([numpy_psnr(r[m], p[m]) for r, p, m in zip(result[rows], person[rows], inside[rows])])

    for name, rows in (("lower", slice(0, 3)), ("full", slice(3, 5))):
        g = report["groups"][name]
        for model, result in own.items():
            assert g[model]["masked_psnr"] == pytest.approx(masked_psnr(result, rows), rel=1e-5), (name, model)
            whole = [numpy_psnr(r, p) for r, p in zip(result[rows], person[rows])]
            assert g[model]["half_psnr"] == pytest.approx(np.mean(whole), rel=1e-5), (name, model)
        for model, result in swapped.items():
            t = g["transfer"][model]
            assert t["swapped_masked_psnr"] == pytest.approx(masked_psnr(result, rows), rel=1e-5), (name, model)
    # and a known value: mid-grey against uniform [0, 1] pixels has an MSE of 1/12, 10.79 dB
    assert lower["grey"]["masked_psnr"] == pytest.approx(10 * np.log10(12), abs=0.3)
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
