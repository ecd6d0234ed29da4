"""Why a try-on model's garment-transfer margin is what it is (issue 12): one trained model, every
held-out pair (or every ``--every``-th), its own garment and a swapped one, as the evaluation
makes them, and a decomposition the evaluation's summary does not print.

    python bench/transfer_diagnosis.py --lora outputs/tiny-lora/lora            # the default job's LoRA
    python bench/transfer_diagnosis.py --lora outputs/tiny-lora/lora --every 2 --set infer.steps=4
    python bench/transfer_diagnosis.py                                          # the alpha alone (no LoRA)

Per group: the margin (masked PSNR with the pair's own garment minus with the swapped one), colour
following and colour strength (:func:`catvton.eval.metrics.colour_strength`: the slope of the
generated garment colour on the given one; 1 is the full change, the truth's own slope is printed
beside it), and the mean squared error of the own and swapped results split into the person's
garment region and the rest of the try-on mask (skin, shoes, studio wall). The margin is
``10 log10(mse_swapped / mse_own)`` over images: it grows when the garment region follows the
garment given *and* when the rest of the mask is painted well.

``--set`` takes the job's overrides (the config must be the one the LoRA was trained with, e.g.
``--set train.garment_dropout=0.1 --set infer.garment_guidance=2``); ``--config`` the preset.
Generation is in-process, one seed per pair as in the evaluation. ~3 minutes per model on 2 CPUs
with ``--every 2``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def diagnose(group: dict, own: np.ndarray, swapped: np.ndarray, swapped_canvas: np.ndarray) -> dict[str, float]:
    """The numbers of one group (see the module docstring); ``own``/``swapped``: full canvases."""
    from catvton.eval import metrics as M

    canvas, mask, region = group["canvas"], group["mask"] > 0, group["garment_mask"] > 0
    w = canvas.shape[2] // 2
    gt, m = canvas[:, :, w:], mask[:, :, w:]
    rest = m & ~region

    def mse(results: np.ndarray, where: np.ndarray) -> float:
        return float(np.mean([((r - t)[q] ** 2).mean() for r, t, q in zip(results[:, :, w:], gt, where)]))

    given = np.concatenate([M.garment_colours(canvas[:, :, :w]), M.garment_colours(swapped_canvas[:, :, :w])])
    worn = np.concatenate([M.region_colours(own[:, :, w:], region), M.region_colours(swapped[:, :, w:], region)])
    own_psnr = float(M.masked_psnr(own[:, :, w:], gt, m).mean())
    swapped_psnr = float(M.masked_psnr(swapped[:, :, w:], gt, m).mean())
    return {"pairs": len(canvas), "margin_db": own_psnr - swapped_psnr, "own_psnr": own_psnr,
            "swapped_psnr": swapped_psnr, "following": M.colour_following(given, worn),
            "strength": M.colour_strength(given, worn),
            "truth_strength": M.colour_strength(given[:len(canvas)], M.region_colours(gt, region)),
            "own_mse_garment": mse(own, region), "own_mse_rest": mse(own, rest),
            "swapped_mse_garment": mse(swapped, region), "swapped_mse_rest": mse(swapped, rest),
            "garment_share": float(region.sum() / m.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", help="a LoRA folder (pytorch_lora_weights.safetensors); none: the base/alpha alone")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--every", type=int, default=1, help="score every N-th held-out pair of each group")
    ap.add_argument("--groups", nargs="+", default=["lower", "full", "upper"])
    args = ap.parse_args()

    from catvton.config import load_config
    from catvton.eval.generate import generate
    from catvton.eval.report import swapped_canvases
    from catvton.eval.samples import held_out_samples
    from catvton.offline import resolve

    cfg = resolve(load_config(args.config, args.set))
    t0 = time.time()
    samples = held_out_samples(cfg, "test", groups=tuple(args.groups))
    rows = {}
    for g in args.groups:
        if g not in samples:
            continue
        s = {k: v[::args.every] for k, v in samples[g].items()}
        swapped = swapped_canvases(s)
        n = len(s["canvas"])
        seeds = [cfg.infer.seed + i for i in range(n)]
        out = generate(cfg, np.concatenate([s["canvas"], swapped]), np.concatenate([s["mask"], s["mask"]]),
                       seeds + seeds, lora=args.lora)
        rows[g] = diagnose(s, out[:n], out[n:], swapped)
        print(f"{g} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    print(f"\n{args.lora or 'base/alpha alone'}; steps {cfg.infer.steps}, garment guidance {cfg.infer.garment_guidance}"
          f"; {'every pair' if args.every == 1 else f'every {args.every}th pair'}; overrides {args.set or 'none'}")
    print("| group | pairs | margin dB | own / swapped masked PSNR | colour following | strength (truth) "
          "| own MSE garment / rest | swapped MSE garment / rest | garment share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for g, r in rows.items():
        print(f"| {g} | {r['pairs']} | {r['margin_db']:+.2f} | {r['own_psnr']:.2f} / {r['swapped_psnr']:.2f} | "
              f"{r['following']:.3f} | {r['strength']:.2f} ({r['truth_strength']:.2f}) | "
              f"{r['own_mse_garment']:.4f} / {r['own_mse_rest']:.4f} | "
              f"{r['swapped_mse_garment']:.4f} / {r['swapped_mse_rest']:.4f} | {r['garment_share']:.2f} |")


if __name__ == "__main__":
    main()
