"""Does the default job learn? For each seed: run the default training job, then score the
alpha base, base + LoRA and a grey fill on held-out (test-split) pairs per garment group.

    python bench/learning_margins.py --seeds 0 1 2          # ~6 min a seed on 2 CPUs

Prints, per seed, the lower-body val loss at step 0 and at the end, and masked PSNR / SSIM per
group; then the smallest margins over the seeds (LoRA - alpha and LoRA - grey on lower and full;
LoRA - alpha on upper). docs/PERFORMANCE.md records them; tests/test_learning.py asserts half
of the smallest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_seed(seed: int, config: str, extra: list[str]) -> dict:
    import torch

    from catvton.config import load_config
    from catvton.eval.tryon_eval import compare_base_and_lora
    from catvton.train.job import run_job

    cfg = load_config(config, extra + [f"train.seed={seed}", f"run.name=tiny-lora-seed{seed}", "run.wandb_mode=disabled"])
    outcome = run_job(cfg)
    history = torch.load(outcome.checkpoint_dir / "training_state.pt", weights_only=False)["history"]
    vals = [h for h in history if "val_loss_lower" in h]
    scores = compare_base_and_lora(outcome.config, outcome.weights_dir, split="test",
                                   grid_dir=outcome.run_dir / "eval")
    return {"seed": seed, "val_loss_lower_start": vals[0]["val_loss_lower"], "val_loss_lower_end": vals[-1]["val_loss_lower"],
            "scores": scores, "run_dir": str(outcome.run_dir)}


def margins(result: dict) -> dict[str, float]:
    s = result["scores"]
    out = {}
    for g in ("lower", "full"):
        for m in ("psnr", "ssim"):
            out[f"{g}_{m}_vs_alpha"] = s[g]["lora"][m] - s[g]["base"][m]
            out[f"{g}_{m}_vs_grey"] = s[g]["lora"][m] - s[g]["grey"][m]
    for m in ("psnr", "ssim"):
        out[f"upper_{m}_vs_alpha"] = s["upper"]["lora"][m] - s["upper"]["base"][m]
    out["val_lower_end_over_start"] = result["val_loss_lower_end"] / result["val_loss_lower_start"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "outputs" / "learning_margins.json"))
    args = p.parse_args()

    from catvton.ray_utils import init_ray

    init_ray()
    results = []
    for seed in args.seeds:  # each seed's result is kept as it finishes: a crash loses one seed, not all
        done = Path(args.out).with_name(f"{Path(args.out).stem}_seed{seed}.json")
        if done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        results.append(run_seed(seed, args.config, args.set))
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(results[-1], indent=2) + "\n")
        print(f"seed {seed} done: {done}", flush=True)
    for r in results:
        print(f"\nseed {r['seed']}: lower val loss {r['val_loss_lower_start']:.4f} -> {r['val_loss_lower_end']:.4f}")
        print("  group  pairs pids | PSNR alpha  LoRA  grey | SSIM alpha  LoRA  grey")
        for g, s in r["scores"].items():
            print(f"  {g:6s} {s['pairs']:5d} {s['pids']:4d} | {s['base']['psnr']:10.2f} {s['lora']['psnr']:5.2f} "
                  f"{s['grey']['psnr']:5.2f} | {s['base']['ssim']:10.3f} {s['lora']['ssim']:5.3f} {s['grey']['ssim']:5.3f}")
    all_m = [margins(r) for r in results]
    smallest = {k: min(m[k] for m in all_m) for k in all_m[0]}
    smallest["val_lower_end_over_start"] = max(m["val_lower_end_over_start"] for m in all_m)
    print("\nsmallest margin over seeds (largest for the val-loss ratio):")
    for k, v in smallest.items():
        print(f"  {k:28s} {v:+.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "margins": all_m, "smallest": smallest}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
