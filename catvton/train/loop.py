"""The per-worker training loop that Ray Train runs on every worker.

It only wires things: the config and cache folder arrive as small plain values, each worker
loads the transformer and the prompt embeddings itself, reads its ``get_dataset_shard("train")``,
runs :func:`catvton.train.step.fill_loss`, and reports metrics and checkpoints to Ray. Rank 0
also computes the fixed validation loss, tracks (TensorBoard, W&B), and draws the loss curve
and sample grids.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catvton.config import Config, config_from_dict
from catvton.train import step as S



STOPPED = "STOPPED.txt"
"""Written to the run folder when the workers stop on a non-finite loss."""

RESUMES = "resumes.log"
"""One line per restart from a checkpoint (a worker failure or a rerun with the same name)."""

PLACEMENT_GROUP = ".placement_group"
"""The workers' placement group id, written by rank 0 for the driver."""


class NonFiniteLoss(RuntimeError):
    """Raised by the driver when the workers stopped on a NaN or infinite loss."""


def steps_per_epoch(n_train: int, cfg: Config, world: int) -> int:
    batches = math.ceil(n_train / (cfg.train.batch_size * world))
    return max(1, batches // cfg.train.grad_accum)


def total_steps(n_train: int, cfg: Config, world: int) -> int:
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(n_train, cfg, world)


def load_val_batches(cache: Path, manifest: dict, cfg: Config, device) -> list[dict[str, Any]]:
    """The first ``val_batches * batch_size`` validation pairs, balanced over groups, in a fixed
    order: the same samples in every run with the same cache."""
    import pyarrow.parquet as pq

    from catvton.data.encode import decode_batch, split_files

    files = split_files(cache, "val")
    if not files:
        return []
    table = pq.read_table(files).to_pandas()
    table = table.sort_values(["group", "pid", "person_pose"]).reset_index(drop=True)
    n = cfg.train.val_batches * cfg.train.batch_size
    groups = sorted(table["group"].unique())
    per_group = max(1, n // max(1, len(groups)))
    picked = [table[table["group"] == g].head(per_group) for g in groups]
    import pandas as pd

    table = pd.concat(picked).reset_index(drop=True)
    batches = []
    for i in range(0, len(table), cfg.train.batch_size):
        chunk = {c: table[c].to_numpy()[i:i + cfg.train.batch_size] for c in table.columns}
        b = decode_batch(chunk, manifest)
        batches.append({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()})
    return batches


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry. ``config``: ``cfg`` (Config.to_dict()), ``cache_dir``, ``run_dir``,
    ``fault_marker`` (test-only failure switch), ``dump_dir`` (test-only: each rank's weights at
    the end), ``log_every`` (steps between metric reports)."""
    import ray.train
    import ray.train.torch
    import ray.util
    from ray.train import Checkpoint

    from catvton.data.encode import decode_batch, load_manifest, load_text_embeds
    from catvton.train.tracking import Tracker, plot_loss_curve

    cfg = config_from_dict(config["cfg"])
    cache, run_dir = Path(config["cache_dir"]), Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.train.seed)

    manifest = load_manifest(cache)
    n_train = sum(manifest["counts"]["train"].values())
    total = total_steps(n_train, cfg, world)
    model = S.build_transformer(cfg, device, dtype)
    params = S.trainable_parameters(model)
    optimizer, scheduler = S.make_optimizer(cfg, params, total)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    latent_hw = tuple(manifest["latent_shape"][1:])
    text = S.TextContext(load_text_embeds(cache), latent_hw, device, dtype)

    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            step, history = S.load_checkpoint(Path(d), model, optimizer, scheduler, cfg, generator)
        if rank == 0:
            print(f"[catvton] resumed from step {step} of {total}")
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / RESUMES, "a") as f:  # the run's own record of where it restarted
                f.write(f"resumed from step {step}\n")
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    tracker = Tracker(run_dir, cfg, enabled=rank == 0)
    if rank == 0:  # the driver frees it if Ray Train leaves it behind (see job.release_placement_group)
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / PLACEMENT_GROUP).write_text(pg.id.hex())
    val_batches = load_val_batches(cache, manifest, cfg, device) if rank == 0 else []
    samples = _load_samples(cache) if rank == 0 else None
    last_checkpoint = config.get("last_checkpoint", "")

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        nonlocal last_checkpoint
        if rank == 0:
            history.append(metrics)
            tracker.log(metrics, metrics["step"])
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                S.save_checkpoint(Path(tmp), model, optimizer, scheduler, metrics["step"], history, cfg, generator)
                plot_loss_curve(history, run_dir / "loss_curve.png", title=f"{cfg.run.name}: flow-matching loss")
                if samples is not None:
                    _sample_grid(model, samples, cfg, run_dir / f"samples_step{metrics['step']:06d}.png")
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        last_checkpoint = f"step {metrics['step']}"  # reported; Ray names its folder

    if step == 0 and rank == 0:
        m = {"step": 0, "epoch": 0, **S.fixed_val_loss(model, val_batches, text, cfg)}
        history.append(m)
        tracker.log(m, 0)

    shard = ray.train.get_dataset_shard("train")
    epoch = step // max(1, steps_per_epoch(n_train, cfg, world))
    micro, window, t0, steps_since = 0, [], time.perf_counter(), 0
    while step < total:
        for np_batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=4 * cfg.train.batch_size,
                                           local_shuffle_seed=cfg.train.seed + epoch):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in decode_batch(np_batch, manifest).items()}
            loss = S.fill_loss(ddp_model, batch, text, cfg, generator) / cfg.train.grad_accum
            micro += 1
            sync = micro % cfg.train.grad_accum == 0
            if world > 1 and not sync:
                with ddp_model.no_sync():
                    loss.backward()
            else:
                loss.backward()
            window.append(float(loss.detach()) * cfg.train.grad_accum)
            if not sync:
                continue
            if cfg.train.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
            else:
                grad_norm = float("nan")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            mean_loss = _all_mean(sum(window) / len(window), world)
            window = []
            if not math.isfinite(mean_loss):
                # Every rank sees the same all-reduced loss, so all stop here together. Stopping
                # cleanly (not raising) keeps Ray from retrying a run that would fail the same way.
                message = (f"loss became {mean_loss} at step {step}; the run stopped. Last good checkpoint: "
                           f"{last_checkpoint or 'none yet'} (under {config['cfg']['run']['storage_path']}). "
                           "Lower train.lr or check the data.")
                if rank == 0:  # Ray's Result keeps checkpointed metrics: leave the reason in a file too
                    (run_dir / STOPPED).write_text(message + "\n")
                ray.train.report({"step": step, "loss": mean_loss, "stopped": message})
                tracker.close()
                return
            _maybe_inject_failure(config, step, rank, world)
            steps_since += 1
            metrics = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, **_memory(device)}
            do_val = step % cfg.train.val_every == 0 or step == total
            do_ckpt = step % cfg.train.checkpoint_every == 0 or step == total
            if do_val and rank == 0:
                metrics.update(S.fixed_val_loss(model, val_batches, text, cfg))
            if do_val or do_ckpt or step % config.get("log_every", 5) == 0:
                # mean wall time of the steps since the last report, report cost included
                metrics["sec_per_step"] = (time.perf_counter() - t0) / steps_since
                report(metrics, with_checkpoint=do_ckpt)
                t0, steps_since = time.perf_counter(), 0
            if step >= total:
                break
        epoch += 1
    if rank == 0:
        plot_loss_curve(history, run_dir / "loss_curve.png", title=f"{cfg.run.name}: flow-matching loss")
    tracker.close()
    if config.get("dump_dir"):  # test hook: every rank's trainable weights, to compare ranks
        Path(config["dump_dir"]).mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                   Path(config["dump_dir"]) / f"rank{rank}.pt")


def _memory(device) -> dict[str, float]:
    """Peak resident memory of this worker process and, on a GPU, peak allocated CUDA memory."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _all_mean(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


def _maybe_inject_failure(config: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Test-only: the last worker dies (once per run) at ``train.fail_at_step``."""
    fail_at = config["cfg"]["train"]["fail_at_step"]
    marker = config.get("fault_marker")
    if not fail_at or step != fail_at or rank != world - 1 or not marker or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"worker {rank} killed at step {step}\n")
    print(f"[catvton] fault injection: worker {rank} exits at step {step}", flush=True)
    os._exit(1)


def _load_samples(cache: Path) -> dict[str, np.ndarray] | None:
    path = cache / "samples.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _sample_grid(model, samples: dict[str, np.ndarray], cfg: Config, path: Path) -> None:
    """garment | masked person | result | ground truth, for the fixed validation pairs."""
    from catvton.infer.tryon import TryOn, grid_image

    tryon = TryOn.from_parts(cfg, transformer=model)
    n = min(cfg.run.samples, len(samples["canvas"]))
    canvases = samples["canvas"][:n].astype(np.float32) / 255.0
    masks = samples["mask"][:n].astype(np.float32)
    was_training = model.training
    model.eval()
    results = tryon.fill_canvases(canvases, masks)
    model.train(was_training)
    grid_image(canvases, masks, results).save(path)
