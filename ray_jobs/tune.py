"""Sweep learning rate and LoRA rank with Ray Tune (ASHA on the validation loss) and export the
winner to a release folder (LoRA, config, metrics, the table of all trials, a plot).

Offline default (2 CPUs: 2 learning rates x 2 ranks on the tiny base, one trial at a time):

    python ray_jobs/tune.py

On a GPU cluster (each trial: train.num_workers L40S workers; trials at once = GPUs / workers):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \\
        python ray_jobs/tune.py --config configs/l40s.yaml

Watch it: every trial writes TensorBoard under <output_dir>/<tune.name>/trials/ (and W&B when
run.wandb_project is set):   tensorboard --logdir outputs/tiny-sweep/trials
Overrides: --set tune.num_samples=16 --set tune.ranks=[16,64] --set train.max_steps=2000

A sweep whose driver died (a crash, a killed job) is continued by name, with the
config it started with (<output_dir>/<tune.name>/sweep_config.json); finished trials keep their
results, the others run again from their latest checkpoint, and the winner is exported as usual:

    python ray_jobs/tune.py --resume tiny-sweep
    python ray_jobs/tune.py --set run.output_dir=/mnt/shared/outputs --resume my-sweep

Without --resume a run always starts the sweep anew, even where one of that name ran before:
every trial trains again from step 0 under a new trial name (the latent cache is reused), and
release/ is replaced by the new winner.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from catvton.cli import config_or_exit, job_parser

    p = job_parser(__doc__)
    p.add_argument("--encoders", type=int, default=1, help="Ray Data VAE encoder actors for the latent cache")
    p.add_argument("--resume", metavar="NAME",
                   help="continue the interrupted sweep NAME (its tune.name) under run.output_dir with the config "
                        "it started with; --set may only repeat its values (or set run.output_dir to find it)")
    args = p.parse_args(argv)
    cfg = config_or_exit(args.config, args.set)
    from catvton.config import ConfigError, sweep_problems

    if args.resume:  # before Ray starts: a sweep to resume, and overrides that do not change it
        from catvton.train.sweep import SweepNotFound, resume_problems, saved_sweep_config

        try:
            cfg = saved_sweep_config(cfg.run.output_dir, args.resume)
            problems = resume_problems(cfg, args.set)
        except (SweepNotFound, ConfigError) as e:
            print(e, file=sys.stderr)
            return 2
    else:
        problems = sweep_problems(cfg)
    if problems:  # every problem at once, exit code 2
        print(ConfigError(problems), file=sys.stderr)
        return 2

    from catvton.offline import resolve
    from catvton.ray_utils import init_ray
    from catvton.train.sweep import run_sweep

    init_ray()
    cfg = resolve(cfg)  # offline names -> cached folders, built once
    try:
        out = run_sweep(cfg, num_encoders=args.encoders, resume=bool(args.resume))
    except ConfigError as e:  # e.g. relative run folders where trials run on other nodes
        print(f"error: {e}", file=sys.stderr)
        return 2
    metric = cfg.tune.metric
    print("\n== sweep finished ==")
    print(f"{'trial':44s} {'lr':>9s} {'rank':>4s} {'steps':>5s} {metric:>10s}  status")
    for r in out.trials:
        print(f"{r['trial'][:44]:44s} {r['lr']:9.2e} {r['rank']:4d} {r['steps']:5d} {r[metric]:10.4f}  {r['status']}")
    w = out.winner
    print(f"\nwinner: lr {w['lr']:.2e}, rank {w['rank']}, {metric} {w[metric]:.4f}")
    print(f"release folder: {out.release_dir}")
    print(f"sweep plot:     {out.release_dir / 'sweep.png'}")
    print(f"tensorboard:    tensorboard --logdir {out.sweep_dir / 'trials'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
