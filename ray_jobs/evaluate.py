"""Evaluate a LoRA against its base and a grey fill on held-out pairs, per garment group (upper /
lower / full): masked_psnr / masked_ssim (inside the try-on mask), half_psnr / half_ssim (the whole
person half), LPIPS, FID and KID where their networks are available, and grids (garment | masked
person | base | LoRA | ground truth). The same function (catvton.eval.report.evaluate) scores the
learning benchmark and the model card; generation runs as Ray Data batch inference, one seed per
pair (--in-process: the same numbers without an actor pool).

Offline default (the tiny base; the test split of the synthetic rows):

    python ray_jobs/evaluate.py --lora outputs/tiny-sweep/release
    python ray_jobs/evaluate.py --lora outputs/tiny-lora/lora --max-per-group 32
    python ray_jobs/evaluate.py --lora outputs/tiny-lora/lora --in-process   # no actor pool, same numbers

On a GPU cluster (the real test split, plus VITON-HD's test set to check that tops stay good):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- python ray_jobs/evaluate.py \\
        --lora /mnt/shared/sweep/release --viton /mnt/shared/viton-hd --actors 4

Outfits (offline only: the synthetic world draws their true photos): --outfits N held-out people are
dressed in another test pid's top and a third's bottom by the service's outfit path (top pass, then
bottom pass), and each region is scored against the true photo, with the single-garment passes
beside it (catvton.eval.outfits). --outfits 0 skips them:

    python ray_jobs/evaluate.py --lora outputs/tiny-lora/lora --in-process --outfits 24

Shape (offline only, issue 26): --shape N cases a kind of held-out people given a garment of another
type (trousers_to_skirt, shorts_to_trousers, skirt_to_trousers, top_trousers_to_dress; people and
garments from the --split pids, catvton.offline.shape), dressed by the service's path under the
config's mask rule with the base and the LoRA, scored against the rendered truth: outline IoU and
masked PSNR per kind (shape.<kind>.iou / .psnr in report.json and report.md, grid_shape_<kind>.png).
Default 40 (the issue's least), 0 skips. Cost on the tiny default (8 steps, 2 shared CPUs, measured
2026-12-07): ~2 minutes, 7 s to draw the 160 cases and 116 s for their 2 x 160 try-ons and scores (the
whole command below: 157 s); the per-pair part over every test pair is ~1900 try-ons.

    python ray_jobs/evaluate.py --lora outputs/tiny-lora/lora --in-process --max-per-group 2 --outfits 0 --shape 40

The config is the LoRA's own training_config.json when it has one (else --config). Writes
report.json, report.md and grid_<group>.png (and grid_outfits.png, grid_shape_<kind>.png) to --out
(default: <lora>/eval).
"""

from __future__ import annotations

import sys
import time
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
    p.add_argument("--in-process", action="store_true", help="generate in this process instead of with Ray Data")
    p.add_argument("--out", default=None, help="report folder (default: <lora>/eval)")
    p.add_argument("--outfits", type=int, default=24,
                   help="held-out synthetic outfits (person, top, bottom -> true photo) to score per region; 0: skip")
    p.add_argument("--shape", type=int, default=40,
                   help="held-out cross-type cases a kind (a skirt for a person in trousers, ...) for the shape "
                        "benchmark; 0: skip (~2 min on the tiny default: see above)")
    args = p.parse_args(argv)

    from catvton.artifacts import LORA_WEIGHTS, REPORT_JSON, REPORT_MD, TRAINING_CONFIG
    from catvton.data.source import SYNTHETIC
    from catvton.eval.outfits import evaluate_outfits
    from catvton.eval.report import evaluate
    from catvton.eval.samples import held_out_samples
    from catvton.eval.viton import VitonError, viton_samples
    from catvton.offline import resolve
    from catvton.offline.outfits import outfit_triples, triple_arrays
    from catvton.offline.shape import held_out_plans, shape_cases
    from catvton.ray_utils import init_ray

    lora = Path(args.lora)
    if not (lora / LORA_WEIGHTS).is_file():
        print(f"error: {lora} has no {LORA_WEIGHTS} (give a release or a run's lora/ folder)", file=sys.stderr)
        return 2
    own = lora / TRAINING_CONFIG
    config = args.config or (own if own.is_file() else ROOT / "configs" / "tiny.yaml")
    cfg = config_or_exit(config, args.set)  # JSON is YAML: the LoRA's own config loads as a preset
    if not args.in_process:
        init_ray()
    cfg = resolve(cfg)  # offline names (tiny, tiny-alpha, synthetic) -> folders, built once
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
    outfits = None
    if args.outfits > 0 and not args.viton and cfg.data.source == SYNTHETIC:
        found = outfit_triples(args.outfits, cfg.data, args.split, allow_fewer=True)
        if len(found) < args.outfits:
            print(f"outfits: {args.outfits} asked, the {args.split} split of this synthetic set has {len(found)} "
                  "people who can be dressed in another pid's top and bottom (more: data.synthetic_pids)")
        if found:  # in-process: each pass needs the one before
            outfits = evaluate_outfits(cfg, lora, triple_arrays(found), out)
    elif args.outfits > 0:
        print(f"outfits: not scored: their true photos exist only in the synthetic world (source {source})")
    cases = None
    if args.shape > 0 and not args.viton and cfg.data.source == SYNTHETIC:
        drawn = time.perf_counter()
        try:
            cases = shape_cases(held_out_plans(cfg.data, args.split), per_kind=args.shape,
                                size=cfg.data.synthetic_image_size)
            print(f"shape: {len(cases)} cases drawn in {time.perf_counter() - drawn:.0f} s")
        except ValueError as e:  # a small synthetic set (the rehearsal's) lacks some kind's people or garments
            print(f"shape: not scored: {e} (--shape 0 skips it)")
    elif args.shape > 0:
        print(f"shape: not scored: its true photos exist only in the synthetic world (source {source})")
    report = evaluate(cfg, lora, samples, out, ray_data=not args.in_process, actors=args.actors, source=source,
                      outfits=outfits, shape=cases)
    print(f"\n== evaluation ({source}) ==")
    for group, g in report["groups"].items():
        d = g["delta"]
        print(f"{group:6s} {g['pairs']:4d} pairs  masked_psnr {g['base']['masked_psnr']:6.2f} -> {g['lora']['masked_psnr']:6.2f} "
              f"({d['masked_psnr']:+.2f} dB, grey {g['grey']['masked_psnr']:.2f})  masked_ssim "
              f"{g['base']['masked_ssim']:.3f} -> {g['lora']['masked_ssim']:.3f} ({d['masked_ssim']:+.3f}, "
              f"grey {g['grey']['masked_ssim']:.3f})")
    if outfits is not None:
        print(f"outfits ({outfits['triples']} triples, {outfits['wall_s']:.0f} s): masked_psnr base -> LoRA, margin base -> LoRA")
        for run, r in outfits["runs"].items():
            for region, g in r["regions"].items():
                t = g["transfer"]
                margin = f"  margin {t['base']['margin_db']:+.2f} -> {t['lora']['margin_db']:+.2f} dB" if t else ""
                print(f"  {run:6s} {region:5s} {g['base']['masked_psnr']:6.2f} -> {g['lora']['masked_psnr']:6.2f}{margin}")
    if cases is not None:
        s = report["shape"]
        print(f"shape ({s['cases']} cases, {s['wall_s']:.0f} s; masks {s['mask_rules']}): base -> LoRA")
        for kind, k in s["kinds"].items():
            print(f"  {kind:22s} {k['n']:3d} cases  outline IoU {k['base']['iou']:.3f} -> {k['lora']['iou']:.3f}  "
                  f"masked_psnr {k['base']['psnr']:6.2f} -> {k['lora']['psnr']:6.2f}")
    for k, v in report["absent"].items():
        print(f"absent: {k}: {v}")
    grids = [out / f"grid_{g}.png" for g in report["groups"]] + ([out / "grid_outfits.png"] if outfits else [])
    grids += [out / name for name in report.get("shape", {}).get("grids", {}).values()]
    print(f"wrote {out / REPORT_JSON}, {out / REPORT_MD}, " + ", ".join(str(g) for g in grids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
