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


# --- how many trials at once (issue 24): decided from what is declared, not from an empty cluster ---


@pytest.mark.parametrize("live, declared, expected", [
    ({"CPU": 0}, None, 8),                        # the AWS head at the start: every trial, the autoscaler adds nodes
    ({"CPU": 48, "GPU": 4}, None, 8),             # one node up: still every trial (the cluster may grow)
    ({"CPU": 0}, {"CPU": 96, "GPU": 8}, 2),       # an autoscaler that declares 2 nodes of 4 GPUs: 2 fit
    ({"CPU": 0}, {"GPU": 400}, 8),                # never more than the search has trials
    ({"CPU": 96, "GPU": 16}, {"GPU": 8}, 4),      # never fewer than fit in the live cluster
])
def test_a_gpu_sweep_asks_for_what_its_config_and_the_declared_cluster_allow(live, declared, expected):
    from catvton.train.sweep import num_trials, sweep_concurrency

    cfg = load_config(ROOT / "configs" / "l40s.yaml")  # 8 random trials of 4 GPU workers
    assert num_trials(cfg) == 8
    assert sweep_concurrency(cfg, live, declared) == expected
    cfg.tune.max_concurrent_trials = 3  # the user's ceiling wins
    assert sweep_concurrency(cfg, live, declared) == 3


def test_a_cpu_sweep_keeps_counting_the_cpus_it_has():
    """The tiny default on a local Ray (which does not grow): the same arithmetic as before."""
    from catvton.train.sweep import max_concurrent_trials, num_trials, sweep_concurrency

    cfg = load_config(ROOT / "configs" / "tiny.yaml")  # grid 2 lr x 2 ranks, 1 CPU worker a trial
    assert num_trials(cfg) == 4
    for cpus, expected in ((2, 1), (4, 2), (16, 10)):
        live = {"CPU": cpus}
        assert sweep_concurrency(cfg, live, {"CPU": 64}) == max_concurrent_trials(cfg, live) == expected


def test_the_read_mode_of_gpu_workers_does_not_depend_on_the_cpus_in_sight():
    from catvton.train.job import SMALL_SPLIT_BYTES, read_mode

    for cpus in (0, 2, 192):  # the AWS head alone, a laptop, two g6e.12xlarge + head
        materialize, why = read_mode(cpus, 4, 1, 30 << 30, use_gpu=True)
        assert not materialize and why.startswith("stream: 30.0 GiB"), why
        assert read_mode(cpus, 4, 1, SMALL_SPLIT_BYTES - 1, use_gpu=True)[0]
    # CPU workers: the cluster there is decides, as before
    assert read_mode(2, 2, 1, 30 << 30) == (True, "materialize: the training workers leave 0 CPU for Ray Data's read")


@pytest.mark.parametrize("preset, overrides, nodes, node, refused", [
    ("tiny.yaml", [], 1, {"CPU": 2}, []),                                   # the default, relative folders, one node
    ("tiny.yaml", ["train.num_workers=2", "train.cpus_per_worker=0.5"], 1, {"CPU": 2}, []),
    ("tiny.yaml", [], 3, {"CPU": 2}, ["storage_path", "output_dir"]),       # several nodes
    ("tiny.yaml", ["train.num_workers=4"], 1, {"CPU": 2}, ["storage_path", "output_dir"]),  # workers elsewhere
    ("tiny.yaml", ["run.storage_path=s3://b/ray", "run.output_dir=/abs"], 3, {"CPU": 2}, []),
    ("l40s.yaml", ["run.storage_path=outputs/ray"], 1, {"CPU": 0}, ["storage_path"]),  # the AWS head alone
    ("l40s.yaml", ["run.storage_path=outputs/ray", "run.output_dir=out"], 1, {"CPU": 48, "GPU": 4}, []),  # a GPU box
    ("l40s.yaml", [], 1, {"CPU": 0}, []),                                   # the preset's own: /mnt/shared
])
def test_relative_run_folders_are_refused_only_where_workers_run_on_other_nodes(preset, overrides, nodes, node,
                                                                                refused):
    from catvton.train.job import shared_storage_problems

    problems = shared_storage_problems(load_config(ROOT / "configs" / preset, overrides), nodes, node)
    assert [p.split("=", 1)[0] for p in problems] == [f"run.{k}" for k in refused], problems
    assert all("set a folder every node shares" in p and "/mnt/shared/" in p for p in problems)
