"""The roadmap's commands, on top of the same library as the Ray jobs.

    python easy_train.py setup                                  # offline: synthetic rows, tiny canvas
    python easy_train.py setup --data SaffalPoosh/deepFashion-with-masks --config configs/l40s.yaml
    python easy_train.py setup --data /path/to/folder --out outputs/setup   # local hub-layout parquet
    python easy_train.py test                                   # a short proof run (tens of steps)
    python easy_train.py full --epochs 10 --config configs/l40s.yaml

``setup`` validates every row in parallel with Ray Data and writes a readiness report:
``dataset_report.json``, ``dataset_report.md`` and ``samples_<group>.png`` grids. ``test`` prints
the memory/FLOP plan of the transformer the config trains (the tiny model's own on the CPU
preset), refuses a GPU run that cannot fit the named GPU, runs the same Ray job for a few steps
and writes a loss curve, a memory report and the problems it found. ``full`` prints the same plan
and runs the whole job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "tiny.yaml"

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Teach CatVTON-Flux new garments (pants, skirts, dresses) with LoRA on Ray. Start with `setup`.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML preset (configs/tiny.yaml: offline CPU; configs/l40s.yaml: production).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Dotted override, repeatable: --set data.seed=3 --set canvas.half_width=576.")]
NoDashboardOpt = Annotated[bool, typer.Option("--no-dashboard", help="Start the local Ray without its dashboard (a few seconds less at start-up); ignored on a cluster (RAY_ADDRESS).")]


def _load(config: Path, overrides: list[str]):
    from catvton.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


@app.command()
def setup(
    data: Annotated[Optional[str], typer.Option(help="Rows to check: 'synthetic', a hub dataset id (SaffalPoosh/deepFashion-with-masks) or a folder with data/train-*.parquet. Default: the config's data.source.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for dataset_report.json / .md, samples_<group>.png and the mask_placement.png / mask_suspicious.png grids.")] = Path("outputs/setup"),
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    num_actors: Annotated[int, typer.Option(help="Validation tasks at once (each takes one CPU; default: the CPU count).")] = max(1, (os.cpu_count() or 2) - 0),
) -> None:
    """Validate the dataset and write a readiness report (exit code 1 when it is not ready, 2 when
    the source cannot be read: the hub unreachable, a shard missing or unreadable)."""
    from catvton.data.report import write_report
    from catvton.data.scan import scan
    from catvton.data.source import SourceError, check_files, resolve_source
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray

    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data.source={data}")
    cfg = _load(config, overrides)
    typer.echo(f"data source: {cfg.data.source}")
    cfg = resolve(cfg, models=False)  # the synthetic set, built once when asked for
    try:  # the hub unreachable, a shard missing or unreadable: a short message, not a traceback
        source = resolve_source(cfg.data)
        n_rows = sum(check_files(source).values())
    except SourceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{len(source.files)} parquet file(s), {n_rows} rows; validating every row with Ray Data ...")
    init_ray()
    rows = scan(source, cfg, num_actors=num_actors, progress=True)
    report = write_report(out, rows, cfg, source.name)
    typer.echo("")
    typer.echo(f"rows: {report['rows_valid']} valid of {report['rows_total']}; bad: {json.dumps(report['bad_rows'])}")
    typer.echo(f"pairs (train/val/test x upper/lower/full): {json.dumps(report['pairs'])}")
    typer.echo("masks look like: " + ", ".join(f"{g} {k['kind']}" for g, k in report["mask_kinds"].items()))
    for g, why in report["mask_not_judged"].items():
        typer.echo(f"  {g}: {why}")
    typer.echo(f"ready: {report['ready']}")
    for r in report["reasons"]:
        typer.echo(f"  - {r}")
    typer.echo(f"wrote {out / 'dataset_report.json'}, {out / 'dataset_report.md'}, "
               + ", ".join(str(out / g) for g in report["sample_grids"] + report["mask_grids"]))
    if not report["ready"]:
        raise typer.Exit(1)


def _plan_or_refuse(cfg, gpu: str) -> None:
    """The memory plan of the transformer this run trains, printed before training: the model the
    config names, resolved as the job resolves it (the offline tiny model is found or built, and
    its own ``config.json`` planned), on the device the run uses (one ``gpu`` a worker, or this
    machine's RAM on CPU). A GPU run that cannot fit is refused (exit code 2); a CPU run over the
    RAM is only warned about (the workers of a CPU cluster may have other RAM)."""
    from catvton.model.loading import BaseModelError
    from catvton.offline import resolve
    from catvton.train.planner import plan_from_config

    try:
        p = plan_from_config(resolve(cfg, log=typer.echo), gpu=gpu)
    except BaseModelError as e:  # a missing folder: the job would fail on it after the data work
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    where = f"one {gpu}" if cfg.train.use_gpu else "CPU"
    typer.echo(f"predicted for {p.model}, the transformer this run trains, at this config's canvas and batch on {where}:")
    typer.echo(str(p))
    if p.fits:
        return
    if not cfg.train.use_gpu:
        typer.echo(f"warning: {p.num_workers} worker(s) x {p.peak_bytes / 1e9:.1f} GB is more than this machine's "
                   f"{p.memory_bytes / 1e9:.1f} GB of RAM: expect swapping, or lower train.batch_size", err=True)
        return
    typer.echo(f"error: this config needs about {p.peak_bytes / 1e9:.1f} GB on one {gpu}; "
               "lower train.batch_size, turn on train.gradient_checkpointing, or use a smaller canvas", err=True)
    raise typer.Exit(2)


def _measured_peak(cfg, gpu: str) -> dict:
    """This config's step measured, not predicted: the same step under fake tensors
    (:func:`catvton.train.dryrun.measure_config`, seconds for the tiny model, ~1-2 CPU minutes at full
    size), printed beside the plan; a GPU run adds the allocator slack and CUDA context."""
    from catvton.offline import resolve
    from catvton.train.measure import measure_config

    m = measure_config(resolve(cfg, log=lambda _: None))
    c = m.categories
    parts = ", ".join(f"{k} {c[k] / 1e9:.2f}" for k in ("parameters", "gradients", "optimizer", "activations",
                                                          "temporaries"))
    line = f"measured (fake tensors, python -m catvton.train.dryrun): step peak {m.tensor_peak / 1e9:.2f} GB of tensors ({parts})"
    if cfg.train.use_gpu:
        line += f"; {m.total / 1e9:.1f} GB on one {gpu} with allocator slack and CUDA context"
    typer.echo(line)
    return {"tensor_peak_bytes": m.tensor_peak, "gpu_total_bytes": m.total if cfg.train.use_gpu else None,
            "categories": c, "tflop_per_step": m.flops / 1e12}


def _train(cfg):
    """The Ray job on ``cfg`` (offline names resolved); a rerun that cannot continue its saved run
    on this schedule exits with code 2 and the message saying what to do."""
    from catvton.offline import resolve
    from catvton.train.checkpoint import ResumeRefused
    from catvton.train.job import run_job

    try:
        return run_job(resolve(cfg), progress=True)
    except ResumeRefused as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _findings(outcome, history: list[dict], groups: list[str]) -> list[str]:
    """Problems a short run can reveal, each with what to do."""
    from catvton.cache.read import load_manifest

    found = []
    manifest = load_manifest(outcome.cache_dir)
    bad = manifest.get("skipped", {}).get("bad_rows", {})
    if bad:
        found.append(f"{sum(bad.values())} bad rows were excluded {bad}: run `easy_train.py setup` for details")
    for split in ("val", "test"):
        if not sum(manifest["counts"][split].values()):
            found.append(f"no {split} pairs: raise data.{split}_fraction or use more data")
    losses = [h["loss"] for h in history if "loss" in h]
    if len(losses) >= 6:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        if not last < first:
            found.append(f"train loss did not fall ({first:.4f} -> {last:.4f}): try a lower train.lr or more steps")
    # judged on the groups the run teaches (data.groups); the upper-body share is there to be kept
    # and may rise a little at first (the alpha is already good at it)
    taught = [g for g in groups if all(f"val_loss_{g}" in h for h in history if "val_loss" in h)]
    keys = [f"val_loss_{g}" for g in taught] or ["val_loss"]
    vals = [sum(h[k] for k in keys) / len(keys) for h in history if "val_loss" in h]
    what = f"val loss of {', '.join(taught)}" if taught else "val loss"
    if len(vals) >= 2 and not vals[-1] < vals[0]:
        found.append(f"{what} did not fall ({vals[0]:.4f} -> {vals[-1]:.4f}): try a lower train.lr or more steps")
    return found


@app.command()
def test(
    steps: Annotated[int, typer.Option(help="Optimizer steps of the proof run.")] = 30,
    gpu: Annotated[str, typer.Option(help="GPU the memory plan is checked against: L40S, H100 or H200.")] = "L40S",
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    no_dashboard: NoDashboardOpt = False,
) -> None:
    """A short proof run: loss curve, memory report, errors found (exit 1 if problems were found)."""
    import json

    from catvton.ray_utils import init_ray
    from catvton.train.job import summary_lines

    cfg = _load(config, list(set_ or []) + [f"train.max_steps={steps}", f"train.val_every={max(1, steps // 3)}",
                                            f"train.checkpoint_every={steps}"])
    cfg.run.name = cfg.run.name + "-test"
    _plan_or_refuse(cfg, gpu)
    measured = _measured_peak(cfg, gpu)
    init_ray(dashboard=not no_dashboard)
    outcome = _train(cfg)
    history = outcome.history
    found = _findings(outcome, history, cfg.data.groups)
    memory = {k: max((h.get(k, 0.0) for h in history), default=0.0) for k in ("peak_rss_mb", "peak_cuda_mb")}
    report = {"steps": outcome.metrics.get("step"), "final": outcome.metrics, "memory_mb": memory,
              "measured_step_peak": measured,
              "findings": found, "loss_curve": str(outcome.run_dir / "loss_curve.png")}
    (outcome.run_dir / "test_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    typer.echo("\n".join(summary_lines(outcome)))
    typer.echo(f"memory: peak RSS {memory['peak_rss_mb']:.0f} MB per worker"
               + (f", peak CUDA {memory['peak_cuda_mb']:.0f} MB" if memory["peak_cuda_mb"] else " (no GPU)"))
    typer.echo("problems found: " + ("none" if not found else ""))
    for f in found:
        typer.echo(f"  - {f}")
    typer.echo(f"report: {outcome.run_dir / 'test_report.json'}")
    if found:
        raise typer.Exit(1)


def _check_push(cfg, repo_id: str | None, dry_run: bool, allow_synthetic: bool) -> None:
    """Every reason the push would be refused, before hours of training (exit code 2). A dry run
    uploads nothing: it needs no token, and a synthetic training set is only noted."""
    from catvton.publish import PublishError, check_data_source, check_repo_id, hub_token

    def problem(check) -> str | None:
        try:
            check()
        except PublishError as e:
            return str(e)
        return None

    synthetic = problem(lambda: check_data_source(cfg.data.source, allow_synthetic))
    problems = [problem(lambda: check_repo_id(repo_id))]
    if dry_run:
        if synthetic:
            typer.echo(f"note: a real push would be refused: {synthetic}")
    else:
        problems += [synthetic, problem(hub_token)]
    for p in filter(None, problems):
        typer.echo(f"error: {p}", err=True)
    if any(problems):
        raise typer.Exit(2)


@app.command()
def full(
    epochs: Annotated[int, typer.Option(help="Passes over the training pairs.")] = 10,
    push_to_hub: Annotated[bool, typer.Option("--push-to-hub", help="After training, evaluate on the test split and upload the LoRA with a model card to the Hugging Face Hub (token from HF_TOKEN).")] = False,
    hub_model_id: Annotated[Optional[str], typer.Option(help="Hub repo for --push-to-hub, e.g. you/catvton-flux-bottoms-lora.")] = None,
    hub_dry_run: Annotated[bool, typer.Option("--hub-dry-run", help="With --push-to-hub: write the upload folder (<run>/hub-upload) but upload nothing.")] = False,
    allow_synthetic: Annotated[bool, typer.Option("--allow-synthetic", help="With --push-to-hub: upload a LoRA trained on the synthetic rows (data.source: synthetic, the offline default), a rehearsal rather than a try-on model.")] = False,
    eval_pairs: Annotated[int, typer.Option(help="Test pairs per garment group scored for the model card (0: all).")] = 64,
    gpu: Annotated[str, typer.Option(help="GPU the memory plan is checked against: L40S, H100 or H200.")] = "L40S",
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    no_dashboard: NoDashboardOpt = False,
) -> None:
    """The full training run through the same Ray job, optionally published. The run is named
    <run.name>-<epochs>ep (e.g. tiny-lora-10ep) unless --set run.name=... names it; re-running the
    same command resumes it."""
    from catvton.publish import build_upload_folder, push
    from catvton.ray_utils import init_ray
    from catvton.train.job import summary_lines

    if hub_model_id and not push_to_hub:
        typer.echo("error: --hub-model-id is only used with --push-to-hub; add --push-to-hub (or drop the id)", err=True)
        raise typer.Exit(2)
    cfg = _load(config, list(set_ or []) + [f"train.epochs={epochs}", "train.max_steps=0"])
    if not any(s.startswith("run.name=") for s in set_ or []):
        # a run per schedule: `full --epochs 1` after `make demo` (3000 steps under run.name) is a new
        # run, not a resume of a longer one; the same command again resumes it
        cfg.run.name = f"{cfg.run.name}-{epochs}ep"
    if push_to_hub:
        _check_push(cfg, hub_model_id, hub_dry_run, allow_synthetic)
    _plan_or_refuse(cfg, gpu)
    init_ray(dashboard=not no_dashboard)
    outcome = _train(cfg)
    typer.echo("\n".join(summary_lines(outcome)))
    if not push_to_hub:
        return
    from catvton.eval.report import evaluate
    from catvton.eval.samples import held_out_samples

    samples = held_out_samples(outcome.config, "test", max_per_group=eval_pairs or None)
    report = evaluate(outcome.config, outcome.weights_dir, samples, outcome.weights_dir / "eval", ray_data=True,
                      source=f"{outcome.config.data.source} test split")
    typer.echo(f"evaluation: {outcome.weights_dir / 'eval' / 'report.md'} ({', '.join(report['groups'])})")
    folder = build_upload_folder(outcome.weights_dir, outcome.run_dir / "hub-upload", hub_model_id)
    if hub_dry_run:
        typer.echo(f"dry run: the upload folder is {folder}; nothing uploaded")
        return
    typer.echo(f"published: {push(folder, hub_model_id, allow_synthetic=allow_synthetic)}")


@app.command("config")
def show_config(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None) -> None:
    """Print the resolved configuration, and every field with its meaning."""
    import dataclasses

    import yaml

    from catvton.config import describe

    cfg = _load(config, list(set_ or []))
    typer.echo(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    typer.echo("# fields")
    for name, default, doc in describe():
        typer.echo(f"# {name} (default {default}): {doc}")


if __name__ == "__main__":
    sys.exit(app())
