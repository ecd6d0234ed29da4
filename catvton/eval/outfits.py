"""Outfit try-on scored per region against the true photo of the person wearing both garments.

An outfit is dressed as the service dresses it (:meth:`catvton.infer.serving.TryOnService.dress_many`:
the top's pass, then the bottom's on its result, each inside its own general mask), on held-out
triples that come with their ground truth (person, top, bottom -> the true photo;
``catvton.offline.outfits`` makes them in the synthetic world, this module takes arrays). Three runs
per model, the base (its alpha, no LoRA) and the base + LoRA:

- ``outfit``: top and bottom, two passes, each region scored against the outfit's true photo;
- ``upper`` / ``lower``: one garment alone, one pass, its region scored against the true photo of
  the person in that garment and their own other one.

Scores per region, inside the region's general mask (the mask its pass painted):
``masked_psnr`` / ``masked_ssim``, and the garment transfer of the issue "A tiny world where
try-on is real": each triple dressed again in another triple's garments (the same person, masks
and seed) and scored against its own truth; ``margin_db`` is own minus swapped (about 0 when the
garment given is ignored), ``colour_following`` correlates the given garment's colour with the
colour generated where the truth shows it (:func:`catvton.eval.metrics.colour_following`). The
grey fill of the region is the trivial reference. A triple's noise comes from ``infer.seed`` + its
index in every run and for both models, so the ``upper`` run is the ``outfit`` run's first pass,
exactly: the two differ in the upper region only where the bottom's pass repaints it.

Scored at the canvas half's resolution (photo and masks fitted as a training sample's person is,
:func:`catvton.data.canvas.fit_to_half`), so the figures sit on the same grid as the per-pair ones
of :mod:`catvton.eval.report` (the model generates at that size; the dressed photo is that half
pasted back at the photo's size).

Arrays (``triples``), ``S`` the photo size: ``person``, ``top``, ``bottom``, ``truth``,
``truth_upper``, ``truth_lower`` ``(N, S, S, 3)`` uint8; ``upper_mask``, ``lower_mask`` (the
person's own garments), ``top_mask``, ``bottom_mask`` (the garments on their worn photos)
``(N, S, S)`` bool; ``truth_masks[truth][region]`` ``(N, S, S)`` bool (where each truth shows each
garment); ``pid``, ``top_pid``, ``bottom_pid``: lists of str.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from catvton.config import Config
from catvton.data.canvas import fit_to_half, garment_cutout
from catvton.eval import metrics as M
from catvton.infer.outfit import Dressed, OutfitRequest, Piece
from catvton.infer.serving import TryOnService

REGIONS = ("upper", "lower")
RUNS = {"outfit": REGIONS, "upper": ("upper",), "lower": ("lower",)}
"""Each run and the regions (passes, in order) it dresses."""
TRUTH_OF = {"outfit": "truth", "upper": "truth_upper", "lower": "truth_lower"}
"""The true photo each run is scored against."""
GARMENT_OF = {"upper": "top", "lower": "bottom"}
MODELS = ("base", "lora")
OUTFIT_KEYS = ("triples", "pids", "seed", "steps", "guidance", "scored_at", "runs", "wall_s")
"""The keys of the outfit section (``report.json``'s ``outfits``)."""
RUN_KEYS = ("passes", "truth", "unreachable", "regions")
"""The keys of each run: ``unreachable`` is the share of the pixels where the truth differs from
the person photo that lie outside every general mask of the run (no pass may change them)."""
REGION_KEYS = ("base", "lora", "grey", "delta", "transfer")
"""The keys of each region of a run: ``base``/``lora``/``grey``: ``masked_psnr``, ``masked_ssim``;
``delta``: LoRA - base; ``transfer``: ``{"base": TRANSFER_KEYS, "lora": ...}`` (None for 1 triple)."""
TRANSFER_KEYS = ("margin_db", "colour_following", "own_masked_psnr", "swapped_masked_psnr")
GRID_ROWS = 6


def outfit_partners(top_pids: list[str], bottom_pids: list[str]) -> np.ndarray:
    """(N,) for each triple, the triple whose garments it gets in the swapped run: half the list on
    (cyclic), moved on until both its top and its bottom are other garments. Needs 2 triples whose
    tops and bottoms both differ."""
    n = len(top_pids)
    out = np.empty(n, np.int64)
    for i in range(n):
        j = (i + max(1, n // 2)) % n
        for _ in range(n):
            if top_pids[j] != top_pids[i] and bottom_pids[j] != bottom_pids[i]:
                break
            j = (j + 1) % n
        else:
            raise ValueError(f"triple {i}: no other triple has both another top and another bottom")
        out[i] = j
    return out


def outfit_requests(triples: dict[str, Any], run: str, garments_of: np.ndarray, seed: int) -> list[OutfitRequest]:
    """One request per triple ``i``: its person and own masks, the garments of triple
    ``garments_of[i]`` (worn photos with their masks) for the regions of ``run``, seed ``seed + i``."""
    out = []
    for i, g in enumerate(garments_of):
        pieces = [Piece(region, triples[GARMENT_OF[region]][g], garment_mask=triples[f"{GARMENT_OF[region]}_mask"][g],
                        mask=triples[f"{region}_mask"][i]) for region in RUNS[run]]
        out.append(OutfitRequest(triples["person"][i], pieces, seed=seed + i))
    return out


def dress_all(service: TryOnService, requests: list[OutfitRequest], batch_size: int = 8) -> list[Dressed]:
    """:meth:`~catvton.infer.serving.TryOnService.dress_many` over slices of ``batch_size`` requests
    (a result does not depend on its batch: one seed per request)."""
    return [d for k in range(0, len(requests), batch_size) for d in service.dress_many(requests[k:k + batch_size])]


def _half(images: np.ndarray, half_hw: tuple[int, int], fit: str) -> np.ndarray:
    """``(N, S, S, 3)`` uint8 photos -> ``(N, H, W, 3)`` float in [0, 1], fitted as a sample's person."""
    return np.stack([fit_to_half(img, half_hw, fit) for img in images]).astype(np.float64) / 255.0


def _half_mask(masks: np.ndarray, half_hw: tuple[int, int], fit: str) -> np.ndarray:
    """``(N, S, S)`` bool -> ``(N, H, W)`` bool, fitted as a sample's general mask (nearest)."""
    return np.stack([fit_to_half(m.astype(np.uint8), half_hw, fit, nearest=True, fill=0) > 0 for m in masks])


def score_outfits(triples: dict[str, Any], generated: dict[str, dict[str, dict[str, np.ndarray]]],
                  generals: dict[str, np.ndarray], partners: np.ndarray | None, half_hw: tuple[int, int],
                  fit: str) -> dict[str, Any]:
    """The ``runs`` of the outfit section (:data:`RUN_KEYS`) from the dressed photos.

    ``generated[model][run]``: ``{"own": (N, S, S, 3) uint8, "swapped": ...}`` (swapped: dressed in
    triple ``partners[i]``'s garments; absent, with ``partners`` None, for a single triple);
    ``generals[region]``: ``(N, S, S)`` bool, the region's general mask on the person photo."""
    gen_half = {r: _half_mask(generals[r], half_hw, fit) for r in REGIONS}
    person = _half(triples["person"], half_hw, fit)
    runs: dict[str, Any] = {}
    for run, regions in RUNS.items():
        truth_name = TRUTH_OF[run]
        truth = _half(triples[truth_name], half_hw, fit)
        changed = (triples[truth_name] != triples["person"]).any(axis=-1)
        reach = np.logical_or.reduce([generals[r] for r in regions])
        unreachable = float((changed & ~reach).sum() / max(changed.sum(), 1))
        out_regions: dict[str, Any] = {}
        for region in regions:
            m = gen_half[region]
            scores = {}
            for model in MODELS:
                own = _half(generated[model][run]["own"], half_hw, fit)
                scores[model] = {"masked_psnr": float(M.masked_psnr(own, truth, m).mean()),
                                 "masked_ssim": float(M.masked_ssim(own, truth, m).mean())}
            grey = M.grey_fill(person, m.astype(np.float64))
            scores["grey"] = {"masked_psnr": float(M.masked_psnr(grey, truth, m).mean()),
                              "masked_ssim": float(M.masked_ssim(grey, truth, m).mean())}
            transfer = None
            if partners is not None:
                garment = GARMENT_OF[region]
                given_own = np.stack([img[msk].astype(np.float64).mean(axis=0) / 255.0
                                      for img, msk in zip(triples[garment], triples[f"{garment}_mask"])])
                given = np.concatenate([given_own, given_own[partners]])
                shows = _half_mask(triples["truth_masks"][truth_name][region], half_hw, fit)
                transfer = {}
                for model in MODELS:
                    own = _half(generated[model][run]["own"], half_hw, fit)
                    swapped = _half(generated[model][run]["swapped"], half_hw, fit)
                    own_psnr = float(M.masked_psnr(own, truth, m).mean())
                    swapped_psnr = float(M.masked_psnr(swapped, truth, m).mean())
                    worn = M.region_colours(np.concatenate([own, swapped]), np.concatenate([shows, shows]))
                    transfer[model] = {"margin_db": own_psnr - swapped_psnr,
                                       "colour_following": M.colour_following(given, worn),
                                       "own_masked_psnr": own_psnr, "swapped_masked_psnr": swapped_psnr}
            out_regions[region] = {**scores, "delta": {k: scores["lora"][k] - scores["base"][k] for k in scores["base"]},
                                   "transfer": transfer}
        runs[run] = {"passes": list(regions), "truth": truth_name, "unreachable": unreachable, "regions": out_regions}
    return runs


def evaluate_outfits(cfg: Config, lora_dir: str | Path, triples: dict[str, Any], out_dir: str | Path | None = None,
                     *, batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
    """Dress every triple with the base and with the base + LoRA (every run, own and swapped
    garments), score them (:func:`score_outfits`) and, with ``out_dir``, write ``grid_outfits.png``
    (person | top | bottom | base | LoRA | truth). Returns the outfit section (:data:`OUTFIT_KEYS`).

    ``cfg`` names concrete models (entry points resolve offline names first). Generation runs in
    this process, through the service's outfit path (each pass depends on the one before)."""
    start = time.perf_counter()
    n = len(triples["person"])
    if n == 0:
        raise ValueError("no triples to score")
    partners = outfit_partners(triples["top_pid"], triples["bottom_pid"]) if n > 1 else None
    own = np.arange(n)
    generated: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    generals: dict[str, np.ndarray] = {}
    for model, weights in (("base", None), ("lora", lora_dir)):
        service = TryOnService.from_config(cfg, lora=weights, device=device)
        generated[model] = {}
        for run in RUNS:
            generated[model][run] = {}
            for name, garments in (("own", own), ("swapped", partners)):
                if garments is None:
                    continue
                dressed = dress_all(service, outfit_requests(triples, run, garments, cfg.infer.seed), batch_size)
                generated[model][run][name] = np.stack([d.image for d in dressed])
                if run == "outfit" and name == "own" and not generals:
                    generals = {p.region: np.stack([d.passes[k].general for d in dressed])
                                for k, p in enumerate(dressed[0].passes)}
        del service
    half_hw = (cfg.canvas.half_height, cfg.canvas.half_width)
    runs = score_outfits(triples, generated, generals, partners, half_hw, cfg.canvas.person_fit)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        outfit_grid(triples, {m: generated[m]["outfit"]["own"] for m in MODELS}, cfg).save(out / GRID_FILE)
    return {"triples": n, "pids": {"person": list(triples["pid"]), "top": list(triples["top_pid"]),
                                   "bottom": list(triples["bottom_pid"])},
            "seed": cfg.infer.seed, "steps": cfg.infer.steps, "guidance": cfg.infer.guidance,
            "scored_at": f"{half_hw[1]}x{half_hw[0]} (the canvas half, person fit {cfg.canvas.person_fit})",
            "runs": runs, "wall_s": round(time.perf_counter() - start, 1)}


GRID_FILE = "grid_outfits.png"


def outfit_grid(triples: dict[str, Any], results: dict[str, np.ndarray], cfg: Config, rows: int = GRID_ROWS) -> Image.Image:
    """One line per triple: person | top | bottom (the cut-outs the model is given) | each result
    | truth, at the canvas half's size."""
    half_hw = (cfg.canvas.half_height, cfg.canvas.half_width)
    fit, margin = cfg.canvas.person_fit, cfg.canvas.garment_margin
    lines = []
    for i in range(min(rows, len(triples["person"]))):
        panels = [fit_to_half(triples["person"][i], half_hw, fit),
                  garment_cutout(triples["top"][i], triples["top_mask"][i], half_hw, margin),
                  garment_cutout(triples["bottom"][i], triples["bottom_mask"][i], half_hw, margin)]
        panels += [fit_to_half(r[i], half_hw, fit) for r in results.values()]
        panels.append(fit_to_half(triples["truth"][i], half_hw, fit))
        lines.append(np.concatenate(panels, axis=1))
    grid = np.concatenate(lines, axis=0)
    img = Image.new("RGB", (grid.shape[1], grid.shape[0] + 14), "white")
    img.paste(Image.fromarray(grid), (0, 14))
    draw = ImageDraw.Draw(img)
    for k, name in enumerate(["person", "top", "bottom", *("LoRA" if m == "lora" else m for m in results), "truth"]):
        draw.text((k * half_hw[1] + 2, 1), name, fill="black")
    return img


RUN_TITLE = {"outfit": "outfit (2 passes)", "upper": "top alone", "lower": "bottom alone"}

OUTFIT_NOTE = ("Outfits: held-out people dressed in another held-out pid's top and a third's bottom (worn photos "
               "and their masks), as the service does it (top pass, then bottom pass), scored inside each region's "
               "general mask against the true photo of that person in those garments; `top alone` / `bottom alone`: one "
               "pass, against the truth of that garment with the person's own other one. `margin` is the garment-"
               "transfer margin (own garments minus another triple's, dB); `unreachable`: the share of the changed "
               "truth pixels outside every mask of the run.")


def outfit_markdown(section: dict[str, Any]) -> str:
    """The outfit section of ``report.md``: one line per run and region, base vs LoRA."""
    rows = [f"## Outfits ({section['triples']} held-out triples, scored at {section['scored_at']})", "",
            "| run | region | masked PSNR base | LoRA | masked SSIM base | LoRA | margin base | LoRA | "
            "colour following base | LoRA | grey PSNR | unreachable |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, r in section["runs"].items():
        for region, g in r["regions"].items():
            t = g["transfer"] or {}
            def tr(model: str, key: str) -> str:
                return f"{t[model][key]:+.2f}" if key == "margin_db" and t else (f"{t[model][key]:.3f}" if t else "-")
            rows.append(f"| {RUN_TITLE[run]} | {region} | {g['base']['masked_psnr']:.2f} | {g['lora']['masked_psnr']:.2f} | "
                        f"{g['base']['masked_ssim']:.3f} | {g['lora']['masked_ssim']:.3f} | {tr('base', 'margin_db')} | "
                        f"{tr('lora', 'margin_db')} | {tr('base', 'colour_following')} | {tr('lora', 'colour_following')} | "
                        f"{g['grey']['masked_psnr']:.2f} | {r['unreachable']:.3f} |")
    rows += ["", OUTFIT_NOTE, "", f"![outfits]({GRID_FILE})"]
    return "\n".join(rows)
