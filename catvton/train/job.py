"""The training job behind ``ray_jobs/train.py`` and ``easy_train.py test|full``: resolve the
base, build (or reuse) the latent cache, fit a ``TorchTrainer``, export the result.

Only small plain values go into ``train_loop_config`` (the config as a dict and folder paths);
every worker loads the model and reads its data shard itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from catvton import artifacts
from catvton.artifacts import FINAL_METRICS, LOSS_HISTORY, PLACEMENT_GROUP, READ_MODE, REFUSED, STOPPED
from catvton.cache.build import build_latent_cache
from catvton.cache.read import open_split, split_files
from catvton.config import Config, ConfigError
from catvton.ray_utils import run_logs
from catvton.train.checkpoint import REFUSALS, ResumeRefused
from catvton.train.engine import NonFiniteLoss
from catvton.train.loop import train_loop_per_worker
from catvton.train.progress import ProgressBar

@dataclass
class TrainOutcome:
    """What a finished run leaves, for the caller to print or test."""

    run_dir: Path
    """``<run.output_dir>/<run.name>``: loss curve, sample grids, TensorBoard, W&B, exported weights."""
    checkpoint: Any
    """Ray's latest ``ray.train.Checkpoint`` (None when none was reported). It lives in
    ``run.storage_path``, a local folder or ``s3://...``: read it with ``as_directory()`` or
    ``to_directory()``, never as a local path."""
    weights_dir: Path | None
    """``run_dir/lora`` (or ``run_dir/transformer`` for full fine-tuning): the exported weights."""
    metrics: dict
    """The last reported metrics."""
    cache_dir: Path
    config: Config
    history: list[dict] = field(default_factory=list)
    """Every reported step's metrics, from the latest checkpoint (also ``run_dir/loss_history.json``)."""
    read: str = ""
    """How the workers read the training split: ``stream`` or ``materialize`` (:func:`read_mode`)."""

    @property
    def checkpoint_uri(self) -> str | None:
        """Where the latest checkpoint is, as a user would type it: a local path or ``s3://...``."""
        return checkpoint_uri(self.checkpoint)


def checkpoint_uri(checkpoint) -> str | None:
    if checkpoint is None:
        return None
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def storage_path(cfg: Config) -> str:
    """Ray needs an absolute path or a URI."""
    p = cfg.run.storage_path
    return p if "://" in p else str(Path(p).expanduser().resolve())


SMALL_SPLIT_BYTES = 1 << 30
"""A training split smaller than this (1 GiB of parquet) is materialized in the object store: a
streaming read restarts every epoch, and on the 2-CPU default job that restart cost more than
the steps (measured: 0.06 s a step, 0.4 s a step with the restarts at 170 steps an epoch)."""


def split_bytes(cache_dir: Path, split: str) -> int:
    """Bytes of the split's parquet files in the latent cache."""
    return sum(Path(f).stat().st_size for f in split_files(cache_dir, split))


def read_mode(cluster_cpus: float, num_workers: int, cpus_per_worker: float, train_bytes: int,
              use_gpu: bool = False) -> tuple[bool, str]:
    """``(materialize, why)``: the job's own choice of how the workers read the training split.

    Materialized (held in the object store) when CPU workers would leave less than one of the
    ``cluster_cpus`` for Ray Data's read tasks (a streaming read would wait behind them), or when
    the split is under :data:`SMALL_SPLIT_BYTES`; streamed otherwise. Both modes survive a lost
    node (``cluster/node_loss_drill.py --read stream|materialize``): a stream restarts its read,
    held blocks are rebuilt from lineage.

    GPU workers (``use_gpu``) are judged without ``cluster_cpus``: each holds ``cpus_per_worker``
    CPUs of its GPU node and leaves the node's others to Ray Data. What the cluster shows when the
    job starts says nothing about those nodes: an autoscaling cluster (``cluster/aws-l40s.yaml``,
    ``min_workers: 0``) is then its head alone, with 0 CPUs for work, and the rule for CPU workers
    would hold every split in the object store. For CPU workers the count is the right one: they
    run on the cluster there is (a local Ray does not grow)."""
    free = cluster_cpus - num_workers * cpus_per_worker
    if not use_gpu and free < 1:
        return True, f"materialize: the training workers leave {free:g} CPU for Ray Data's read"
    if train_bytes < SMALL_SPLIT_BYTES:
        return True, f"materialize: the training split is {train_bytes / 2**20:.0f} MiB (< {SMALL_SPLIT_BYTES >> 20} MiB)"
    if use_gpu:
        return False, (f"stream: {train_bytes / 2**30:.1f} GiB training split; the {num_workers} GPU workers hold "
                       f"{num_workers * cpus_per_worker:g} CPUs of their GPU nodes, the nodes' other CPUs read")
    return False, f"stream: {train_bytes / 2**30:.1f} GiB training split, {free:g} CPUs free for the read"


def shared_storage_problems(cfg: Config, nodes_alive: int, node_resources: dict[str, float]) -> list[str]:
    """The run folders a run on several nodes cannot use: a relative ``run.storage_path`` or
    ``run.output_dir`` (each node would resolve it in its own working directory: the workers'
    checkpoints and files would scatter over the nodes, and a worker restarted elsewhere would not
    find them), when the workers may run on another node than this process.

    They may when the cluster has more than one node alive, or when this process's node
    (``node_resources``) cannot hold them: fewer GPUs or CPUs than they ask for. An autoscaling
    cluster at the job's start is its head alone (no GPU, 0 CPUs in ``cluster/``), and the workers
    go to the nodes it adds. One machine that holds its workers (the tiny default, a GPU box) is
    never refused. Absolute paths are taken as given (``/mnt/shared/...`` on the clusters here)."""
    t = cfg.train
    gpus, cpus = (t.num_workers if t.use_gpu else 0), t.num_workers * t.cpus_per_worker
    if nodes_alive > 1:
        where = f"the cluster has {nodes_alive} nodes"
    elif node_resources.get("GPU", 0) < gpus:
        where = f"this node has {node_resources.get('GPU', 0):g} of the {gpus} GPUs they ask for"
    elif node_resources.get("CPU", 0) < cpus:
        where = f"this node has {node_resources.get('CPU', 0):g} of the {cpus:g} CPUs they ask for"
    else:
        return []
    shared = {"storage_path": "/mnt/shared/ray (or s3://bucket/ray)", "output_dir": "/mnt/shared/outputs"}
    return [f"run.{key}={value}: a relative folder, and the training workers run on other nodes ({where}), where it "
            f"is another folder; set a folder every node shares: run.{key}={shared[key]}"
            for key, value in (("storage_path", cfg.run.storage_path), ("output_dir", cfg.run.output_dir))
            if "://" not in value and not Path(value).expanduser().is_absolute()]


def require_shared_storage(cfg: Config) -> None:
    """Raise :class:`catvton.config.ConfigError` with :func:`shared_storage_problems` of the
    running Ray cluster (before anything is built or written)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    node = next((n.get("Resources", {}) for n in alive if n.get("NodeID") == here), {})
    problems = shared_storage_problems(cfg, len(alive), node)
    if problems:
        raise ConfigError(problems)


def training_dataset(cache_dir: Path, seed: int, materialize: bool):
    """The training split as the workers read it: every pair in a fresh global order each epoch
    (Ray Train executes the dataset once an epoch, and ``reseed_after_execution`` derives each
    execution's shuffle seed from ``seed`` and the execution's index). The cache is written in pid
    order, so a local shuffle buffer would keep a batch within a few people.

    ``materialize``: read the split into the object store first. Workers holding every CPU would
    starve a streaming read, and a small split is cheaper to hold than to read again every epoch.
    The shuffle is an all-to-all of the split each epoch: on the production cache the latents
    move once an epoch through the object store. On held blocks its tasks ask for no CPU (like
    the read they replace, they must not wait behind workers that hold every CPU)."""
    from ray.data import RandomSeedConfig

    ds = open_split(cache_dir, "train")
    # no progress bars for the read and each epoch's shuffle (datasets derived from ``ds`` inherit
    # its context): one per epoch was most of the console; Ray Data's log files keep each execution
    ds.context.enable_progress_bars = False
    if materialize:
        ds = ds.materialize()
    seeds = RandomSeedConfig(seed=seed, reseed_after_execution=True)
    return ds.random_shuffle(seed=seeds, num_cpus=0) if materialize else ds.random_shuffle(seed=seeds)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name


LOG_EVERY = 25
"""Optimizer steps between metric reports. A report costs the 2-CPU default job ~1.7 s (Ray
Train's controller), 28x a tiny step: every 5 steps it was 85% of the job's time."""


def fit(cfg: Config, cache_dir: Path, log: Callable[[str], None] = print, log_every: int = LOG_EVERY,
        callbacks: list | None = None, materialize: bool | None = None, worker_hooks=None,
        progress: bool = False) -> TrainOutcome:
    """Fit the ``TorchTrainer`` for ``cfg`` on the latent cache; re-using ``run.name`` (with the
    same ``run.storage_path``) resumes that run from its latest checkpoint.

    ``callbacks``: Ray Train callbacks (a sweep passes ``TuneReportCallback``). ``materialize``:
    read the training split into the object store before training (None: the job's choice,
    :func:`read_mode`). ``worker_hooks``: a small picklable
    :class:`catvton.train.loop.WorkerHooks` every worker calls (tests inject faults with it).
    ``progress``: draw the run's progress bar on this console (:mod:`catvton.train.progress`);
    entry points turn it on, a fit inside a Tune trial leaves it off. With a local Ray started
    by :func:`catvton.ray_utils.init_ray`, Ray's logs of the run (workers' output, Ray Train's
    per-report lines, Ray Data's) end up in ``<run dir>/ray_logs``.
    Raises :class:`catvton.train.engine.NonFiniteLoss` when the workers stopped on a NaN or
    infinite loss, and :class:`catvton.train.checkpoint.ResumeRefused` when ``run.name`` names
    a run whose checkpoint this config must not resume (``ScheduleChanged``: past this config's
    different schedule; ``ModelChanged``: another model): nothing is exported then. Raises
    :class:`catvton.config.ConfigError` before anything runs when the workers will be on other
    nodes and a run folder is relative (:func:`shared_storage_problems`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    require_shared_storage(cfg)
    out_dir = run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    for reason in (STOPPED, REFUSED):  # left by an earlier attempt
        (out_dir / reason).unlink(missing_ok=True)
    if materialize is None:
        materialize, why = read_mode(ray.cluster_resources().get("CPU", 0), t.num_workers, t.cpus_per_worker,
                                     split_bytes(cache_dir, "train"), use_gpu=t.use_gpu)
    else:
        why = ("materialize" if materialize else "stream") + ": asked by the caller"
    with run_logs(out_dir, log), ProgressBar(cfg.run.name, enabled=progress, log=log) as bar:
        (out_dir / READ_MODE).write_text(why + "\n")
        train_ds = training_dataset(cache_dir, t.seed, materialize)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "cache_dir": str(cache_dir),
                "run_dir": str(out_dir),
                "log_every": log_every,
                "hooks": worker_hooks,
                "progress": bar.address(),
            },
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.cpus_per_worker}),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=storage_path(cfg),
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                failure_config=FailureConfig(max_failures=t.max_failures),
                callbacks=callbacks,
            ),
            datasets={"train": train_ds},
        )
        result = trainer.fit()
    release_placement_group(out_dir, log)
    if result.error is not None:
        raise result.error
    if (out_dir / REFUSED).is_file():
        kind, _, message = (out_dir / REFUSED).read_text().partition("\n")
        raise REFUSALS.get(kind, ResumeRefused)(message.strip())
    if (out_dir / STOPPED).is_file():
        last = f" Latest checkpoint: {checkpoint_uri(result.checkpoint)}." if result.checkpoint else ""
        raise NonFiniteLoss((out_dir / STOPPED).read_text().strip() + last)
    weights, history = None, []
    if result.checkpoint is not None:
        weights, history = export_weights(result.checkpoint, out_dir, cfg)
        (out_dir / LOSS_HISTORY).write_text(json.dumps(history, default=str) + "\n")
    metrics = dict(result.metrics or {})
    (out_dir / FINAL_METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return TrainOutcome(out_dir, result.checkpoint, weights, metrics, cache_dir, cfg, history,
                        "materialize" if materialize else "stream")


def ephemeral_paths_warning(cfg: Config, cwd: Path | None = None) -> str | None:
    """A warning when this process runs in Ray's temporary copy of a job's working dir (``ray job
    submit --working-dir``) and the run's folders are relative: they would be deleted with the
    Ray session, and a rerun could not resume."""
    cwd = (cwd or Path.cwd()).resolve()
    if "working_dir_files" not in cwd.parts:
        return None
    relative = [f"run.{k}={v}" for k, v in (("output_dir", cfg.run.output_dir), ("storage_path", cfg.run.storage_path))
                if "://" not in v and not Path(v).expanduser().is_absolute()]
    if not relative:
        return None
    return (f"warning: {', '.join(relative)} relative to Ray's temporary copy of the working dir ({cwd}): the LoRA, "
            "curves and checkpoints go away with the Ray session and a rerun cannot resume. Use shared storage, e.g. "
            "--set run.output_dir=/mnt/shared/outputs --set run.storage_path=/mnt/shared/ray (or s3://bucket/ray)")


def release_placement_group(out_dir: Path, log: Callable[[str], None] = print) -> bool:
    """Remove the workers' placement group if it outlived the finished ``fit`` (seen with Ray
    2.60 inside Tune trials, with several Ray instances on one machine): left alone it keeps its
    CPUs or GPUs reserved and the next trial waits for them forever. True if one was removed."""
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    marker = out_dir / PLACEMENT_GROUP
    if not marker.is_file():
        return False
    pg_id = marker.read_text().strip()
    marker.unlink()
    state = placement_group_table().get(pg_id, {}).get("state")
    if state in (None, "REMOVED"):
        return False
    from ray._raylet import PlacementGroupID

    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    log(f"[catvton] removed placement group {pg_id[:12]} that Ray Train left behind ({state})")
    return True


def run_job(cfg: Config, num_encoders: int = 1, log: Callable[[str], None] = print,
            progress: bool = False) -> TrainOutcome:
    """The whole job on a running Ray: build or reuse the latent cache, fit (``progress``: draw
    the progress bar, see :func:`fit`). ``cfg`` names concrete models (entry points pass offline
    names through :func:`catvton.offline.resolve`)."""
    require_shared_storage(cfg)  # before the cache build: a refused GPU job reads no data
    warning = ephemeral_paths_warning(cfg)
    if warning:
        log(warning)
    cache = build_latent_cache(cfg, num_encoders=num_encoders, use_gpu=cfg.train.use_gpu, log=log)
    return fit(cfg, cache, log=log, progress=progress)


def summary_lines(outcome: TrainOutcome) -> list[str]:
    """What a finished run prints: figures and where everything is."""
    m = outcome.metrics
    grids = sorted(outcome.run_dir.glob("samples_step*.png"))
    return [
        f"steps: {m.get('step')}   train loss: {m.get('loss', float('nan')):.4f}   "
        f"val loss: {m.get('val_loss', float('nan')):.4f}",
        f"weights:      {outcome.weights_dir}",
        f"loss curve:   {outcome.run_dir / 'loss_curve.png'}",
        f"sample grids: {grids[-1] if grids else '(none)'}",
        f"tensorboard:  tensorboard --logdir {outcome.run_dir / 'tensorboard'}",
        f"checkpoint:   {outcome.checkpoint_uri}",
    ]


def export_weights(checkpoint, out_dir: Path, cfg: Config) -> tuple[Path, list[dict]]:
    """Copy the trained weights out of Ray's ``checkpoint`` (local or on S3, read through its
    ``as_directory``) into ``out_dir/lora`` (or ``out_dir/transformer``) with the run's config as
    ``training_config.json``, atomically (:func:`catvton.artifacts.export_atomic`): never half a
    folder. Returns the folder and the checkpoint's loss history."""
    name = "lora" if cfg.train.method == "lora" else artifacts.FULL_WEIGHTS
    with checkpoint.as_directory() as d:
        src = Path(d)

        def fill(tmp: Path) -> None:
            if cfg.train.method == "lora":
                shutil.copy2(src / artifacts.LORA_WEIGHTS, tmp / artifacts.LORA_WEIGHTS)
            else:
                shutil.copytree(src / artifacts.FULL_WEIGHTS, tmp, dirs_exist_ok=True)
            shutil.copy2(src / artifacts.CHECKPOINT_CONFIG, tmp / artifacts.TRAINING_CONFIG)

        return artifacts.export_atomic(out_dir / name, fill), artifacts.loss_history(src)


def checkpoint_state(checkpoint) -> dict[str, Any]:
    """The training state (step, history, optimizer...) of a Ray ``checkpoint``, local or remote."""
    with checkpoint.as_directory() as d:
        return artifacts.load_training_state(d)
