"""A Ray Tune sweep over learning rate and LoRA rank, and the release folder of its winner.

Ray Train V2's pattern: every trial is a small function that builds and fits its own
``TorchTrainer`` (:func:`catvton.train.job.fit`) with ``TuneReportCallback``, so the workers'
intermediate metrics reach ASHA, which stops trials whose validation loss lags at a rung.
The latent cache is built once by the driver, before any trial starts.

Layout under ``<run.output_dir>/<tune.name>/``::

    sweep_config.json    the sweep's full configuration, written before its first trial
    tune/<tune.name>/    Ray Tune's experiment state (what ``Tuner.restore`` reads)
    trials/<trial>/      each trial's run folder (loss curve, sample grids, TensorBoard, lora/)
    ray/<trial>/         each trial's Ray Train checkpoints; with ``run.storage_path`` on a remote
                         file system (``s3://bucket/prefix``) they go to ``<it>/<tune.name>-trials/``
    release/             the winner: pytorch_lora_weights.safetensors, training_config.json,
                         metrics.json, trials.csv, trials.json, sweep.png (see docs/release.md)

A sweep whose driver died is continued with ``run_sweep(saved_sweep_config(...), resume=True)``:
trials that finished keep their results, the others run again, each from its own latest
checkpoint (a trial's run re-uses its name, so :func:`catvton.train.job.fit` resumes it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from catvton.artifacts import LORA_WEIGHTS, METRICS, TRAINING_CONFIG, export_atomic
from catvton.cache.build import build_latent_cache
from catvton.cache.read import load_manifest
from catvton.config import Config, ConfigError, apply_overrides, config_from_dict, sweep_problems, total_steps
from catvton.train.job import fit, release_placement_group, require_shared_storage

TRIAL_DRIVER_CPU = 0.5
"""CPU reserved by each trial's own function (it only waits on its TorchTrainer)."""

SWEEP_CONFIG = "sweep_config.json"
"""The sweep's full configuration in its folder, written before its first trial (``--resume`` reads it)."""

RELEASE_FILES = (LORA_WEIGHTS, TRAINING_CONFIG, METRICS, "trials.csv", "trials.json", "sweep.png")


@dataclass
class SweepOutcome:
    sweep_dir: Path
    release_dir: Path
    trials: list[dict[str, Any]]
    """One row per trial: name, lr, rank, alpha, steps, val loss, status, run folder."""
    winner: dict[str, Any]


def max_concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """Trials that fit at once in ``resources`` (``tune.max_concurrent_trials`` when set): GPUs
    over GPUs per trial on a GPU cluster; on CPUs, the CPUs left after one for Ray Data and the
    Tune driver, over each trial's workers plus its function."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    t = cfg.train
    if t.use_gpu:
        return max(1, int(resources.get("GPU", 0) // t.num_workers))
    per_trial = t.num_workers * t.cpus_per_worker + TRIAL_DRIVER_CPU
    return max(1, int((resources.get("CPU", 0) - 1) // per_trial))


def num_trials(cfg: Config) -> int:
    """Trials the search runs: ``num_samples`` (random), each lr x rank pair ``num_samples`` times (grid)."""
    s = cfg.tune
    return s.num_samples * (len(s.lr_grid) * len(s.ranks) if s.search == "grid" else 1)


def sweep_concurrency(cfg: Config, live: dict[str, float], declared: dict[str, float] | None = None) -> int:
    """Trials a new sweep lets run at once (Tune's ``max_concurrent_trials``), from what is
    declared rather than from what the cluster shows at its start:

    1. ``tune.max_concurrent_trials`` when set: the user knows the cluster's ceiling.
    2. CPU workers: the trials that fit in the ``live`` cluster (:func:`max_concurrent_trials`):
       a local Ray does not grow, what is there is all there will be.
    3. GPU workers: the trials that fit in the cluster's ``declared`` maximum (node types times
       their max counts, reported by Ray's autoscaler v2, not by the v1 of ``ray up``), else every
       trial of the search (:func:`num_trials`); never fewer than fit in the ``live`` cluster.

    Why: an autoscaling cluster (``cluster/aws-l40s.yaml``, ``min_workers: 0``) has no GPU when
    the sweep starts, and a trial Tune has not started asks for nothing: one at a time never makes
    the autoscaler add a second node. A started trial that does not fit waits with its workers'
    placement group pending, the demand the autoscaler adds nodes for (up to ``max_workers``),
    holding only :data:`TRIAL_DRIVER_CPU`: too many trials cost that, too few leave GPUs idle."""
    if cfg.tune.max_concurrent_trials or not cfg.train.use_gpu:
        return max_concurrent_trials(cfg, live)
    ceiling = max_concurrent_trials(cfg, declared) if declared else num_trials(cfg)
    return max(1, min(num_trials(cfg), max(ceiling, max_concurrent_trials(cfg, live))))


def declared_resources() -> dict[str, float] | None:
    """The most the running cluster may grow to, from its autoscaler's config (None: it reports
    none). Ray Train and Ray Data read the same figure; Ray 2.60 has no public API for it."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # a private API: a Ray without it is a cluster that declares nothing
        return None


def param_space(cfg: Config) -> dict[str, Any]:
    """lr and rank as Tune search spaces (alpha follows the rank in :func:`trial_config`)."""
    from ray import tune

    s = cfg.tune
    if s.search == "grid":
        return {"lr": tune.grid_search(list(s.lr_grid)), "rank": tune.grid_search(list(s.ranks))}
    return {"lr": tune.loguniform(s.lr_min, s.lr_max), "rank": tune.choice(list(s.ranks))}


def trial_config(base: Config, lr: float, rank: int, run_name: str, sweep_dir: Path) -> Config:
    """The trial's full config: the sweep's with this lr, rank and alpha, its own run folder."""
    cfg = config_from_dict(base.to_dict())
    cfg.train.lr = float(lr)
    cfg.lora.rank = int(rank)
    cfg.lora.alpha = float(cfg.tune.alpha_ratio * rank)
    cfg.run.name = run_name
    cfg.run.output_dir = str(sweep_dir / "trials")
    remote = "://" in base.run.storage_path  # s3://...: every node reads its checkpoints from there
    cfg.run.storage_path = (f"{base.run.storage_path.rstrip('/')}/{sweep_dir.name}-trials" if remote
                            else str(sweep_dir / "ray"))
    return cfg


def run_trial(params: dict[str, Any]) -> None:
    """The Tune trainable: fit one trial, then report where its LoRA is."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = config_from_dict(params["cfg"])
    name = tune.get_context().get_trial_name()
    cfg = trial_config(base, params["lr"], params["rank"], name, Path(params["sweep_dir"]))
    outcome = fit(cfg, Path(params["cache_dir"]), callbacks=[TuneReportCallback()],
                  materialize=params["materialize"])
    final = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}
    tune.report({**final, "weights_dir": str(outcome.weights_dir), "run_dir": str(outcome.run_dir)})


def trial_steps(cfg: Config, cache: Path) -> int:
    """Every trial's length, as its workers count it: ``train.max_steps``, or ``train.epochs``
    passes over the cache's training pairs with ``train.num_workers`` workers. Refused (with
    :class:`ConfigError`) when ASHA's grace period does not fall before it."""
    n_train = sum(load_manifest(cache)["counts"]["train"].values())
    problems = sweep_problems(cfg, n_train)
    if problems:
        raise ConfigError(problems)
    return total_steps(cfg, n_train, cfg.train.num_workers)


def asha_scheduler(cfg: Config, steps: int):
    """ASHA on the trials' ``step``: the first rung at ``tune.grace_period``, the last at the
    trials' length ``steps`` (:func:`trial_steps`)."""
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that reaches max_t finishes on its own and exports its LoRA
    return ASHAScheduler(time_attr="step", max_t=steps, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def _say(message: str) -> None:
    print(message, flush=True)


def _release_callback(trials_dir: Path):
    """A Tune callback (in the driver) that frees the placement group of a trial's workers once
    the trial has ended. A trial that ASHA stops is killed with its TorchTrainer, and Ray Train's
    own clean-up of that group was not reliable here (it left the CPU reserved, and the next trial
    waited for it forever). Each trial's rank 0 wrote the group's id in its run folder. Built in a
    function so that Tune can pickle it with the experiment state (no captured loggers)."""
    from ray import tune

    class ReleasePlacementGroups(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release_placement_group(trials_dir / str(trial), _say)

        def on_trial_error(self, iteration, trials, trial, **info):
            release_placement_group(trials_dir / str(trial), _say)

    return ReleasePlacementGroups()


def sweep_folder(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/<name>``, absolute: where a sweep keeps everything (module docstring)."""
    return Path(output_dir).expanduser().resolve() / name


def tune_experiment(sweep_dir: Path) -> Path:
    """Ray Tune's experiment folder of the sweep in ``sweep_dir`` (``Tuner.restore`` takes it)."""
    return sweep_dir / "tune" / sweep_dir.name


class SweepNotFound(LookupError):
    """``--resume`` named a sweep that left nothing to resume; the message says what there is."""


def resumable(sweep_dir: Path) -> bool:
    """Whether the sweep in ``sweep_dir`` can be resumed: its config is saved and Ray Tune's
    experiment state is there (``Tuner.can_restore``)."""
    from ray.tune import Tuner

    return (sweep_dir / SWEEP_CONFIG).is_file() and Tuner.can_restore(tune_experiment(sweep_dir))


def saved_sweep_config(output_dir: str | Path, name: str) -> Config:
    """The configuration sweep ``name`` under ``output_dir`` started with, located there (its
    ``run.output_dir`` is that folder). :class:`SweepNotFound` when it cannot be resumed."""
    folder = sweep_folder(output_dir, name)
    if resumable(folder):
        cfg = config_from_dict(json.loads((folder / SWEEP_CONFIG).read_text()))
        cfg.run.output_dir = str(folder.parent)
        return cfg
    root = folder.parent
    others = sorted(d.name for d in root.iterdir() if d.is_dir() and resumable(d)) if root.is_dir() else []
    there = f"sweeps there that can be resumed: {', '.join(others)}" if others else "no sweep there can be resumed"
    why = ("it stopped before its first trial started" if (folder / SWEEP_CONFIG).is_file() else
           "no sweep of that name ran there")
    raise SweepNotFound(
        f"nothing to resume for sweep {name!r} under {root} ({why}; {there}). Start it with "
        f"`python ray_jobs/tune.py --set tune.name={name}` (without --resume), or pass the "
        f"--config / --set run.output_dir=... the sweep ran with so that it is found.")


def resume_problems(saved: Config, overrides: list[str]) -> list[str]:
    """The ``--set`` overrides that would change a sweep being resumed: it keeps the config it
    started with, so only the same values (or ``run.output_dir``, which locates it) are accepted."""
    kept = [o for o in overrides if o.split("=", 1)[0].strip() != "run.output_dir"]
    before = _leaves(saved.to_dict())
    after = _leaves(apply_overrides(config_from_dict(saved.to_dict()), kept).to_dict())
    return [f"{k}={after[k]!r}: sweep {saved.tune.name!r} started with {before[k]!r}, and a resumed sweep "
            f"keeps its config; drop this --set, or start a new sweep under another tune.name"
            for k in before if after[k] != before[k]]


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"section.field": value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def run_sweep(cfg: Config, num_encoders: int = 1, log: Callable[[str], None] = print,
              resume: bool = False) -> SweepOutcome:
    """Build (or reuse) the latent cache, run the trials, export the winner. ``cfg`` names
    concrete models (entry points resolve offline names with :func:`catvton.offline.resolve`).

    ``resume``: continue the sweep ``cfg.tune.name`` that a dead driver left (``cfg`` from
    :func:`saved_sweep_config`) with ``Tuner.restore``: finished trials keep their results, the
    unfinished and errored ones run again. Ray keeps no scheduler state in its experiment
    checkpoint, so ASHA's rungs start empty: the finished trials are not compared again, and a
    resumed sweep may stop fewer trials early. Without ``resume`` a sweep always starts anew
    (new trial names, every trial from step 0), even where one of the same name ran before."""
    from ray import tune

    problems = sweep_problems(cfg)  # before the cache is built; its length once it is
    if problems:
        raise ConfigError(problems)
    require_shared_storage(cfg)
    cache = build_latent_cache(cfg, num_encoders=num_encoders, use_gpu=cfg.train.use_gpu, log=log)
    steps = trial_steps(cfg, cache)
    sweep_dir = sweep_folder(cfg.run.output_dir, cfg.tune.name)
    # Reports between validations carry no val loss; ASHA skips them, Tune's strict check must too.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_DRIVER_CPU})
    if resume:
        log(f"[catvton] resuming sweep {cfg.tune.name} from {tune_experiment(sweep_dir)}")
        tuner = tune.Tuner.restore(str(tune_experiment(sweep_dir)), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(cfg, trainable, cache, steps, sweep_dir, log)
    grid = tuner.fit()
    rows = [trial_row(r.metrics or {}, r.config or {}, r.path, r.metrics_dataframe, r.error, cfg, steps)
            for r in grid]
    release = export_release(rows, sweep_dir / "release", cfg)
    winner = json.loads((release / METRICS).read_text())
    return SweepOutcome(sweep_dir, release, rows, winner)


def _new_tuner(cfg: Config, trainable, cache: Path, steps: int, sweep_dir: Path, log: Callable[[str], None]):
    """A Tuner for a new sweep in ``sweep_dir``, its config saved there first (for a resume)."""
    import ray
    from ray import tune

    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved = config_from_dict(cfg.to_dict())
    saved.run.output_dir = str(sweep_dir.parent)
    tmp = sweep_dir / f".{SWEEP_CONFIG}.tmp"
    tmp.write_text(json.dumps(saved.to_dict(), indent=2) + "\n")
    tmp.replace(sweep_dir / SWEEP_CONFIG)
    resources = ray.cluster_resources()
    concurrent = sweep_concurrency(cfg, resources, declared_resources())
    t = cfg.train
    # CPU trials leaving no CPU free would starve a streaming read; GPU trials choose in fit (read_mode)
    busy = concurrent * (t.num_workers * t.cpus_per_worker + TRIAL_DRIVER_CPU)
    materialize = None if t.use_gpu else resources.get("CPU", 0) - busy < 1
    log(f"[catvton] sweep {cfg.tune.name}: {cfg.tune.search} search, up to {concurrent} of {num_trials(cfg)} "
        f"trial(s) at once, ASHA on {cfg.tune.metric} from step {cfg.tune.grace_period} of {steps}")
    return tune.Tuner(
        trainable,
        param_space={**param_space(cfg), "cfg": cfg.to_dict(), "cache_dir": str(cache),
                     "sweep_dir": str(sweep_dir), "materialize": materialize},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode="min", num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrent, scheduler=asha_scheduler(cfg, steps),
        ),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=str(sweep_dir / "tune"),
                                  callbacks=[_release_callback(sweep_dir / "trials")]),
    )


def trial_row(metrics: dict, config: dict, path: str, frame, error, cfg: Config, steps_planned: int) -> dict[str, Any]:
    """One line of the sweep table. ``status``: completed (ran all ``steps_planned`` steps),
    stopped early (by ASHA) or error."""
    metric = cfg.tune.metric
    steps = int(metrics.get("step", 0) or 0)
    curve: list[tuple[int, float]] = []
    if frame is not None and metric in getattr(frame, "columns", []):
        sub = frame[["step", metric]].dropna()
        # the trial's closing report repeats the last validation: one point per step
        curve = sorted({int(s): float(v) for s, v in zip(sub["step"], sub[metric])}.items())
    last_val = curve[-1][1] if curve else float("nan")
    status = "error" if error is not None else ("completed" if steps >= steps_planned else "stopped early")
    return {
        "trial": Path(path).name if path else "",
        "lr": float(config.get("lr", float("nan"))),
        "rank": int(config.get("rank", 0)),
        "alpha": float(cfg.tune.alpha_ratio * int(config.get("rank", 0))),
        "steps": steps,
        metric: last_val,
        "best_" + metric: min((v for _, v in curve), default=float("nan")),
        "status": status,
        "error": str(error).splitlines()[0][:200] if error is not None else "",
        "weights_dir": metrics.get("weights_dir", ""),
        "run_dir": metrics.get("run_dir", ""),
        "curve": curve,
    }


def pick_winner(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The completed trial with the lowest final ``metric``."""
    done = [r for r in rows if r["status"] == "completed" and r["weights_dir"] and math.isfinite(r[metric])]
    if not done:
        summary = "; ".join(f"{r['trial']}: {r['status']} {r['error']}".strip() for r in rows)
        raise RuntimeError(f"no trial of the sweep completed, nothing to release ({summary})")
    return min(done, key=lambda r: r[metric])


def export_release(rows: list[dict[str, Any]], release: Path, cfg: Config) -> Path:
    """Write the release folder atomically (:func:`catvton.artifacts.export_atomic`)."""
    metric = cfg.tune.metric
    winner = pick_winner(rows, metric)
    weights = Path(winner["weights_dir"])

    def fill(tmp: Path) -> None:
        for name in (LORA_WEIGHTS, TRAINING_CONFIG):
            shutil.copy2(weights / name, tmp / name)
        table = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
        with open(tmp / "trials.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        (tmp / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
        winner_metrics = {k: v for k, v in winner.items() if k not in ("curve", "weights_dir", "run_dir", "error")}
        winner_metrics.update(metric=metric, sweep=cfg.tune.name, trials=len(rows),
                              completed=sum(r["status"] == "completed" for r in rows),
                              stopped_early=sum(r["status"] == "stopped early" for r in rows))
        (tmp / METRICS).write_text(json.dumps(winner_metrics, indent=2) + "\n")
        plot_sweep(rows, metric, tmp / "sweep.png", title=f"sweep {cfg.tune.name}")

    return export_atomic(release, fill)


def plot_sweep(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Left: final val loss against lr, one marker per rank (hollow: stopped early). Right: every
    trial's val-loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ranks = sorted({r["rank"] for r in rows})
    colours = {rk: plt.cm.viridis(i / max(1, len(ranks) - 1)) for i, rk in enumerate(ranks)}
    for r in rows:
        if not math.isfinite(r[metric]):
            continue
        done = r["status"] == "completed"
        ax.scatter([r["lr"]], [r[metric]], s=60, edgecolors=colours[r["rank"]],
                   facecolors=colours[r["rank"]] if done else "none", linewidths=1.8)
        if r["curve"]:
            s, v = zip(*r["curve"])
            bx.plot(s, v, marker="o", ms=3, color=colours[r["rank"]], ls="-" if done else "--",
                    label=f"lr {r['lr']:.1e} r{r['rank']}" + ("" if done else " (stopped)"))
    for rk in ranks:
        ax.scatter([], [], color=colours[rk], label=f"rank {rk}")
    ax.scatter([], [], facecolors="none", edgecolors="grey", label="stopped early")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final {metric}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    bx.set_xlabel("step")
    bx.set_ylabel(metric)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
