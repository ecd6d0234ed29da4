"""The GPU job, checked on a CPU: FLUX.1-Fill-dev's full-size step on the ``meta`` device, and its
memory and FLOPs measured under ``FakeTensorMode``. No GPU, no weights, no download::

    python -m catvton.train.dryrun --config configs/l40s.yaml               # ~4 minutes (3:54 measured)
    python -m catvton.train.dryrun --config configs/l40s.yaml --rows all    # + the 8-row table, ~25 CPU minutes
    python -m catvton.train.dryrun --config configs/l40s.yaml --blocks 1 1  # full width, 1+1 blocks (~1 min)
    python -m catvton.train.dryrun --config configs/l40s.yaml --placement-only   # the meta run only

**Placement** (``meta``). The job's own functions, in the order a worker and a Serve replica call
them, on a weightless FLUX.1-Fill-dev folder (:mod:`catvton.model.skeleton`) loaded by the
project's loaders inside :func:`catvton.model.loading.weightless`: the LoRA build
(:func:`~catvton.train.engine.build_transformer`), one optimizer step at the preset's batch, canvas and
accumulation (:func:`~catvton.train.engine.train_step`: forward, backward, clipping, AdamW, schedule),
the fixed validation loss, a checkpoint save and resume load, rank 0's sample grid, and one try-on
of a Serve replica at the production serve config (``serve/config.l40s.yaml``), batch 1 and its
``max_batch_size``. Every model lives on ``meta`` as it would on ``cuda``; a tensor made on the CPU
without ``device=`` next to them fails as it would on a GPU ("Tensor on device meta is not on the
expected device cpu"), and the run stops naming the project's file and line. What ``meta`` cannot
answer (a loss as a float, a checkpoint's bytes, a picture) goes through :mod:`catvton.model.host`.
Meta's blind spot: a CPU ``generator`` passed to ``torch.randn(..., device="meta")`` passes while
CUDA refuses it; the code draws on the generator's own device and moves the result (read
``flow.sample_sigmas``).

**Memory and FLOPs**: the same step under ``FakeTensorMode``, by :mod:`catvton.train.measure`;
its rows are printed as a table, each training row beside the planner's figures for the same step.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from catvton.config import Config, ConfigError, load_config
from catvton.model.loading import weightless
from catvton.model.skeleton import write_skeleton
from catvton.train import engine
from catvton.train.checkpoint import load_checkpoint, save_checkpoint
from catvton.train.full_size import (
    REPO,
    SERVE_CONFIG,
    cache_batch,
    dry_config,
    latent_hw,
    load_service,
    model_dims,
    sample_rows,
    serve_request,
    serve_settings,
    text_embeds,
    to_device,
)
from catvton.train.measure import (
    CONTEXT_BYTES,
    GB,
    SLACK,
    TABLE_FOOT,
    TABLE_HEAD,
    Measured,
    measure_grid,
    measure_serving,
    measure_step,
    table_line,
    with_plan,
)

TRACE_ROOTS = ("catvton", "serve", "ray_jobs")
"""Where a failure's frame is looked for: the project's code, not torch's."""


class DryRunFailed(RuntimeError):
    """A stage of the dry run failed; ``where`` is the project's innermost frame (``file:line``)."""

    def __init__(self, stage: str, error: BaseException, frames: list[tuple[str, str]]):
        self.stage, self.error = stage, error
        self.where, self.code = frames[-1] if frames else ("(no frame in the project's code)", "")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        via = "".join(f"\n  called from {w}" for w, _ in reversed(frames[:-1][-3:]))
        super().__init__(f"{stage}: {type(error).__name__}: {first}\n  at {self.where}\n    {self.code}{via}")


def _project_frames(tb) -> list[tuple[str, str]]:
    """The traceback's frames in the project's own code, outermost first: ``(file:line in function,
    source line)``."""
    found = []
    for frame in traceback.extract_tb(tb):
        try:
            rel = Path(frame.filename).resolve().relative_to(REPO)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in TRACE_ROOTS and rel.name != "dryrun.py":
            found.append((f"{rel}:{frame.lineno} in {frame.name}", (frame.line or "").strip()))
    return found


STAGE_SECONDS: dict[str, float] = {}
"""Seconds each stage of the last placement check took (printed with ``--verbose``)."""


def stage(name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; any error becomes :class:`DryRunFailed` naming the project's file and line."""
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure of the job's code is the finding
        raise DryRunFailed(name, e, _project_frames(e.__traceback__)) from e
    finally:
        STAGE_SECONDS[name] = time.perf_counter() - t0


def check_placement(cfg: Config, base: Path, out: Path, serve_config: Path | None, log=print) -> dict[str, Any]:
    """Every stage of the worker and the replica on ``meta``; raises :class:`DryRunFailed`."""
    from catvton.train.loop import _sample_grid

    device = torch.device("meta")
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    text_dim, pooled_dim = model_dims(base)
    done: dict[str, Any] = {}
    t0 = time.perf_counter()
    with weightless():
        model = stage("build (load + LoRA)", lambda: engine.build_transformer(cfg, device, dtype))
        params = engine.trainable_parameters(model)
        total = 10
        optimizer, scheduler = engine.make_optimizer(cfg, params, total)
        generator = torch.Generator().manual_seed(cfg.train.seed * 1000)
        embeds = text_embeds(cfg, g, text_dim, pooled_dim)
        text = stage("text context", lambda: engine.TextContext(embeds, latent_hw(cfg), device, dtype))
        micro = [to_device(cache_batch(cfg, cfg.train.batch_size, g), device) for _ in range(cfg.train.grad_accum)]
        loss_fn = functools.partial(engine.fill_loss, text=text, cfg=cfg, generator=generator,
                                    garment_dropout=cfg.train.garment_dropout)
        stage("validation loss (step 0)", lambda: engine.fixed_val_loss(model, micro[:1], text, cfg))
        stage("training step", lambda: engine.train_step(model, micro, loss_fn, optimizer, scheduler, params,
                                                         cfg.train.max_grad_norm))
        done["trainable_params"] = sum(p.numel() for p in params)
        done["params"] = sum(p.numel() for p in model.parameters())
        ckpt = out / "checkpoint"
        stage("checkpoint save", lambda: save_checkpoint(ckpt, model, optimizer, scheduler, 1, [{"step": 1}], cfg,
                                                         generator, total))
        stage("checkpoint resume", lambda: load_checkpoint(ckpt, model, optimizer, scheduler, cfg, generator, total))
        samples = sample_rows(cfg, cfg.run.samples)
        stage("rank 0 sample grid", lambda: _sample_grid(model, samples, embeds, cfg, out / "grid.png"))
        if serve_config is not None:
            settings = serve_settings(serve_config, ckpt, base)
            service = stage("Serve replica load", lambda: load_service(settings, "meta"))
            for n in sorted({1, settings.max_batch_size}):
                stage(f"Serve try-on, batch {n}", lambda n=n: serve_request(service, n))
            done["serve_max_batch"] = settings.max_batch_size
    done["seconds"] = time.perf_counter() - t0
    log(f"placement: every stage ran on meta ({done['seconds']:.0f} s): build, validation loss, training step "
        f"(batch {cfg.train.batch_size} x {cfg.train.grad_accum}), checkpoint save + resume, sample grid"
        + (f", Serve try-on at batch 1 and {done['serve_max_batch']}" if "serve_max_batch" in done else ""))
    return done


def quiet_libraries() -> None:
    """Library chatter off the console: the dry run loads models without weights on purpose."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", message=".*(meta parameter|copying from a non-meta).*")
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # NaN pictures from meta
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m catvton.train.dryrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "l40s.yaml"), help="the job's config (default: configs/l40s.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override on top of the config (repeatable)")
    p.add_argument("--blocks", nargs=2, type=int, metavar=("D", "S"),
                   help="double and single blocks (default FLUX's 19 and 38); full width and canvas always")
    p.add_argument("--serve-config", default=SERVE_CONFIG, help="serve config whose replica is checked ('' skips it)")
    p.add_argument("--placement-only", action="store_true", help="only the meta run (seconds), no memory rows")
    p.add_argument("--rows", choices=["preset", "all"], default="preset",
                   help="preset: the config's own step, rank 0's sample grid and the Serve replica (~5 CPU minutes at "
                        "full depth); all: + batch 1/2 x rank 16/64 x checkpointing on/off (~2.5 CPU minutes a row)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"config: {e}", file=sys.stderr)
        return 2
    serve_path = (REPO / a.serve_config) if a.serve_config else None
    if serve_path is not None and not serve_path.is_file():
        print(f"--serve-config {serve_path} does not exist ('' skips the Serve stages)", file=sys.stderr)
        return 2
    blocks = tuple(a.blocks) if a.blocks else None
    result: dict[str, Any] = {"config": a.config, "overrides": a.overrides, "blocks": blocks,
                              "canvas": [cfg.canvas.half_width, cfg.canvas.half_height],
                              "context_bytes": CONTEXT_BYTES, "slack": SLACK}
    with tempfile.TemporaryDirectory(prefix="catvton-dryrun-") as tmp:
        base = write_skeleton(Path(tmp) / "flux-fill", blocks)
        dcfg = dry_config(cfg, base, Path(tmp))
        h, w = latent_hw(dcfg)
        print(f"dry run of {a.config}: FLUX.1-Fill-dev at full width, "
              f"{'19 + 38' if blocks is None else f'{blocks[0]} + {blocks[1]}'} blocks, canvas 2 x "
              f"{cfg.canvas.half_width}x{cfg.canvas.half_height} ({h * w // 4} image + {cfg.model.max_sequence_length} "
              f"text tokens), batch {cfg.train.batch_size} x {cfg.train.grad_accum}, LoRA r{cfg.lora.rank}")
        try:
            result["placement"] = check_placement(dcfg, base, Path(tmp), serve_path)
        except DryRunFailed as e:
            print(f"dry run FAILED in {e}", file=sys.stderr)
            result["failed"] = {"stage": e.stage, "where": e.where, "error": str(e.error).splitlines()[0]}
            _write(a.json, result)
            return 1
        result["params"] = result["placement"]["params"]
        if a.placement_only:
            _write(a.json, result)
            return 0
        t = dcfg.train
        specs = [(t.batch_size, dcfg.lora.rank, t.gradient_checkpointing, "preset step")]
        if a.rows == "all":
            specs += [(b, r, ck, "") for ck in (True, False) for r in (16, 64) for b in (1, 2)]
        rows: list[Measured] = []

        def add(row: Measured) -> None:  # printed and saved as measured: a long run keeps what it did
            rows.append(row)
            print(f"{table_line(row)}   ({row.seconds:.0f} s)", flush=True)
            result["rows"] = [r.to_dict() for r in rows]
            _write(a.json, result, quiet=True)

        print(TABLE_HEAD + "\n" + "-" * len(TABLE_HEAD), flush=True)
        accum = min(2, t.grad_accum)
        for batch, rank, ck, name in specs:
            add(with_plan(measure_step(dcfg, batch, rank, ck, accum=accum, name=name), dcfg, base, accum))
        grid = measure_grid(dcfg)
        add(grid)
        if serve_path is not None:
            settings = serve_settings(serve_path, None, base)
            for row in measure_serving(settings, sorted({1, settings.max_batch_size})):
                add(row)
        print(TABLE_FOOT)
        preset = rows[0]
        result["training_peak_bytes"] = max(preset.total, grid.total)
        result["serving_peak_bytes"] = max((r.total for r in rows if r.name.startswith("serve")), default=None)
        print(f"training peak of this config (its step, and rank 0's sample grid beside the training state; "
              f"context and slack included): {result['training_peak_bytes'] / GB:.1f} GB a GPU")
        if result["serving_peak_bytes"] is not None:
            print(f"serving peak at max_batch_size {settings.max_batch_size}: {result['serving_peak_bytes'] / GB:.1f} GB "
                  "a replica")
    _write(a.json, result)
    return 0


def _write(path: str | None, result: dict, quiet: bool = False) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        if not quiet:
            print(f"written to {path}")


if __name__ == "__main__":
    sys.exit(main())
