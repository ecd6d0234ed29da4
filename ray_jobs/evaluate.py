"""Evaluate a LoRA against its base on held-out pairs: per garment group (upper / lower / full),
masked PSNR / SSIM, PSNR / SSIM over the person half, LPIPS, FID and KID where their networks
are available, and grids (garment | masked person | base | LoRA | ground truth).

Offline default (the tiny base; the test split of the synthetic rows):

    python ray_jobs/evaluate.py --lora outputs/tiny-sweep/release
    python ray_jobs/evaluate.py --lora outputs/tiny-lora/lora --max-per-group 32

On a GPU cluster (the real test split, plus VITON-HD's test set to check that tops stay good):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- python ray_jobs/evaluate.py \\
        --lora /mnt/shared/sweep/release --viton /mnt/shared/viton-hd --actors 4

The config is the LoRA's own training_config.json when it has one (else --config). Writes
report.json, report.md and grid_<group>.png to --out (default: <lora>/eval).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from catvton.cli import config_or_exit, job_parser

    p = job_parser(__doc__, default_config=None)
    p.add_argument("--lora", required=True, help="release folder or a run's lora/ folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="held-out pids to score on")
    p.add_argument("--groups", default="upper,lower,full", help="comma-separated garment groups")
    p.add_argument("--max-per-group", type=int, default=None, help="cap the pairs per group (fixed order)")
    p.add_argument("--viton", default=None, help="a VITON-HD-layout folder: score on its paired test set instead")
    p.add_argument("--actors", type=int, default=1, help="Ray Data inference actors (one GPU each on GPUs)")
    p.add_argument("--out", default=None, help="report folder (default: <lora>/eval)")
    args = p.parse_args(argv)

    from catvton.eval.evaluate import evaluate
    from catvton.eval.tryon_eval import held_out_samples
    from catvton.eval.viton import VitonError, viton_samples
    from catvton.ray_utils import init_ray
    from catvton.train.job import resolve_models

    lora = Path(args.lora)
    if not (lora / "pytorch_lora_weights.safetensors").is_file():
        print(f"error: {lora} has no pytorch_lora_weights.safetensors (give a release or a run's lora/ folder)",
              file=sys.stderr)
        return 2
    own = lora / "training_config.json"
    config = args.config or (own if own.is_file() else ROOT / "configs" / "tiny.yaml")
    cfg = config_or_exit(config, args.set)  # JSON is YAML: the LoRA's own config loads as a preset
    init_ray()
    cfg = resolve_models(cfg)
    try:
        if args.viton:
            samples, source = viton_samples(args.viton, cfg, limit=args.max_per_group), f"VITON-HD {args.viton}"
        else:
            groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
            samples = held_out_samples(cfg, args.split, groups, args.max_per_group)
            source = f"{cfg.data.source} {args.split} split"
    except VitonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else lora / "eval"
    report = evaluate(cfg, lora, samples, out, actors=args.actors, source=source)
    print(f"\n== evaluation ({source}) ==")
    for group, g in report["groups"].items():
        d = g["delta"]
        print(f"{group:6s} {g['pairs']:4d} pairs  masked PSNR {g['base']['masked_psnr']:6.2f} -> {g['lora']['masked_psnr']:6.2f} "
              f"({d['masked_psnr']:+.2f} dB)  masked SSIM {g['base']['masked_ssim']:.3f} -> {g['lora']['masked_ssim']:.3f} "
              f"({d['masked_ssim']:+.3f})")
    for k, v in report["absent"].items():
        print(f"absent: {k}: {v}")
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, " + ", ".join(str(out / f'grid_{g}.png') for g in report["groups"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
