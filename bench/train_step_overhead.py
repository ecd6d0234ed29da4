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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    args = p.parse_args()

    from catvton.artifacts import loss_history
    from catvton.cache.build import build_latent_cache
    from catvton.config import load_config
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray
    from catvton.train.job import fit
    from catvton.train.plain import train_plain

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cfg = load_config(args.config, args.set + [
        f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.val_every={args.steps}",
        "train.val_batches=1", "run.wandb_mode=disabled", "run.name=bench-overhead",
        f"run.storage_path={tmp / 'ray'}", f"run.output_dir={tmp / 'out'}"])
    init_ray()
    cfg = resolve(cfg)  # the tiny base, the alpha and the synthetic set, built once
    cache = build_latent_cache(cfg, progress=False)

    _, history = train_plain(cfg, cache, args.steps, progress=False)
    plain = statistics.median(h["sec_per_step"] for h in history[args.warmup:])

    outcome = fit(cfg, cache, log_every=5)  # as the job runs: a report (a sync) every 5 steps
    # each reported figure is the mean of the steps since the previous report (val/checkpoint
    # steps are left out: they do extra work)
    ray_steps = [h["sec_per_step"] for h in loss_history(outcome.checkpoint_dir)
                 if "sec_per_step" in h and h["step"] > args.warmup and "val_loss" not in h]
    in_ray = statistics.median(ray_steps)

    print(f"\nmedian seconds per optimizer step, steps {args.warmup + 1}-{args.steps}, batch {cfg.train.batch_size}, "
          f"torch threads 1:")
    print(f"  plain loop      {plain:.4f}")
    print(f"  TorchTrainer    {in_ray:.4f}   (1 worker, Ray Data shard, a report every 5 steps, its cost included)")
    print(f"  ratio           {in_ray / plain:.2f}x")


if __name__ == "__main__":
    main()
