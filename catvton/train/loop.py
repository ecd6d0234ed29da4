"""The per-worker training loop that Ray Train runs on every worker.

It only wires things: the config and cache folder arrive as small plain values, each worker
loads the transformer and the prompt embeddings itself, reads its ``get_dataset_shard("train")``,
runs :func:`catvton.train.engine.train_step`, and reports metrics and checkpoints to Ray. Rank 0
also computes the fixed validation loss, tracks (TensorBoard, W&B), and draws the loss curve
and sample grids.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from catvton.artifacts import CHECKPOINTS_LOG, PLACEMENT_GROUP, REFUSED, RESUMES, STOPPED
from catvton.cache.read import decode_batch, load_manifest, load_samples, load_text_embeds, split_files
from catvton.config import Config, config_from_dict, steps_per_epoch, total_steps
from catvton.infer.tryon import TryOn, grid_image
from catvton.train.checkpoint import ResumeRefused, load_checkpoint, save_checkpoint, save_rank_rng
from catvton.train.engine import (TextContext, build_transformer, fill_loss, fixed_val_loss, make_optimizer,
                                  non_finite_message, train_step, trainable_parameters)
from catvton.train.progress import connect
from catvton.train.tracking import Tracker, plot_loss_curve


class WorkerHooks(Protocol):
    """Instrumentation a caller of :func:`catvton.train.job.fit` may hand every worker (tests inject
    a worker failure or dump each rank's weights with it). It travels in ``train_loop_config``,
    so it must be small and picklable by the workers. Production runs pass none."""

    def after_step(self, *, step: int, rank: int, world: int, run_dir: Path) -> None:
        """After each optimizer step (and its non-finite check), before the step is reported."""

    def at_end(self, *, model: torch.nn.Module, rank: int) -> None:
        """After the last step, with the trained (unwrapped) model."""


def record_start(run_dir: Path, step: int, resumed: str | None) -> None:
    """Rank 0, before the first step of every start: ``started at step S`` in
    :data:`CHECKPOINTS_LOG`, and a line in ``RESUMES`` when this start is a restart: ``resumed``
    (the checkpoint's resume line), or, when the workers found no checkpoint although an earlier
    start of this run is on record, ``restart N: no checkpoint reported yet, starting from step 0``
    (a lost resume is never silent)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / CHECKPOINTS_LOG
    earlier = record.read_text().splitlines() if record.is_file() else []
    starts = sum(line.startswith("started at step ") for line in earlier)
    line = resumed if resumed is not None else \
        f"restart {starts}: no checkpoint reported yet, starting from step 0" if starts else None
    if line is not None:
        with open(run_dir / RESUMES, "a") as f:
            f.write(line + "\n")
    with open(record, "a") as f:
        f.write(f"started at step {step}\n")


def record_checkpoint(run_dir: Path, step: int) -> None:
    """Rank 0, once ``ray.train.report`` with the checkpoint of ``step`` has returned:
    ``checkpoint reported at step N`` in :data:`CHECKPOINTS_LOG`.

    Returned is not yet registered: Ray Train registers a checkpoint when its controller has taken
    the report off every worker's one-slot result queue (it polls every 2 s). A worker's next
    report waits for its previous one to be taken, and every report starts at a barrier of all
    ranks; so once rank 0 has written two more checkpoint lines after it, every rank's report of this checkpoint was
    taken, and a restart resumes it or a later one."""
    with open(run_dir / CHECKPOINTS_LOG, "a") as f:
        f.write(f"checkpoint reported at step {step}\n")


VAL_ORDER = ["group", "pid", "person_pose"]
"""The columns that order the validation pairs (:func:`choose_val_rows`)."""
VAL_COLUMNS = ["group", "pid", "target", "masked", "mask"]
"""What a validation batch is decoded from (:func:`catvton.cache.read.decode_batch`)."""


def load_val_batches(cache: Path, manifest: dict, cfg: Config, device) -> list[dict[str, Any]]:
    """The first ``val_batches * batch_size`` validation pairs, balanced over groups, in a fixed
    order: the same samples in every run with the same cache.

    Only what is kept is read: the ordering columns of the whole split, then the latents and masks
    of the chosen pairs (at full size a row's latents are ~1.6 MB; the split's others, and every
    canvas PNG, stay on disk)."""
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(f) for f in split_files(cache, "val")]
    if not files:
        return []
    chosen = choose_val_rows([f.read(columns=VAL_ORDER) for f in files], cfg.train.val_batches * cfg.train.batch_size)
    table = read_kept_rows(files, chosen, VAL_COLUMNS)
    columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in VAL_COLUMNS}
    batches = []
    for i in range(0, len(chosen), cfg.train.batch_size):
        chunk = {c: v[i:i + cfg.train.batch_size] for c, v in columns.items()}
        batches.append(_to_device(decode_batch(chunk, manifest), device))
    return batches


def choose_val_rows(keys: list, n: int) -> list[tuple[int, int]]:
    """``(file, row)`` of the validation pairs to keep, in order, from each file's
    :data:`VAL_ORDER` columns (``keys``, pyarrow tables): every pair sorted by group, pid and
    person pose (ties in file order), then the first ``n // groups`` (at least 1) of each group."""
    import pandas as pd

    frame = pd.concat([k.to_pandas().assign(file=i, row=np.arange(k.num_rows)) for i, k in enumerate(keys)],
                      ignore_index=True).sort_values(VAL_ORDER, kind="stable")
    per_group = max(1, n // max(1, frame["group"].nunique()))
    kept = frame.groupby("group").head(per_group)  # in the sorted order
    return [(int(f), int(r)) for f, r in zip(kept["file"], kept["row"])]


def read_kept_rows(files: list, rows: list[tuple[int, int]], columns: list[str]):
    """The ``(file, row)`` ``rows`` of ``files`` (``pyarrow.parquet.ParquetFile``), in that order,
    as one pyarrow table. Parquet reads whole row groups: only those that hold one of ``rows`` are
    read (the cache build writes one per encoded block, a few rows of each split), one at a time."""
    import pyarrow as pa

    parts, where = [], []  # the rows taken from each row group read, and their (file, row)
    for i, f in enumerate(files):
        wanted = sorted(r for file, r in rows if file == i)
        starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
        groups = np.searchsorted(starts, wanted, side="right") - 1
        for g in sorted(set(groups.tolist())):
            local = [r - int(starts[g]) for r, k in zip(wanted, groups) if k == g]
            parts.append(f.read_row_group(g, columns=columns).take(local))  # a copy: the group is freed
            where += [(i, int(starts[g]) + r) for r in local]
    position = {row: k for k, row in enumerate(where)}
    return pa.concat_tables(parts).take([position[row] for row in rows])


def shard_micro_batches(shard, manifest: dict, cfg: Config, device, first_epoch: int) -> Iterator[tuple[int, dict]]:
    """``(epoch, micro-batch)`` from this worker's shard, epoch after epoch, forever. The order is
    the dataset's: :func:`catvton.train.job.training_dataset` shuffles all pairs globally, afresh
    every epoch. The stream runs on across epoch ends, so one optimizer step's accumulation may
    take micro-batches from two epochs."""
    epoch = first_epoch
    while True:
        for np_batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
            yield epoch, _to_device(decode_batch(np_batch, manifest), device)
        epoch += 1


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry. ``config``: ``cfg`` (Config.to_dict()), ``cache_dir``, ``run_dir``,
    ``log_every`` (steps between metric reports), ``hooks`` (a :class:`WorkerHooks` or None),
    ``progress`` (the driver's progress board, :func:`catvton.train.progress.connect`, or None)."""
    import ray.train
    import ray.train.torch
    import ray.util
    from ray.train import Checkpoint

    cfg = config_from_dict(config["cfg"])
    cache, run_dir = Path(config["cache_dir"]), Path(config["run_dir"])
    hooks: WorkerHooks | None = config.get("hooks")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.train.seed)

    manifest = load_manifest(cache)
    n_train = sum(manifest["counts"]["train"].values())
    total = total_steps(cfg, n_train, world)
    model = build_transformer(cfg, device, dtype)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(cfg, params, total)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    latent_hw = tuple(manifest["latent_shape"][1:])
    embeds = load_text_embeds(cache)  # no text encoder in a worker: T5-XXL alone is ~9.5 GB
    text = TextContext(embeds, latent_hw, device, dtype)

    step, history, resumed, note = 0, [], None, None  # note: the checkpoint's resume line
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        try:
            with checkpoint.as_directory() as d:
                step, history, note = load_checkpoint(Path(d), model, optimizer, scheduler, cfg, generator, total,
                                                      rank=rank, world=world)
        except ResumeRefused as e:
            # Every rank reads the same checkpoint and returns here. Returning (not raising)
            # keeps Ray from retrying; the driver raises the reason (job.fit).
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / REFUSED).write_text(f"{type(e).__name__}\n{e}\n")
            return
        if rank == 0:
            # "resumed from step 5 of 30", and why when the saved run planned another length
            resumed = f"resumed from step {step} of {total}{note.removeprefix(f'resumed from step {step}')}"
            print(f"[catvton] {resumed}")
    if rank == 0:  # the run's own record of where it (re)started
        record_start(run_dir, step, note)
    # No start-up broadcast (init_sync, torch >= 2.6): every rank already holds the same weights
    # (the base from the same files, the LoRA's A drawn after torch.manual_seed(train.seed) in
    # build_transformer and its B zero; on resume, the same checkpoint), and DDP's broadcast of
    # every parameter, the 11.9B frozen ones included, moved ~24 GB at every start and restart at
    # full size. DDP averages gradients only, so ranks that started apart would stay apart:
    # tests/test_train_state.py holds the ranks' weights bit-identical after training.
    ddp_model = model if world == 1 else ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"init_sync": False})

    tracker = Tracker(run_dir, cfg, enabled=rank == 0)
    if rank == 0:  # the driver frees it if Ray Train leaves it behind (see job.release_placement_group)
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / PLACEMENT_GROUP).write_text(pg.id.hex())
    val_batches = load_val_batches(cache, manifest, cfg, device) if rank == 0 else []
    samples = load_samples(cache) if rank == 0 else None
    last_checkpoint = config.get("last_checkpoint", "")
    progress = connect(config.get("progress")) if rank == 0 else None  # the driver's progress bar
    if progress is not None:
        progress.start(step, total, note=resumed)

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        nonlocal last_checkpoint
        if rank == 0:
            history.append(metrics)
            tracker.log(metrics, metrics["step"])
            if progress is not None:
                progress.post(metrics)
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(Path(tmp), model, optimizer, scheduler, metrics["step"], history, cfg, generator, total)
                plot_loss_curve(history, run_dir / "loss_curve.png", title=f"{cfg.run.name}: flow-matching loss")
                if samples is not None:
                    _sample_grid(model, samples, embeds, cfg, run_dir / f"samples_step{metrics['step']:06d}.png")
            else:  # its own noise state; Ray Train puts the files every rank reports into one checkpoint
                save_rank_rng(Path(tmp), rank, generator)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        if rank == 0:
            record_checkpoint(run_dir, metrics["step"])
        last_checkpoint = f"step {metrics['step']}"  # reported; Ray names its folder

    if step == 0 and rank == 0:
        m = {"step": 0, "epoch": 0, **fixed_val_loss(model, val_batches, text, cfg)}
        history.append(m)
        tracker.log(m, 0)

    loss_fn = functools.partial(fill_loss, text=text, cfg=cfg, generator=generator,
                                garment_dropout=cfg.train.garment_dropout)
    stream = shard_micro_batches(ray.train.get_dataset_shard("train"), manifest, cfg, device,
                                 first_epoch=step // steps_per_epoch(cfg, n_train, world))
    t0, steps_since = time.perf_counter(), 0
    while step < total:
        drawn = [next(stream) for _ in range(cfg.train.grad_accum)]
        epoch = drawn[-1][0]
        result = train_step(ddp_model, [batch for _, batch in drawn], loss_fn, optimizer, scheduler, params,
                            cfg.train.max_grad_norm)
        step += 1
        mean_loss = _all_mean(result.loss, world, device)
        if not math.isfinite(mean_loss):
            # Every rank sees the same all-reduced loss, so all stop here together. Stopping
            # cleanly (not raising) keeps Ray from retrying a run that would fail the same way.
            message = non_finite_message(mean_loss, step, last_checkpoint, storage=cfg.run.storage_path)
            if rank == 0:  # Ray's Result keeps checkpointed metrics: leave the reason in a file too
                (run_dir / STOPPED).write_text(message + "\n")
            ray.train.report({"step": step, "loss": mean_loss, "stopped": message})
            tracker.close()
            return
        if hooks is not None:
            hooks.after_step(step=step, rank=rank, world=world, run_dir=run_dir)
        steps_since += 1
        metrics = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": result.grad_norm, **_memory(device)}
        do_val = step % cfg.train.val_every == 0 or step == total
        do_ckpt = step % cfg.train.checkpoint_every == 0 or step == total
        if do_val and rank == 0:
            metrics.update(fixed_val_loss(model, val_batches, text, cfg))
        if do_val or do_ckpt or step % config.get("log_every", 5) == 0:
            # mean wall time of the steps since the last report, that report's cost included
            now = time.perf_counter()
            metrics["sec_per_step"] = (now - t0) / steps_since
            t0, steps_since = now, 0
            report(metrics, with_checkpoint=do_ckpt)
    if rank == 0:
        plot_loss_curve(history, run_dir / "loss_curve.png", title=f"{cfg.run.name}: flow-matching loss")
    tracker.close()
    if hooks is not None:
        hooks.at_end(model=model, rank=rank)


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _memory(device) -> dict[str, float]:
    """Peak resident memory of this worker process and, on a GPU, peak allocated CUDA memory."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _all_mean(value: float, world: int, device: torch.device) -> float:
    """The mean of ``value`` over the ``world`` workers, reduced on the training ``device``: with
    GPUs Ray Train's process group is NCCL, which reduces only CUDA tensors (a CPU tensor stops
    the run at the first report). float32, the type every backend reduces. The only cross-worker
    reduction of the loop (DDP all-reduces the gradients itself); a test holds it to that."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def _sample_grid(model, samples: dict[str, np.ndarray], embeds: dict[str, torch.Tensor], cfg: Config,
                 path: Path) -> None:
    """garment | masked person | result | ground truth, for the fixed validation pairs. The prompt
    comes from the cache's embeddings (``embeds``): no text encoder is built on a training GPU."""
    tryon = TryOn.from_parts(cfg, transformer=model, text_embeds=embeds)
    n = min(cfg.run.samples, len(samples["canvas"]))
    canvases = samples["canvas"][:n].astype(np.float32) / 255.0
    masks = samples["mask"][:n].astype(np.float32)
    was_training = model.training
    model.eval()
    results = tryon.fill_canvases(canvases, masks)
    model.train(was_training)
    grid_image(canvases, masks, results).save(path)
