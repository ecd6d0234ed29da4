"""Train a CatVTON-Flux LoRA on DeepFashion pairs with Ray Train.

Offline default (2 CPUs, no network: synthetic rows, the tiny base and its tiny alpha):

    python ray_jobs/train.py

On a GPU cluster (L40S workers, the real dataset and FLUX.1-Fill-dev + catvton-flux-alpha):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \\
        python ray_jobs/train.py --config configs/l40s.yaml

Against a local head node:  ray start --head --num-cpus 2 && ray job submit --address \\
    http://127.0.0.1:8265 --working-dir . -- python ray_jobs/train.py

Overrides: --set train.lr=1e-4 --set run.name=my-run. Re-running with the same run.name
resumes that run from its latest checkpoint (and continues to a longer schedule; a shorter one
than the checkpoint's step is refused, exit code 2: give the run a new name).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a Ray job's working dir is the repo root, but scripts run from anywhere


def main(argv: list[str] | None = None) -> int:
    from catvton.cli import config_or_exit, job_parser, source_errors_exit

    p = job_parser(__doc__, dashboard_flag=True)
    p.add_argument("--encoders", type=int, default=1, help="Ray Data VAE encoder actors for the latent cache")
    args = p.parse_args(argv)
    cfg = config_or_exit(args.config, args.set)

    from catvton.config import ConfigError
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray
    from catvton.train.checkpoint import ResumeRefused
    from catvton.train.job import run_job, summary_lines

    init_ray(dashboard=not args.no_dashboard)  # prints the dashboard's URL and where Ray's logs go
    cfg = resolve(cfg)  # offline names (tiny, tiny-alpha, synthetic) -> cached folders, built once
    try:
        with source_errors_exit():  # no network, a missing or unreadable shard: a short message, exit code 2
            outcome = run_job(cfg, num_encoders=args.encoders, progress=True)
    except (ResumeRefused, ConfigError) as e:  # ConfigError: e.g. relative run folders on several nodes
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n== training finished ==")
    print("\n".join(summary_lines(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
