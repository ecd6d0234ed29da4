"""The evaluation: base, base + LoRA and a grey fill on held-out pairs, per garment group.

:func:`evaluate` is the one function every figure of the project comes from: the learning
benchmark (``bench/learning_margins.py``), the slow learning test, ``ray_jobs/evaluate.py``,
``easy_train.py full --push-to-hub`` and the model card (:func:`evaluation_table`).

Generation goes through :func:`catvton.eval.generate.generate` (in-process or Ray Data: the same
numbers), one seed per pair (``infer.seed`` + the pair's index in its group), the same seeds for
the base and the LoRA. The grey fill (the masked region painted mid-grey) is the trivial
reference a model must beat. Every score is on the person half against the ground truth:

- ``masked_psnr``, ``masked_ssim``: inside the try-on mask (what the model generated);
- ``half_psnr``, ``half_ssim``: over the whole person half (outside the mask every model keeps
  the input, so these move with the masked ones, diluted by the unmasked area);
- ``lpips``, ``fid``, ``kid``: over the half, when their pretrained networks can be loaded; else
  they are listed under ``absent`` with the reason, never faked.

Does the person wear *the garment given*? Each model also fills every canvas with another pair's
garment on the garment half (:func:`~catvton.eval.metrics.swap_partners`: same group, another pid,
the same seed), and ``transfer`` holds, for the base and the LoRA:

- ``margin_db``: masked PSNR with the pair's own garment minus with the swapped one, both against
  the pair's true photo. About 0 when the garment half is ignored (a blank or a wrong garment
  would score the same); large when the result wears what it is given;
- ``colour_following``: across the own and the swapped results, the correlation between the
  given garment's mean colour and the generated mean colour inside the person's garment region
  (``garment_mask``), averaged over RGB (:func:`~catvton.eval.metrics.colour_following`);
- ``colour_strength``: over the same colours, the slope of generated on given (1: a change of
  garment colour reaches the person in full; below 1: the model hedges towards an average colour,
  which costs masked PSNR while ``colour_following`` stays high; :func:`~catvton.eval.metrics.colour_strength`).

Writes ``report.json`` (:data:`REPORT_KEYS`; each group :data:`GROUP_KEYS`), ``report.md`` (the
table with deltas) and ``grid_<group>.png`` (garment | masked person | base | LoRA | ground truth).
Given an outfit section (:func:`catvton.eval.outfits.evaluate_outfits`: a top and a bottom in one
request, per region, against true outfit photos), ``report.json`` adds it under ``outfits`` and
``report.md`` its table. Given shape cases (:class:`catvton.eval.shape.ShapeCase`: held-out people
given a garment of another type, with the rendered truth), the base and the LoRA dress them by the
service's path and ``report.json`` adds ``shape`` (:data:`catvton.eval.shape.SECTION_KEYS`: per kind
``n`` and the means, and the LoRA's ``shape.<kind>.iou`` / ``shape.<kind>.psnr`` under ``metrics``),
``report.md`` its table and ``grid_shape_<kind>.png`` a grid per kind (:func:`catvton.eval.shape.evaluate_shape_models`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catvton.artifacts import REPORT_JSON, REPORT_MD
from catvton.config import Config
from catvton.eval import metrics as M
from catvton.eval.generate import generate
from catvton.eval.outfits import outfit_markdown
from catvton.eval.shape import ShapeCase, evaluate_shape_models, shape_markdown
from catvton.infer.tryon import grid_image

PER_IMAGE = ("masked_psnr", "masked_ssim", "half_psnr", "half_ssim")
"""Metrics computed per image and averaged; always present."""
METRICS = PER_IMAGE + ("lpips", "fid", "kid")
"""Every metric key a report can hold, in table order."""
HIGHER_IS_BETTER = {"masked_psnr": True, "masked_ssim": True, "half_psnr": True, "half_ssim": True,
                    "lpips": False, "fid": False, "kid": False}
MODELS = ("base", "lora", "grey")
"""The scored models of a group: the base, the base + LoRA, the grey fill."""
REPORT_KEYS = ("base", "transformer_override", "lora", "source", "generation", "seed", "steps", "guidance",
               "groups", "absent", "higher_is_better")
"""The keys of ``report.json`` (plus ``outfits`` when :func:`evaluate` is given an outfit section, and
``shape`` when it is given shape cases)."""
GROUP_KEYS = ("pairs", "pids", "metrics", "base", "lora", "grey", "delta", "transfer")
"""The keys of each group of a report: ``metrics`` lists the metric keys computed (:data:`METRICS`
less the absent ones); ``base``, ``lora``, ``grey`` map each to its mean; ``delta`` is LoRA - base;
``transfer`` is ``{"base": TRANSFER_KEYS, "lora": TRANSFER_KEYS}`` (None for a group of one pid)."""
TRANSFER_KEYS = ("margin_db", "colour_following", "colour_strength", "own_masked_psnr", "swapped_masked_psnr")
"""The garment-transfer scores of one model on one group (see the module docstring)."""
GRID_ROWS = 6


def score_group(results: np.ndarray, canvas: np.ndarray, mask: np.ndarray,
                extractor: torch.nn.Module | None, absent: dict[str, str]) -> dict[str, float]:
    """Every metric of one model on one group (person halves of ``(N, H, 2W, 3)`` canvases).
    Unavailable ones go to ``absent`` with the reason."""
    w = canvas.shape[2] // 2
    gt, m, pred = canvas[:, :, w:], mask[:, :, w:], results[:, :, w:]
    out = {"masked_psnr": float(M.masked_psnr(pred, gt, m).mean()),
           "masked_ssim": float(M.masked_ssim(pred, gt, m).mean()),
           "half_psnr": float(M.half_psnr(pred, gt).mean()),
           "half_ssim": float(M.half_ssim(pred, gt).mean())}
    if "lpips" not in absent:
        try:
            out["lpips"] = M.lpips(pred, gt)
        except M.MetricUnavailable as e:
            absent["lpips"] = str(e)
    if "fid" not in absent:
        if len(pred) < 2:
            absent["fid"] = absent["kid"] = "needs at least 2 images per group"
        else:
            try:
                out.update(M.fid_kid(gt, pred, extractor))
            except M.MetricUnavailable as e:
                absent["fid"] = absent["kid"] = str(e)
    return out


def grey_canvases(canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference: every canvas with the masked region of its person half filled mid-grey."""
    w = canvas.shape[2] // 2
    grey = canvas.copy()
    grey[:, :, w:] = M.grey_fill(canvas[:, :, w:], mask[:, :, w:])
    return grey


def swapped_canvases(group: dict[str, Any]) -> np.ndarray:
    """The group's canvases with each garment half replaced by its swap partner's (another pid);
    a group of one pid is returned as it is (nothing to swap with)."""
    canvas = group["canvas"]
    if len(set(group["pid"])) < 2:
        return canvas.copy()
    w = canvas.shape[2] // 2
    out = canvas.copy()
    out[:, :, :w] = canvas[M.swap_partners(list(group["pid"])), :, :w]
    return out


def transfer_scores(group: dict[str, Any], own: np.ndarray, swapped: np.ndarray) -> dict[str, float]:
    """:data:`TRANSFER_KEYS` of one model on one group, from its results with the pairs' own
    garments (``own``) and with the swapped ones (``swapped``), both ``(N, H, 2W, 3)``."""
    canvas, mask, region = group["canvas"], group["mask"], group["garment_mask"]
    w = canvas.shape[2] // 2
    gt, m = canvas[:, :, w:], mask[:, :, w:]
    own_psnr = float(M.masked_psnr(own[:, :, w:], gt, m).mean())
    swapped_psnr = float(M.masked_psnr(swapped[:, :, w:], gt, m).mean())
    given = M.garment_colours(np.concatenate([canvas[:, :, :w], swapped_canvases(group)[:, :, :w]]))
    worn = M.region_colours(np.concatenate([own[:, :, w:], swapped[:, :, w:]]), np.concatenate([region, region]))
    return {"margin_db": own_psnr - swapped_psnr, "colour_following": M.colour_following(given, worn),
            "colour_strength": M.colour_strength(given, worn),
            "own_masked_psnr": own_psnr, "swapped_masked_psnr": swapped_psnr}


def evaluate(cfg: Config, lora_dir: str | Path, samples: dict[str, dict[str, Any]], out_dir: str | Path, *,
             ray_data: bool = False, actors: int = 1, batch_size: int = 8,
             extractor: torch.nn.Module | None = None, source: str = "",
             outfits: dict[str, Any] | None = None, shape: Sequence[ShapeCase] | None = None) -> dict[str, Any]:
    """Generate with the base and with the LoRA on ``samples`` (``{group: {"canvas", "mask",
    "garment_mask", "pid"}}``, e.g. :func:`catvton.eval.samples.held_out_samples`), score them and the grey fill,
    and write the report files into ``out_dir``. Returns the report (see the module docstring).

    ``cfg`` names concrete models (entry points resolve offline names first). ``ray_data``,
    ``actors``, ``batch_size``: how :func:`~catvton.eval.generate.generate` runs (not what it gives).
    ``extractor``: a feature network for FID/KID instead of Inception. ``outfits``: an outfit
    section to add (:data:`catvton.eval.outfits.OUTFIT_KEYS`), as ``report["outfits"]``. ``shape``:
    cross-type cases (``catvton.offline.shape.shape_cases``) to dress with both models in this
    process (on CUDA when ``cfg.train.use_gpu`` and one is visible), as ``report["shape"]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(samples)
    canvas = np.concatenate([samples[g]["canvas"] for g in names])
    mask = np.concatenate([samples[g]["mask"] for g in names])
    seeds = [cfg.infer.seed + i for g in names for i in range(len(samples[g]["canvas"]))]
    swapped = np.concatenate([swapped_canvases(samples[g]) for g in names])
    n = len(canvas)
    how = dict(ray_data=ray_data, actors=actors, batch_size=batch_size)
    # every group, own and swapped garments, in one call per model: each model is loaded once
    both = {name: generate(cfg, np.concatenate([canvas, swapped]), np.concatenate([mask, mask]), seeds + seeds,
                           lora=weights, **how) for name, weights in (("base", None), ("lora", lora_dir))}
    generated = {"base": both["base"][:n], "lora": both["lora"][:n], "grey": grey_canvases(canvas, mask)}
    generated_swapped = {"base": both["base"][n:], "lora": both["lora"][n:]}
    absent: dict[str, str] = {}
    groups: dict[str, Any] = {}
    start = 0
    for g in names:
        s = samples[g]
        end = start + len(s["canvas"])
        results = {k: v[start:end] for k, v in generated.items()}
        scores = {k: score_group(results[k], s["canvas"], s["mask"], extractor, absent) for k in MODELS}
        keys = [k for k in METRICS if all(k in scores[model] for model in MODELS)]
        transfer = None if len(set(s["pid"])) < 2 else {
            model: transfer_scores(s, results[model], generated_swapped[model][start:end]) for model in ("base", "lora")}
        groups[g] = {"pairs": len(s["canvas"]), "pids": len(set(s["pid"])), "metrics": keys,
                     **{model: {k: scores[model][k] for k in keys} for model in MODELS},
                     "delta": {k: scores["lora"][k] - scores["base"][k] for k in keys}, "transfer": transfer}
        rows = slice(0, GRID_ROWS)
        grid_image(s["canvas"][rows], s["mask"][rows], {"base": results["base"][rows], "LoRA": results["lora"][rows]}
                   ).save(out / f"grid_{g}.png")
        start = end
    report = {"base": cfg.model.base, "transformer_override": cfg.model.transformer_override,
              "lora": str(lora_dir), "source": source,
              "generation": f"Ray Data, {actors} actor(s)" if ray_data else "in-process",
              "seed": cfg.infer.seed, "steps": cfg.infer.steps, "guidance": cfg.infer.guidance,
              "groups": groups, "absent": absent, "higher_is_better": HIGHER_IS_BETTER}
    if outfits is not None:
        report["outfits"] = outfits
    if shape is not None:
        device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
        report["shape"] = evaluate_shape_models(cfg, lora_dir, shape, out, device=device, batch_size=batch_size)
    write_evaluation(report, out)
    return report


def write_evaluation(report: dict[str, Any], out_dir: str | Path) -> None:
    """``report.json`` and ``report.md`` (:func:`report_markdown`) of ``report`` in ``out_dir``."""
    out = Path(out_dir)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MD).write_text(report_markdown(report))


METRIC_NOTE = ("Scores on the person half against the ground truth: `masked_*` inside the try-on mask, `half_*` "
               "over the whole half; lower is better for `lpips`, `fid`, `kid`.")


TRANSFER_NOTE = ("Garment transfer: `margin_db` is the masked PSNR with the pair's own garment minus with another "
                 "item's garment on the garment half (about 0 when the garment is ignored); `colour_following` "
                 "correlates the given garment's colour with the colour generated on the person (1: follows it); "
                 "`colour_strength` is how much of a colour change arrives (the slope; 1: all of it).")


def evaluation_table(report: dict[str, Any]) -> str:
    """Markdown: one line per group and metric, base vs LoRA with the delta and the grey-fill
    reference; then what each metric family means and the metrics not computed, with why."""
    rows = ["| group | metric | base | LoRA | delta | grey fill |", "|---|---|---|---|---|---|"]
    for group, g in report.get("groups", {}).items():
        for metric in g.get("metrics", []):
            b, lo = g["base"].get(metric), g["lora"].get(metric)
            if b is None or lo is None:
                continue
            grey = g.get("grey", {}).get(metric)
            rows.append(f"| {group} ({g['pairs']} pairs) | {metric} | {b:.4f} | {lo:.4f} | {lo - b:+.4f} | "
                        f"{'-' if grey is None else f'{grey:.4f}'} |")
    rows += ["", METRIC_NOTE]
    transfer = [(group, g["transfer"]) for group, g in report.get("groups", {}).items() if g.get("transfer")]
    if transfer:
        rows += ["", "| group | garment transfer | base | LoRA |", "|---|---|---|---|"]
        for group, t in transfer:
            rows += [f"| {group} | {key} | {t['base'][key]:.3f} | {t['lora'][key]:.3f} |"
                     for key in ("margin_db", "colour_following", "colour_strength")]
        rows += ["", TRANSFER_NOTE]
    absent = report.get("absent", {})
    if absent:
        rows.append("")
        rows += [f"- `{k}` not computed: {v}" for k, v in absent.items()]
    return "\n".join(rows)


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation: base vs LoRA ({report['source'] or 'held-out pairs'})", "",
             f"- base: `{report['base']}`" + (f" + `{report['transformer_override']}`" if report["transformer_override"] else ""),
             f"- LoRA: `{report['lora']}`",
             f"- {report['steps']} steps, guidance {report['guidance']}, seed {report['seed']} + the pair's index "
             f"in its group (the same noise for base and LoRA); generated {report['generation']}",
             "- grey fill: the masked region painted mid-grey, the trivial reference", "",
             evaluation_table(report), ""]
    lines += [f"![{g}](grid_{g}.png)" for g in report["groups"]]
    if report.get("outfits"):
        lines += ["", outfit_markdown(report["outfits"])]
    if report.get("shape"):
        lines += ["", shape_markdown(report["shape"])]
    return "\n".join(lines) + "\n"
