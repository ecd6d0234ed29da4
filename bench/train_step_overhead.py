"""How much does Ray Train cost per step? The same training step inside ``TorchTrainer`` (one
worker, Ray Data shard) and in a plain single-process loop, on the same machine in one run.

    python bench/train_step_overhead.py                 # tiny default config, 60 steps each
    python bench/train_step_overhead.py --steps 100 --set train.batch_size=4

Prints the steady-state median seconds per optimizer step of each and their ratio. Results and
the command go to docs/PERFORMANCE.md. No timing is asserted anywhere: machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    return p.parse_args(argv)


def bench_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """The user's ``--set``, then what the bench itself needs: ``--steps`` steps, one validation
    and one checkpoint at the end (both left out of the median), no W&B, outputs under ``work``."""
    n = args.steps
    return args.set + [
        f"train.max_steps={n}", f"train.checkpoint_every={n}", f"train.val_every={n}",
        "train.val_batches=1", "run.wandb_mode=disabled", "run.name=bench-overhead",
        f"run.storage_path={work / 'ray'}", f"run.output_dir={work / 'out'}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}: no step would be timed")

    from catvton.cache.build import build_latent_cache
    from catvton.cli import config_or_exit
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray
    from catvton.train.job import fit
    from catvton.train.plain import train_plain

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cfg = config_or_exit(args.config, bench_overrides(args, tmp))  # every problem at once, before Ray starts
    init_ray()
    cfg = resolve(cfg)  # the tiny base, the alpha and the synthetic set, built once
    cache = build_latent_cache(cfg, progress=False)

    _, history = train_plain(cfg, cache, args.steps, progress=False)
    plain = statistics.median(h["sec_per_step"] for h in history[args.warmup:])

    outcome = fit(cfg, cache)  # as the job runs: a report (a sync) every LOG_EVERY steps, its cost included
    # each reported figure is the mean of the steps since the previous report (val/checkpoint
    # steps are left out: they do extra work)
    ray_steps = [h["sec_per_step"] for h in outcome.history
                 if "sec_per_step" in h and h["step"] > args.warmup and "val_loss" not in h]
    in_ray = statistics.median(ray_steps)

    print(f"\nmedian seconds per optimizer step, steps {args.warmup + 1}-{args.steps}, batch {cfg.train.batch_size}, "
          f"torch threads 1:")
    print(f"  plain loop      {plain:.4f}")
    print(f"  TorchTrainer    {in_ray:.4f}   (1 worker, Ray Data shard, a report every 5 steps, its cost included)")
    print(f"  ratio           {in_ray / plain:.2f}x")


if __name__ == "__main__":
    main()
