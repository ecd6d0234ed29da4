"""The offline sweep end to end (marker ``slow``: about 4-6 CPU minutes): 2 learning rates x 2
ranks under ASHA, the winner exported to a release folder, then evaluated against the alpha base
through Ray Data batch inference, and the same LoRA on a VITON-HD-layout folder.

    python -m pytest -m slow tests/test_sweep.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from catvton.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150
SWEEP = [f"train.max_steps={STEPS}", "train.val_every=50", "train.checkpoint_every=150", "tune.grace_period=50",
         "train.val_batches=2", "run.wandb_mode=disabled", "run.samples=2"]

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session):
    from catvton.offline import resolve
    from catvton.train.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = resolve(load_config(ROOT / "configs/tiny.yaml", SWEEP + [f"run.output_dir={tmp}"]))
    return run_sweep(cfg, log=lambda s: None), cfg


def test_sweep_stops_a_trial_early_and_releases_the_best_completed_one(sweep):
    out, cfg = sweep
    trials = out.trials
    assert len(trials) == 4
    assert {(t["lr"], t["rank"]) for t in trials} == {(4e-3, 32), (4e-3, 8), (2e-4, 32), (2e-4, 8)}
    assert all(t["status"] in ("completed", "stopped early") for t in trials), trials
    stopped = [t for t in trials if t["status"] == "stopped early"]
    completed = [t for t in trials if t["status"] == "completed"]
    assert stopped, "ASHA stopped at least one trial at a rung"
    assert all(t["steps"] < STEPS for t in stopped) and all(t["steps"] == STEPS for t in completed)
    best = min(completed, key=lambda t: t["val_loss"])
    w = out.winner
    assert (w["lr"], w["rank"], w["val_loss"]) == (best["lr"], best["rank"], best["val_loss"])
    assert w["alpha"] == 2.0 * w["rank"]
    rel = out.release_dir
    for name in ("pytorch_lora_weights.safetensors", "training_config.json", "metrics.json", "trials.csv",
                 "trials.json", "sweep.png"):
        assert (rel / name).is_file(), name
    trained = json.loads((rel / "training_config.json").read_text())
    assert (trained["train"]["lr"], trained["lora"]["rank"]) == (w["lr"], w["rank"])
    # every trial left its TensorBoard events (the sweep can be watched in a dashboard)
    for t in completed:
        assert list((Path(t["run_dir"]) / "tensorboard").glob("events.out.tfevents.*"))


def test_the_winner_beats_the_alpha_base_on_lower_body(sweep, tmp_path):
    """Ray Data batch inference, fixed seeds: the LoRA's lower-body try-ons are closer to the
    ground truth inside the mask than the alpha base's and than a grey fill (masked PSNR and
    SSIM); report files exist."""
    from catvton.eval.report import evaluate
    from catvton.eval.samples import held_out_samples

    out, _ = sweep
    cfg = load_config(out.release_dir / "training_config.json")  # concrete folders: trained on resolved models
    samples = held_out_samples(cfg, "test", ("lower", "full"), max_per_group=24)
    assert samples["lower"]["canvas"].shape[0] == 24
    report = evaluate(cfg, out.release_dir, samples, tmp_path / "eval", ray_data=True, actors=1)
    lower = report["groups"]["lower"]
    assert lower["lora"]["masked_psnr"] > lower["base"]["masked_psnr"], lower
    assert lower["lora"]["masked_ssim"] > lower["base"]["masked_ssim"], lower
    assert lower["lora"]["masked_psnr"] > lower["grey"]["masked_psnr"], lower
    for name in ("report.json", "report.md", "grid_lower.png", "grid_full.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| lower (24 pairs) | masked_psnr |" in md
    # one seed per pair: results do not depend on how Ray Data batches the rows
    from catvton.eval.generate import generate

    c, m = samples["lower"]["canvas"][:3], samples["lower"]["mask"][:3]
    one = generate(cfg, c, m, [7, 8, 9], lora=out.release_dir, ray_data=True, batch_size=1)
    three = generate(cfg, c, m, [7, 8, 9], lora=out.release_dir, ray_data=True, batch_size=3)
    assert np.abs(one - three).max() < 1e-4
    assert np.abs(one[0] - generate(cfg, c[:1], m[:1], [8], lora=out.release_dir)[0]).max() > 1e-3


def test_evaluate_job_on_a_viton_folder(sweep, tmp_path):
    """ray_jobs/evaluate.py reads a VITON-HD-layout folder (tops) and writes its report."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_publish_eval import write_viton

    sys.path.insert(0, str(ROOT / "ray_jobs"))
    import evaluate as job

    out, _ = sweep
    write_viton(tmp_path / "viton", ["000001_00", "000002_00", "000003_00", "000004_00"])
    rc = job.main(["--lora", str(out.release_dir), "--viton", str(tmp_path / "viton"), "--out", str(tmp_path / "r")])
    assert rc == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    upper = report["groups"]["upper"]
    assert upper["pairs"] == 4 and set(upper["base"]) >= {"masked_psnr", "masked_ssim", "half_psnr", "half_ssim"}
    assert report["source"].startswith("VITON-HD")
    assert np.isfinite(upper["delta"]["masked_psnr"])
