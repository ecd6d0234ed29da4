"""Decisions the GPU job takes at its start, checked on a cluster without GPUs (issue 24).

An autoscaling cluster (``cluster/aws-l40s.yaml``: ``min_workers: 0``, a head with ``CPU: 0``)
has no GPU and no CPU for work when a job starts. What the job decides from then must come from
its config: the sweep's concurrency (a sweep that runs one trial at a time never asks the
autoscaler for a second node), the read mode (workers on GPU nodes leave those nodes' CPUs to
Ray Data: a big split streams), and shared storage (a relative folder is one per node).

The session's Ray (``tests/conftest.py``: 2 CPUs, 0 GPUs) is that cluster here, and
``configs/l40s.yaml`` (4 GPU workers) the config that asks for what it lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catvton import artifacts
from catvton.config import ConfigError, load_config

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
L40S = ROOT / "configs" / "l40s.yaml"


def production(tmp: Path, *overrides: str):
    """configs/l40s.yaml with its run folders under ``tmp`` (absolute, as on shared storage)."""
    return load_config(L40S, [f"run.storage_path={tmp / 'ray'}", f"run.output_dir={tmp / 'out'}", *overrides])


def fake_cache(folder: Path, train_bytes: int, pairs: int = 18001) -> Path:
    """A latent cache as far as the job's decisions read it: the manifest's counts and the size of
    the training split (a sparse file: ``train_bytes`` long, no disk used)."""
    split = folder / "split=train"
    split.mkdir(parents=True)
    with open(split / "part-0.parquet", "wb") as f:
        f.truncate(train_bytes)
    (folder / artifacts.MANIFEST).write_text(json.dumps({"counts": {"train": {"lower": pairs}, "val": {}, "test": {}}}))
    return folder


class Recorded(Exception):
    """Raised where the job would start reading data: the decisions are taken by then."""


class RecordingTuner:
    """Stands in for ``ray.tune.Tuner``: keeps what the sweep built it with."""

    built: list[dict] = []

    def __init__(self, trainable, param_space, tune_config, run_config):
        self.built.append({"param_space": param_space, "tune_config": tune_config})


def test_the_cluster_here_has_no_gpu(ray_session):
    assert ray_session.cluster_resources().get("GPU", 0) == 0
    assert load_config(L40S).train.num_workers == 4 and load_config(L40S).train.use_gpu


def test_a_gpu_sweep_started_on_a_cluster_without_gpus_lets_its_trials_ask_for_nodes(ray_session, tmp_path,
                                                                                    monkeypatch):
    """``_new_tuner`` as ``run_sweep`` calls it: with 0 GPUs in sight the sweep must still let
    several trials start, so that their workers' placement groups ask the autoscaler for nodes."""
    import ray.tune

    from catvton.train import sweep

    monkeypatch.setattr(ray.tune, "Tuner", RecordingTuner)
    monkeypatch.setattr(RecordingTuner, "built", [])
    cfg = production(tmp_path)
    sweep._new_tuner(cfg, sweep.run_trial, tmp_path / "cache", 4496, tmp_path / "out" / "sweep", lambda _: None)
    (built,) = RecordingTuner.built
    concurrent = built["tune_config"].max_concurrent_trials
    assert concurrent == cfg.tune.num_samples == 8, "one trial at a time never asks for a second node"
    # the trials' read mode is each trial's own, from its config and the split: not "materialize"
    # because the (empty) cluster's CPUs are fewer than the trials' workers ask for
    assert built["param_space"]["materialize"] is not True


def test_the_gpu_job_streams_a_big_split_though_the_head_has_no_cpu_for_it(ray_session, tmp_path, monkeypatch):
    """``fit`` as the job calls it, stopped where it would start reading: the read mode it chose
    for 4 GPU workers and a 2 GiB split, on a cluster of 2 CPUs (the head of the AWS cluster has
    0), is a stream."""
    from catvton.train import job

    def stop(cache_dir, seed, materialize):
        raise Recorded(materialize)

    monkeypatch.setattr(job, "training_dataset", stop)
    cfg = production(tmp_path)
    cache = fake_cache(tmp_path / "cache", 2 << 30)
    with pytest.raises(Recorded) as seen:
        job.fit(cfg, cache, log=lambda _: None)
    why = (job.run_dir(cfg) / artifacts.READ_MODE).read_text()
    assert seen.value.args == (False,), why
    assert why.startswith("stream"), why
    # a small split is still held in the object store, GPUs or not (cheaper than a read each epoch)
    monkeypatch.setattr(job, "split_bytes", lambda *_: 100 << 20)
    with pytest.raises(Recorded) as seen:
        job.fit(cfg, cache, log=lambda _: None)
    assert seen.value.args == (True,)


def test_a_gpu_job_with_a_relative_storage_path_is_refused_before_anything_runs(ray_session, tmp_path, monkeypatch):
    """The workers of 4 GPUs cannot run on this node (it has none): they will be on other nodes,
    where a relative folder is another folder. The refusal names what to set."""
    from catvton.train import job

    monkeypatch.setattr(job, "training_dataset", lambda *a: pytest.fail("a refused run must not read data"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(L40S, ["run.storage_path=outputs/ray", f"run.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError) as refused:
        job.fit(cfg, fake_cache(tmp_path / "cache", 2 << 30), log=lambda _: None)
    message = str(refused.value)
    assert "run.storage_path=outputs/ray" in message and "/mnt/shared/ray" in message and "s3://" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists(), "nothing was written"


def test_a_gpu_sweep_with_relative_run_folders_is_refused_before_its_cache_is_built(ray_session, tmp_path,
                                                                                   monkeypatch):
    from catvton.train import sweep

    monkeypatch.setattr(sweep, "build_latent_cache", lambda *a, **k: pytest.fail("refused before the cache build"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(L40S, ["run.output_dir=outputs", "run.storage_path=s3://bucket/ray"])
    with pytest.raises(ConfigError, match=r"run\.output_dir=outputs.*/mnt/shared/outputs"):
        sweep.run_sweep(cfg, log=lambda _: None)


def test_a_gpu_cache_build_sizes_its_stages_for_gpu_nodes_not_for_the_cpus_in_sight(ray_session, tmp_path):
    """The latent cache build on GPUs (the job's first step): 1 CPU per encoder actor and the
    read cut for a GPU node's CPUs, though the cluster shows 2 CPUs (the AWS head 0); a CPU
    build on this machine keeps the small machine's sizes."""
    from types import SimpleNamespace

    from catvton.cache import build

    rows = tmp_path / "rows.parquet"
    with open(rows, "wb") as f:
        f.truncate(4 << 30)
    source = SimpleNamespace(filesystem=None, files=[str(rows)])
    assert (build._cpus_per_actor(True), build._block_bytes(source, True)) == (1.0, (4 << 30) // 128)  # 64 blocks
    assert (build._cpus_per_actor(False), build._block_bytes(source, False)) == (0.25, 128 << 20)  # 8 blocks, capped


def test_the_production_preset_keeps_its_run_folders_on_shared_storage():
    """configs/l40s.yaml runs on several nodes: its folders are the shared ones every cluster
    config mounts (cluster/aws-l40s.yaml, cluster/kuberay/), with no --set needed."""
    run = load_config(L40S).run
    assert (run.storage_path, run.output_dir) == ("/mnt/shared/ray", "/mnt/shared/outputs")
