"""The production sweep's length (issue 11, item 2): ``configs/l40s.yaml`` sets ``train.epochs``
and no ``train.max_steps``, so every trial runs ``epochs`` passes over the cache's training pairs,
and ASHA's rungs are counted against that. No Ray cluster, no cache build: a manifest stands in
for the latent cache (only its training counts are read).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catvton import artifacts
from catvton.config import ConfigError, load_config, sweep_problems

ROOT = Path(__file__).resolve().parents[1]


def fake_cache(folder: Path, train_counts: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / artifacts.MANIFEST).write_text(json.dumps({"counts": {"train": train_counts, "val": {}, "test": {}}}))
    return folder


class RecordedAsha:
    """Stands in for Ray's ASHAScheduler: keeps the arguments it was built with."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_the_production_sweep_runs_its_epochs_and_asha_counts_the_same_steps(tmp_path, monkeypatch):
    import ray.tune.schedulers

    from catvton.train.sweep import asha_scheduler, trial_row, trial_steps

    cfg = load_config(ROOT / "configs" / "l40s.yaml")
    assert (cfg.train.max_steps, cfg.train.epochs) == (0, 8)
    assert sweep_problems(cfg) == [], "the advertised sweep command is not refused before it starts"

    cache = fake_cache(tmp_path / "cache", {"lower": 9000, "full": 6000, "upper": 3001})  # 18,001 pairs
    # 4 workers x batch 2 = 8 pairs a batch: ceil(18001 / 8) = 2251 batches a worker-epoch,
    # // 4 accumulation = 562 optimizer steps an epoch, x 8 epochs
    steps = trial_steps(cfg, cache)
    assert steps == 4496
    assert sweep_problems(cfg, 18001) == []

    monkeypatch.setattr(ray.tune.schedulers, "ASHAScheduler", RecordedAsha)
    asha = asha_scheduler(cfg, steps).kwargs
    assert asha["time_attr"] == "step" and asha["max_t"] == 4496
    assert asha["grace_period"] == 400 and asha["grace_period"] % cfg.train.val_every == 0
    assert asha["grace_period"] < asha["max_t"]

    # a trial is completed when it ran the derived length, stopped early when ASHA cut it
    done = trial_row({"step": 4496}, {"lr": 1e-4, "rank": 16}, "/x/t1", None, None, cfg, steps)
    cut = trial_row({"step": 800}, {"lr": 1e-4, "rank": 16}, "/x/t2", None, None, cfg, steps)
    assert (done["status"], cut["status"]) == ("completed", "stopped early")


def test_a_derived_length_shorter_than_the_grace_period_is_refused_with_the_numbers(tmp_path):
    from catvton.train.sweep import trial_steps

    cfg = load_config(ROOT / "configs" / "l40s.yaml")
    cache = fake_cache(tmp_path / "small", {"lower": 500, "full": 300})  # 800 pairs: 25 steps an epoch, 200 in all
    with pytest.raises(ConfigError) as e:
        trial_steps(cfg, cache)
    assert e.value.problems == [
        "tune.grace_period=400: ASHA's first rung must come before a trial's last step (8 epochs of 800 training "
        "pairs = 200 steps), or it can stop no trial early; lower it or train longer"]
    # a fixed length is checked before any cache exists
    tiny = load_config(ROOT / "configs" / "tiny.yaml", ["train.max_steps=100"])  # grace_period 100
    assert sweep_problems(tiny) == [
        "tune.grace_period=100: ASHA's first rung must come before a trial's last step (train.max_steps=100), or "
        "it can stop no trial early; lower it or train longer"]
