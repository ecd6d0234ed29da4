"""What each inference lever of ``infer`` saves and what it costs (issue 16): step caching at several
thresholds, and a fused LoRA, on held-out pairs (the lower and full groups of the test split).

    python bench/tryon_speed.py --lora outputs/bench-lora/lora    # 8 and 28 steps: ~4 CPU minutes
    python bench/tryon_speed.py --steps 8 --per-group 1            # the base + alpha alone: ~1 CPU minute
    python bench/tryon_speed.py --lora outputs/bench-lora/lora --plot docs/images/tryon_speed.png

``outputs/bench-lora/lora``: the default training job, ``python ray_jobs/train.py --set
run.name=bench-lora`` (~4 min on 2 quiet CPUs). On a shared machine the wall time is what the other
jobs leave: the run prints the load average.

Every setting is a :class:`~catvton.eval.generate.TryOnPredictor` (the evaluation's Ray Data stage,
built by ``TryOn.load``: the levers are applied exactly as serving and evaluation apply them), one
try-on per call, the pair's seed as in the evaluation (``infer.seed`` + its index in its group). The
settings take turns pair by pair, so drift on a shared machine spreads over all of them. A row:

- ``ms / try-on``: median time of one call (canvas in, pasted result out; one torch thread);
- ``passes``: transformer full-pass equivalents per try-on (block computations counted by forward
  hooks, :class:`~catvton.infer.levers.PassCounter`, over blocks per pass); ``cut``: steps / passes;
- masked PSNR / SSIM against the true photo, per group, scored by the evaluation's own
  :func:`~catvton.eval.report.score_group`, with the change from the uncached row (``d``);
- masked PSNR / SSIM against the uncached output of the same pair and seed (both groups).

A setting *meets* acceptance 1 of issue 16 when it cuts passes at least 2x and moves masked PSNR
against the truth by at most 0.3 dB in both groups, either way: on the tiny model a cache that
changes the image more makes it smoother, and PSNR against the truth rewards that (a gain is a
change, not an improvement; the columns against the uncached output say how much changed).

With ``--lora``: the base (same base and alpha, no LoRA), the LoRA as adapter layers and the LoRA
fused (``infer.fuse_lora``), timed in turns at the first step count (the median of each model and
of the per-round ratios to the base), with the largest pixel difference between fused and unfused.
Writes the JSON (``--out``) and the plot of quality against passes (``--plot``); docs/PERFORMANCE.md
records them. No test asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = ("lower", "full")
UNCACHED = "none"
SETTINGS: dict[str, dict[str, Any]] = {
    UNCACHED: {},
    "first_block 0.05": dict(cache="first_block", first_block_threshold=0.05),
    "first_block 0.1": dict(cache="first_block", first_block_threshold=0.1),
    "first_block 0.2": dict(cache="first_block", first_block_threshold=0.2),
    "first_block 0.35": dict(cache="first_block", first_block_threshold=0.35),
    "first_block 0.6": dict(cache="first_block", first_block_threshold=0.6),
    "taylorseer 2/2": dict(cache="taylorseer", taylorseer_interval=2, taylorseer_warmup=2),
    "taylorseer 3/2": dict(cache="taylorseer", taylorseer_interval=3, taylorseer_warmup=2),
    "taylorseer 4/1": dict(cache="taylorseer", taylorseer_interval=4, taylorseer_warmup=1),
    "taylorseer 6/1": dict(cache="taylorseer", taylorseer_interval=6, taylorseer_warmup=1),
    "mag 0.03": dict(cache="mag", mag_threshold=0.03),
    "mag 0.06": dict(cache="mag", mag_threshold=0.06),
    "mag 0.12": dict(cache="mag", mag_threshold=0.12),
    "mag 0.24": dict(cache="mag", mag_threshold=0.24),
    "mag 0.5": dict(cache="mag", mag_threshold=0.5),
}
"""The cache settings measured: ``taylorseer I/W`` is interval I after W warm-up steps; MagCache's
ratios are calibrated at load for each step count (``infer.mag_ratios`` empty), as in serving."""
MAX_CHANGE_DB = 0.3
MIN_CUT = 2.0
NOT_SCORED = {"lpips": "not part of this bench", "fid": "not part of this bench", "kid": "not part of this bench"}


def setting_config(cfg, steps: int, **infer) -> dict[str, Any]:
    """``cfg`` as a dict with ``infer.steps`` and the given ``infer`` fields set."""
    d = cfg.to_dict()
    d["infer"] = {**d["infer"], "steps": steps, **infer}
    return d


def held_out(cfg, per_group: int) -> dict[str, dict[str, Any]]:
    """The first ``per_group`` test-split pairs of each group in :data:`GROUPS`, as uint8 rows for
    the predictor with the evaluation's seeds."""
    from catvton.data.canvas import to_uint8
    from catvton.eval.samples import held_out_samples

    samples = held_out_samples(cfg, "test", GROUPS, per_group)
    missing = [g for g in GROUPS if g not in samples]
    if missing:
        raise SystemExit(f"no held-out {missing} pairs in {cfg.data.source}: is data.groups limited?")
    for s in samples.values():
        s["rows"] = {"index": np.arange(len(s["pid"])), "canvas": to_uint8(s["canvas"]),
                     "mask": s["mask"].astype(np.uint8), "seed": cfg.infer.seed + np.arange(len(s["pid"]))}
    return samples


def one_call(predictor, rows: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, float]:
    """The result ``(H, 2W, 3)`` of row ``i`` and the seconds it took."""
    t0 = time.perf_counter()
    out = predictor({k: v[i:i + 1] for k, v in rows.items()})["result"][0]
    return out, time.perf_counter() - t0


def measure(predictors: dict[str, Any], samples: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every predictor on every pair, in turns (the order rotated pair by pair, after one untimed
    warm-up call each); results per group, seconds and passes per try-on."""
    from catvton.infer.levers import PassCounter

    first = next(iter(samples.values()))["rows"]
    for p in predictors.values():
        one_call(p, first, 0)
    out = {k: {"results": {g: [] for g in samples}, "seconds": []} for k in predictors}
    names = list(predictors)
    pairs = [(g, i) for g, s in samples.items() for i in range(len(s["pid"]))]
    with contextlib.ExitStack() as stack:
        counters = {k: stack.enter_context(PassCounter(p.tryon.pipe.transformer)) for k, p in predictors.items()}
        for n, (g, i) in enumerate(pairs):
            for k in names[n % len(names):] + names[:n % len(names)]:
                result, sec = one_call(predictors[k], samples[g]["rows"], i)
                out[k]["results"][g].append(result)
                out[k]["seconds"].append(sec)
    calls = len(pairs)
    for k, c in counters.items():
        out[k]["results"] = {g: np.stack(r) for g, r in out[k]["results"].items()}
        out[k].update(passes=c.passes / calls, calls_per_tryon=c.calls / calls)
    return out


def score(measured: dict[str, dict[str, Any]], samples: dict[str, dict[str, Any]], steps: int) -> list[dict]:
    """A row per setting: speed, passes, quality against the truth and against the uncached output."""
    from catvton.eval.report import score_group

    ref = measured[UNCACHED]
    rows = []
    for k, m in measured.items():
        truth = {g: score_group(m["results"][g], s["canvas"], s["mask"], None, dict(NOT_SCORED))
                 for g, s in samples.items()}
        both = {key: np.concatenate([v["results"][g] for g in samples]) for key, v in (("m", m), ("ref", ref))}
        vs_ref = score_group(both["m"], both["ref"], np.concatenate([s["mask"] for s in samples.values()]), None,
                             dict(NOT_SCORED))
        row = {"steps": steps, "setting": k, "infer": SETTINGS[k], "sec_per_tryon": statistics.median(m["seconds"]),
               "passes": m["passes"], "cut": steps / m["passes"], "calls_per_tryon": m["calls_per_tryon"],
               "truth": {g: {x: t[x] for x in ("masked_psnr", "masked_ssim")} for g, t in truth.items()},
               "vs_uncached": {x: vs_ref[x] for x in ("masked_psnr", "masked_ssim")}}
        rows.append(row)
    base = rows[0]["truth"]
    for row in rows:
        row["psnr_change_db"] = {g: row["truth"][g]["masked_psnr"] - base[g]["masked_psnr"] for g in base}
        row["meets"] = row["cut"] >= MIN_CUT and max(map(abs, row["psnr_change_db"].values())) <= MAX_CHANGE_DB
    return rows


def run_steps(cfg, lora: str | None, samples, steps: int, log=print) -> list[dict]:
    from catvton.eval.generate import TryOnPredictor

    t0 = time.perf_counter()
    predictors = {k: TryOnPredictor(setting_config(cfg, steps, **v), lora=lora) for k, v in SETTINGS.items()}
    log(f"{steps} steps: {len(predictors)} settings loaded in {time.perf_counter() - t0:.0f} s (MagCache calibrated)")
    t0 = time.perf_counter()
    measured = measure(predictors, samples)
    log(f"{steps} steps: {len(predictors)} x {len(next(iter(measured.values()))['seconds'])} try-ons in "
        f"{time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")
    rows = score(measured, samples, steps)
    for r in rows:
        log(format_row(r))
    return rows


def fused_timing(cfg, lora: str, samples, steps: int, rounds: int) -> dict[str, Any]:
    """Base, LoRA (adapter layers) and fused LoRA at ``steps`` steps, one try-on each per round, in
    turns; median seconds, ratios to the base, and the largest fused - unfused pixel difference."""
    from catvton.eval.generate import TryOnPredictor

    d = setting_config(cfg, steps)
    predictors = {"base": TryOnPredictor(d), "lora": TryOnPredictor(d, lora=lora),
                  "fused": TryOnPredictor(setting_config(cfg, steps, fuse_lora=True), lora=lora)}
    assert predictors["fused"].tryon.levers["fused_lora"], "the LoRA was not fused"
    rows = [(g, i) for g, s in samples.items() for i in range(len(s["pid"]))]
    seconds: dict[str, list[float]] = {k: [] for k in predictors}
    ratios: dict[str, list[float]] = {"fused": [], "lora": []}
    diff = {"fused_vs_lora": 0.0, "lora_vs_base": 0.0}
    names = list(predictors)
    for r in range(-1, rounds):  # round -1: an untimed warm-up
        g, i = rows[r % len(rows)]
        out = {}
        for k in names[r % 3:] + names[:r % 3]:  # each model first, second and last in turn
            out[k], sec = one_call(predictors[k], samples[g]["rows"], i)
            if r >= 0:
                seconds[k].append(sec)
        if r >= 0:  # adjacent in time: drift on a shared machine cancels in the ratio
            for k in ratios:
                ratios[k].append(seconds[k][-1] / seconds["base"][-1])
        diff["fused_vs_lora"] = max(diff["fused_vs_lora"], float(np.abs(out["fused"] - out["lora"]).max()))
        diff["lora_vs_base"] = max(diff["lora_vs_base"], float(np.abs(out["lora"] - out["base"]).max()))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"steps": steps, "rounds": rounds, "sec_per_tryon": med,
            "fused_over_base": statistics.median(ratios["fused"]), "lora_over_base": statistics.median(ratios["lora"]),
            "max_pixel_diff": diff}


def format_row(r: dict) -> str:
    t, d = r["truth"], r["psnr_change_db"]
    vs = r["vs_uncached"]
    same = "identical" if vs["masked_psnr"] >= 99 else f"{vs['masked_psnr']:6.2f} dB {vs['masked_ssim']:.4f}"
    return (f"{r['steps']:3d} {r['setting']:17s} {1000 * r['sec_per_tryon']:7.1f} ms  passes {r['passes']:5.2f} "
            f"({r['cut']:4.2f}x)  truth lower {t['lower']['masked_psnr']:6.2f} ({d['lower']:+.2f}) "
            f"{t['lower']['masked_ssim']:.3f}  full {t['full']['masked_psnr']:6.2f} ({d['full']:+.2f}) "
            f"{t['full']['masked_ssim']:.3f}  vs uncached {same:>18s}  {'MEETS' if r['meets'] else ''}")


def markdown(rows: list[dict]) -> str:
    """The table for docs/PERFORMANCE.md."""
    lines = ["| steps | setting | ms / try-on | passes | cut | lower PSNR (d) | lower SSIM | full PSNR (d) | full SSIM "
             "| vs uncached PSNR / SSIM | meets |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t, d, vs = r["truth"], r["psnr_change_db"], r["vs_uncached"]
        same = "identical" if vs["masked_psnr"] >= 99 else f"{vs['masked_psnr']:.2f} dB / {vs['masked_ssim']:.4f}"
        lines.append(f"| {r['steps']} | {r['setting']} | {1000 * r['sec_per_tryon']:.0f} | {r['passes']:.2f} | "
                     f"{r['cut']:.2f}x | {t['lower']['masked_psnr']:.2f} ({d['lower']:+.2f}) | "
                     f"{t['lower']['masked_ssim']:.3f} | {t['full']['masked_psnr']:.2f} ({d['full']:+.2f}) | "
                     f"{t['full']['masked_ssim']:.3f} | {same} | {'yes' if r['meets'] else ''} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Masked PSNR against the truth (mean of the groups) and against the uncached output, over
    transformer passes, one column per step count, a line per cache kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(2, len(steps), figsize=(5.5 * len(steps), 7.5), squeeze=False)
    for col, n in enumerate(steps):
        at = [r for r in rows if r["steps"] == n]
        ref = next(r for r in at if r["setting"] == UNCACHED)
        for kind in ("first_block", "taylorseer", "mag"):
            pts = sorted((r for r in at if r["setting"].startswith(kind)), key=lambda r: r["passes"])
            x = [r["passes"] for r in pts]
            axes[0][col].plot(x, [np.mean([r["truth"][g]["masked_psnr"] for g in GROUPS]) for r in pts], "o-", label=kind)
            axes[1][col].plot(x, [min(r["vs_uncached"]["masked_psnr"], 60) for r in pts], "o-", label=kind)
            for r in pts:
                axes[0][col].annotate(r["setting"].split()[-1], (r["passes"], np.mean(
                    [r["truth"][g]["masked_psnr"] for g in GROUPS])), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ref_psnr = np.mean([ref["truth"][g]["masked_psnr"] for g in GROUPS])
        axes[0][col].plot([ref["passes"]], [ref_psnr], "k*", markersize=10, label="uncached")
        for sign in (-1, 1):
            axes[0][col].axhline(ref_psnr + sign * MAX_CHANGE_DB, color="grey", ls="--", lw=1,
                                 label=f"uncached +/- {MAX_CHANGE_DB} dB" if sign > 0 else None)
        for row in (0, 1):
            axes[row][col].axvline(n / MIN_CUT, color="red", ls=":", lw=1, label=f"{MIN_CUT:g}x fewer passes")
            axes[row][col].set_xlabel("transformer passes per try-on (full-pass equivalents)")
        axes[0][col].set_title(f"{n} steps: masked PSNR vs the true photo (lower + full)")
        axes[1][col].set_title(f"{n} steps: masked PSNR vs the uncached output")
        axes[0][col].set_ylabel("dB")
        axes[1][col].set_ylabel("dB (60: capped)")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", default=None, help="a LoRA folder (its training_config.json gives the base and alpha); "
                                                "without it: configs/tiny.yaml's base + alpha, no fused rows")
    p.add_argument("--config", default=None, help="config when the LoRA has none (default configs/tiny.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 28], help="step counts, each a block of rows")
    p.add_argument("--per-group", type=int, default=3, help="held-out pairs of each group (lower, full)")
    p.add_argument("--rounds", type=int, default=40, help="fused-LoRA timing: try-ons of each model, in turns")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "tryon_speed.json"))
    p.add_argument("--plot", default=None, help="the plot's path (default: --out with .png)")
    a = p.parse_args(argv)

    import torch

    from catvton.artifacts import TRAINING_CONFIG
    from catvton.config import load_config
    from catvton.offline import resolve

    torch.set_num_threads(1)  # shared cores: a second thread costs more than it gives (PERFORMANCE.md)
    own = Path(a.lora) / TRAINING_CONFIG if a.lora else None
    config = a.config or (own if own is not None and own.is_file() else ROOT / "configs" / "tiny.yaml")
    cfg = resolve(load_config(config, a.set))
    t0 = time.perf_counter()
    samples = held_out(cfg, a.per_group)
    print(f"held-out pairs rebuilt from the source in {time.perf_counter() - t0:.0f} s")
    pairs = ", ".join(f"{len(s['pid'])} {g}" for g, s in samples.items())
    print(f"base {cfg.model.base} + {cfg.model.transformer_override}, LoRA {a.lora}; {pairs} held-out pairs; "
          f"canvas 2 x {cfg.canvas.half_width}x{cfg.canvas.half_height}; 1 torch thread")
    rows = [r for n in a.steps for r in run_steps(cfg, a.lora, samples, n)]
    result: dict[str, Any] = {"config": str(config), "lora": a.lora, "pairs": {g: len(s["pid"]) for g, s in samples.items()},
                              "rows": rows, "meets": [f"{r['steps']} steps {r['setting']}" for r in rows if r["meets"]]}
    print(f"\nmeets (>= {MIN_CUT:g}x fewer passes, masked PSNR vs the truth within {MAX_CHANGE_DB} dB in each group): "
          f"{result['meets'] or 'none'}")
    if a.lora:
        f = result["fused"] = fused_timing(cfg, a.lora, samples, a.steps[0], a.rounds)
        s = f["sec_per_tryon"]
        print(f"\n{f['steps']} steps, median of {f['rounds']} in turns: base {1000 * s['base']:.1f} ms, LoRA "
              f"{1000 * s['lora']:.1f} ms, fused {1000 * s['fused']:.1f} ms; median per-round ratio to the base: LoRA "
              f"{f['lora_over_base']:.3f}x, fused {f['fused_over_base']:.3f}x; fused vs LoRA max pixel difference "
              f"{f['max_pixel_diff']['fused_vs_lora']:.2e} (LoRA vs base {f['max_pixel_diff']['lora_vs_base']:.3f})")
    print("\n" + markdown(rows))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_path = Path(a.plot) if a.plot else out.with_suffix(".png")
    plot(rows, plot_path)
    print(f"\nwrote {out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
