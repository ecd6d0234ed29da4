"""Build the latent cache: validate rows, pair views of each item, encode canvases with the VAE.

Offline default (2 CPUs, no network: synthetic rows and the tiny base, built once and cached):

    python ray_jobs/preprocess.py

On a GPU cluster (the real dataset, FLUX.1-Fill-dev's VAE and T5, one GPU per encoder actor):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \\
        python ray_jobs/preprocess.py --config configs/l40s.yaml --gpu --encoders 4

Overrides: --set canvas.half_width=48 --set canvas.half_height=64. The cache lands in
``$CATVTON_CACHE/latents-<key>`` (default ``~/.cache/catvton``), the key hashing the data, canvas,
mask and model settings; running again with the same settings reuses it. ``ray_jobs/train.py``
builds or reuses the same cache itself, so this job is only needed to build it ahead of time.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a Ray job's working dir is the repo root, but scripts run from anywhere


def main(argv: list[str] | None = None) -> int:
    from catvton.cli import config_or_exit, job_parser, source_errors_exit

    p = job_parser(__doc__)
    p.add_argument("--encoders", type=int, default=1, help="VAE encoder actors (one GPU each with --gpu)")
    p.add_argument("--gpu", action="store_true", help="encode on GPUs (bf16); default: CPU (fp32)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per VAE call")
    args = p.parse_args(argv)

    cfg = config_or_exit(args.config, args.set)

    from catvton.cache.build import build_latent_cache
    from catvton.cache.read import load_manifest
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray

    if args.encoders < 1 or args.batch_size < 1:
        print("--encoders and --batch-size must be at least 1", file=sys.stderr)
        return 2
    init_ray()
    cfg = resolve(cfg)  # offline names -> cached folders, built once
    with source_errors_exit():  # no network, a missing or unreadable shard: a short message, exit code 2
        folder = build_latent_cache(cfg, num_encoders=args.encoders, use_gpu=args.gpu, batch_size=args.batch_size)
    m = load_manifest(folder)
    print("\n== latent cache ==")
    print(f"folder:       {folder}")
    print(f"latents:      {m['latent_shape']} {m['dtype']}   mask: {m['mask_shape']}   "
          f"text: {m['text_embeds']['prompt_embeds']}")
    for split, by_group in m["counts"].items():
        print(f"{split:<6} pairs: {sum(by_group.values()):>6}  " + "  ".join(f"{g} {n}" for g, n in by_group.items()))
    print(f"rows:         {m['rows']['valid']} valid of {m['rows']['total']}")
    print(f"skipped:      bad rows {m['skipped']['bad_rows'] or 'none'}; pairing {m['skipped']['pairing'] or 'none'}; "
          f"{m['skipped']['pairs_not_selected']} pairs outside data.groups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
