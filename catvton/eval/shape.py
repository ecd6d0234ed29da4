"""Shape: does a try-on draw the outline of the garment given, or of the garment the person wears?

A skirt given to a person in trousers must come out as a skirt (no two legs), trousers given to a
person in shorts must reach the ankles. The cases come with the true photo of the person wearing
the new garment (``catvton.offline.shape`` draws them in the synthetic world, this module takes
arrays), and every case's garment is one solid colour that nothing else in the input or the truth
comes near (:data:`CASE_SEPARATION`), so the garment's outline can be read off a result by colour.

Two scores per case, both on the person photo (a result the size of the truth):

- **outline IoU** (:func:`outline_iou`): the pixels of the result painted in the garment's colour
  against the truth's garment pixels. The colour rule: a pixel is *painted in the garment's colour*
  when its RGB distance (0-255 a channel, Euclidean) to the garment's main colour is below
  :data:`OUTLINE_THRESHOLD` (30). The truth's garment pixels are the truth's garment mask, as far
  as the same rule accepts them on the truth (the renderer's dark one-pixel outline and a trouser
  inseam are drawn at 0.72 and 0.6 of the colour: for most colours they fall outside the rule, on
  both sides alike), so the truth itself scores 1 exactly. Why 30: the renderer's side shading
  darkens a garment by up to 7%, at most 23 away for every palette colour but white (``pink``
  22.9, ``light blue`` 22.8), so every fabric pixel of the truth passes (of a white garment,
  30.2 at the most, all but its outermost columns: on the truth and on a result alike); and the cases keep every
  other pixel of the input and the truth at least :data:`CASE_SEPARATION` (60) away (skin, hair,
  shoes, background, the kept top, the old garment, with their shading and outlines), so a pixel
  must be 30 off in colour, halfway, before the rule mistakes it either way. A fixed threshold
  cannot separate the palette alone: ``navy`` is 12 from dark-blue denim, ``brown`` 8.5 from a
  skin tone, ``black`` 5 from black shoes and ``white`` 49 from the background; the cases are
  chosen instead (``catvton.offline.shape``).
- **masked PSNR** (:func:`catvton.eval.metrics.masked_psnr`) against the truth inside the case's
  ``region``: the pixels the change may touch (the worn garment and the new one, grown by the
  renderer's one-pixel outline). The region does not depend on the mask rule, so the figures of
  a ``hull`` and a ``box_to_bottom`` model are comparable.

:func:`evaluate_shape` runs a try-on callable over the cases and returns the per-kind means
(``{kind: {"iou", "psnr", "n"}}``), the per-case rows and the results; :func:`shape_metrics`
names the means as a report does (``shape.<kind>.iou``); :func:`shape_grids` draws one image per
kind (input | garment | result | truth | IoU overlay).

In the evaluation report (:func:`catvton.eval.report.evaluate`, given cases): :func:`service_tryon`
is the try-on measured, the service's own request path (:meth:`catvton.infer.serving.TryOnService.dress_many`:
the config's mask rule on ``case.mask`` for ``case.group``, the garment cut out by its mask as
training cuts it, the generated half pasted back at the photo's size, uint8); :func:`evaluate_shape_models`
dresses the cases with the base and with the base + LoRA and :func:`shape_section` makes the
report's ``shape`` section (:data:`SECTION_KEYS`), :func:`shape_markdown` its table in ``report.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from catvton.config import Config
from catvton.data.masks import iou
from catvton.eval.metrics import masked_psnr
from catvton.eval.outfits import dress_all
from catvton.infer.outfit import OutfitRequest, Piece
from catvton.infer.serving import TryOnService

OUTLINE_THRESHOLD = 30.0
"""RGB distance (Euclidean, 0-255 channels) under which a pixel counts as the garment's colour."""
CASE_SEPARATION = 2 * OUTLINE_THRESHOLD
"""Every pixel of a case's input, and of its truth outside the garment, is at least this far from the
garment's colour: twice the threshold, so a colour error must exceed the threshold to be mistaken."""
GRID_ROWS = 6


@dataclass(frozen=True)
class ShapeCase:
    """One cross-type case: a person in garment A, given garment B of another type, and the truth.

    Photos ``(S, S, 3)`` uint8, masks ``(S, S)`` bool, all of one size ``S``."""

    kind: str
    """What changes, e.g. ``trousers_to_skirt`` (``catvton.offline.shape.SHAPE_KINDS``)."""
    group: str
    """The given garment's slot, the try-on group: ``lower`` or ``full``."""
    person_pid: str
    top_pid: str
    """Whose top the person wears (kept in the truth of a bottom; replaced by a dress)."""
    worn_pid: str
    """Whose garment A the person wears."""
    garment_pid: str
    """Whose garment B is given."""
    person: np.ndarray
    """The input photo: the person in the top and garment A."""
    mask: np.ndarray
    """The person's garments that B replaces (A; the top and A for a dress): what a mask rule widens."""
    garment: np.ndarray
    """B laid flat on a near-white sheet (the product shot)."""
    garment_mask: np.ndarray
    colour: tuple[int, int, int]
    """B's main colour (solid: B has no pattern)."""
    truth: np.ndarray
    """The same person, view and jitter, wearing B (and the top, for a bottom)."""
    truth_mask: np.ndarray
    """B's visible pixels in the truth."""
    region: np.ndarray
    """The pixels the change may touch: ``mask | truth_mask`` grown by one pixel; masked PSNR's mask."""

    @property
    def pids(self) -> tuple[str, str, str, str]:
        """Every pid the case draws on: person, top, worn garment, given garment."""
        return self.person_pid, self.top_pid, self.worn_pid, self.garment_pid


TryOn = Callable[[Sequence[ShapeCase]], np.ndarray]
"""Cases of one kind -> ``(n, S, S, 3)`` uint8: each person dressed in the case's ``garment``. The
callable builds its own mask from ``case.mask`` and ``case.group`` (its rule is what is measured)."""


def garment_colour_mask(images: np.ndarray, colours: np.ndarray, threshold: float = OUTLINE_THRESHOLD) -> np.ndarray:
    """``(N, H, W)`` bool: the pixels of ``images`` ``(N, H, W, 3)`` uint8 whose RGB distance to
    ``colours[i]`` ``(N, 3)`` (0-255) is below ``threshold``."""
    diff = images.astype(np.float32) - np.asarray(colours, np.float32)[:, None, None, :]
    return np.sqrt((diff * diff).sum(axis=-1)) < threshold


def outline_iou(results: np.ndarray, truths: np.ndarray, truth_masks: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``(N,)`` IoU of the pixels each result paints in the garment's colour and the truth's garment
    pixels (its ``truth_masks`` as far as the rule accepts them on the truth); see the module docstring."""
    _check_uint8(results, truths.shape)
    painted = garment_colour_mask(results, colours)
    shown = garment_colour_mask(truths, colours) & truth_masks
    return np.array([iou(p, t) for p, t in zip(painted, shown)])


def _check_uint8(results: np.ndarray, shape: tuple[int, ...]) -> None:
    if results.dtype != np.uint8 or results.shape != shape:
        raise ValueError(f"results must be {shape} uint8 like the truths (the dressed photos at the photo's size), "
                         f"got {results.shape} {results.dtype}: convert with catvton.data.canvas.to_uint8 and "
                         "paste the person half back at the photo's size")


def score_shape_cases(cases: Sequence[ShapeCase], results: np.ndarray) -> list[dict]:
    """One row per case: ``kind``, its index within the kind, the pids, ``iou`` and ``psnr`` (dB)."""
    truths = np.stack([c.truth for c in cases])
    _check_uint8(results, truths.shape)
    ious = outline_iou(results, truths, np.stack([c.truth_mask for c in cases]), np.array([c.colour for c in cases]))
    psnr = masked_psnr(results / 255.0, truths / 255.0, np.stack([c.region for c in cases]))
    seen: dict[str, int] = {}
    rows = []
    for c, v, p in zip(cases, ious, psnr):
        seen[c.kind] = seen.get(c.kind, -1) + 1
        rows.append({"kind": c.kind, "index": seen[c.kind], "person_pid": c.person_pid, "top_pid": c.top_pid,
                     "worn_pid": c.worn_pid, "garment_pid": c.garment_pid, "iou": float(v), "psnr": float(p)})
    return rows


def shape_summary(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """``{kind: {"iou": mean, "psnr": mean, "n": count}}`` over the rows, kinds in order of appearance."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    return {k: {"iou": float(np.mean([r["iou"] for r in rows if r["kind"] == k])),
                "psnr": float(np.mean([r["psnr"] for r in rows if r["kind"] == k])),
                "n": sum(r["kind"] == k for r in rows)} for k in kinds}


def shape_metrics(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """The summary as flat report names: ``shape.<kind>.iou`` and ``shape.<kind>.psnr``."""
    return {f"shape.{k}.{m}": v[m] for k, v in summary.items() for m in ("iou", "psnr")}


def dress_cases(cases: Sequence[ShapeCase], tryon: TryOn) -> np.ndarray:
    """Every case dressed by ``tryon``, one call per kind: ``(N, S, S, 3)`` uint8 in case order;
    ValueError when ``tryon`` gives other shapes or another dtype."""
    if not cases:
        raise ValueError("no shape cases to evaluate: catvton.offline.shape.shape_cases draws them")
    results: list[np.ndarray | None] = [None] * len(cases)
    for kind in dict.fromkeys(c.kind for c in cases):
        at = [i for i, c in enumerate(cases) if c.kind == kind]
        dressed = np.asarray(tryon([cases[i] for i in at]))
        _check_uint8(dressed, (len(at), *cases[at[0]].truth.shape))
        for i, img in zip(at, dressed):
            results[i] = img
    return np.stack(results)


def evaluate_shape(cases: Sequence[ShapeCase], tryon: TryOn
                   ) -> tuple[dict[str, dict[str, float]], list[dict], np.ndarray]:
    """Dress every case with ``tryon`` (:func:`dress_cases`) and score it: (:func:`shape_summary`,
    :func:`score_shape_cases`' rows, the results ``(N, S, S, 3)`` uint8 in case order)."""
    stacked = dress_cases(cases, tryon)
    rows = score_shape_cases(cases, stacked)
    return shape_summary(rows), rows, stacked


def service_tryon(service: TryOnService, seed: int, batch_size: int = 8) -> TryOn:
    """The production try-on as a :data:`TryOn`: each case is one request to ``service``
    (:meth:`~catvton.infer.serving.TryOnService.dress_many`, the server's path): the person photo,
    ``case.mask`` as the worn garment's mask for ``case.group`` (generalised by the config's mask
    rule, ``mask.<group>_rule``: what is measured), the product shot with its mask (cut out as
    training cuts a garment), and the picture at the photo's size, uint8. Case ``i`` of a kind
    draws its noise from ``seed + i`` (the same for every model)."""
    def dress(cases: Sequence[ShapeCase]) -> np.ndarray:
        requests = [OutfitRequest(c.person, [Piece(c.group, c.garment, garment_mask=c.garment_mask, mask=c.mask)],
                                  seed=seed + i) for i, c in enumerate(cases)]
        return np.stack([d.image for d in dress_all(service, requests, batch_size)])
    return dress


_HIT, _EXTRA, _MISSED = (0, 170, 0), (220, 30, 30), (40, 90, 255)


def iou_overlay(result: np.ndarray, truth: np.ndarray, truth_mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``(S, S, 3)`` uint8: the result faded to grey, with the garment's pixels in green where the
    result paints them and the truth shows them, red where only the result does (a wrong outline),
    blue where only the truth does (a missing part)."""
    painted = garment_colour_mask(result[None], np.array([colour]))[0]
    shown = garment_colour_mask(truth[None], np.array([colour]))[0] & truth_mask
    out = (result.astype(np.float32).mean(axis=-1, keepdims=True) * 0.4 + 150).repeat(3, axis=-1).astype(np.uint8)
    out[painted & shown], out[painted & ~shown], out[shown & ~painted] = _HIT, _EXTRA, _MISSED
    return out


def shape_grids(cases: Sequence[ShapeCase], results: np.ndarray, rows: int = GRID_ROWS) -> dict[str, Image.Image]:
    """One image per kind, its first ``rows`` cases a line each: input | garment | result | truth |
    IoU overlay (:func:`iou_overlay`, the case's IoU written on it)."""
    grids = {}
    for kind in dict.fromkeys(c.kind for c in cases):
        at = [i for i, c in enumerate(cases) if c.kind == kind][:rows]
        ious = outline_iou(results[at], np.stack([cases[i].truth for i in at]),
                           np.stack([cases[i].truth_mask for i in at]), np.array([cases[i].colour for i in at]))
        lines = [np.concatenate([cases[i].person, cases[i].garment, results[i], cases[i].truth,
                                 iou_overlay(results[i], cases[i].truth, cases[i].truth_mask, cases[i].colour)], axis=1)
                 for i in at]
        size = cases[at[0]].truth.shape[0]
        img = Image.new("RGB", (5 * size, len(lines) * size + 14), "white")
        img.paste(Image.fromarray(np.concatenate(lines, axis=0)), (0, 14))
        draw = ImageDraw.Draw(img)
        for k, name in enumerate(["input", "garment", "result", "truth", f"IoU ({kind})"]):
            draw.text((k * size + 2, 1), name, fill="black")
        for row, value in enumerate(ious):
            draw.text((4 * size + 2, 14 + row * size + 2), f"{value:.2f}", fill="black")
        grids[kind] = img
    return grids


# ----------------------------------------------------------------------------------------------
# The report's shape section (catvton.eval.report.evaluate, given cases)

MODELS = ("base", "lora")
"""The models a report's shape section scores: the base (with its transformer override) and the base + LoRA."""
GRID_FILE = "grid_shape_{kind}.png"
"""A kind's grid beside the report (:func:`shape_grids` on the LoRA's results)."""
SECTION_KEYS = ("cases", "size", "threshold", "kinds", "metrics", "grids", "seed", "steps", "guidance",
                "mask_rules", "wall_s")
"""The keys of the shape section (``report.json``'s ``shape``): ``cases`` (how many in all), ``size``
(the photos' side, px), ``threshold`` (:data:`OUTLINE_THRESHOLD`), ``kinds`` (:data:`KIND_KEYS` per
kind), ``metrics`` (the LoRA's means by report name, ``shape.<kind>.iou`` and ``shape.<kind>.psnr``:
:func:`shape_metrics`), ``grids`` (kind -> file name), then how the cases were dressed: ``seed``
(case ``i`` of a kind: ``seed + i``), ``steps``, ``guidance``, ``mask_rules`` (group -> the config's
rule, the thing measured) and ``wall_s``."""
KIND_KEYS = ("n", "base", "lora", "delta")
"""The keys of one kind: ``n`` (cases), ``base`` and ``lora`` (``{"iou", "psnr"}``: means over the
kind), ``delta`` (LoRA - base)."""


def shape_section(cases: Sequence[ShapeCase], results: dict[str, np.ndarray], out_dir: str | Path | None = None
                  ) -> dict[str, Any]:
    """The scores of a report's shape section from the dressed cases, ``results[model]`` ``(N, S, S, 3)``
    uint8 in case order for each of :data:`MODELS`; with ``out_dir``, each kind's grid of the LoRA's
    results is written there (:data:`GRID_FILE`). The keys of :data:`SECTION_KEYS` up to ``grids``
    (:func:`evaluate_shape_models` adds how the cases were dressed)."""
    summary = {m: shape_summary(score_shape_cases(cases, results[m])) for m in MODELS}
    kinds = {k: {"n": summary["lora"][k]["n"], **{m: {q: summary[m][k][q] for q in ("iou", "psnr")} for m in MODELS},
                 "delta": {q: summary["lora"][k][q] - summary["base"][k][q] for q in ("iou", "psnr")}}
             for k in summary["lora"]}
    grids = {k: GRID_FILE.format(kind=k) for k in kinds}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for kind, img in shape_grids(cases, results["lora"]).items():
            img.save(out / grids[kind])
    return {"cases": len(cases), "size": int(cases[0].truth.shape[0]), "threshold": OUTLINE_THRESHOLD,
            "kinds": kinds, "metrics": shape_metrics(summary["lora"]), "grids": grids}


def evaluate_shape_models(cfg: Config, lora_dir: str | Path, cases: Sequence[ShapeCase],
                          out_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 8
                          ) -> dict[str, Any]:
    """Dress ``cases`` with the base of ``cfg`` and with the base + ``lora_dir``, each loaded once as
    the service loads it (:meth:`~catvton.infer.serving.TryOnService.from_config`) and run through
    :func:`service_tryon`, and score them: the report's shape section (:data:`SECTION_KEYS`), the
    grids written to ``out_dir``. ``cfg`` names concrete models (entry points resolve offline names)."""
    start = time.perf_counter()
    results = {}
    for model, weights in (("base", None), ("lora", lora_dir)):
        service = TryOnService.from_config(cfg, lora=weights, device=device)
        results[model] = dress_cases(cases, service_tryon(service, cfg.infer.seed, batch_size))
        del service
    section = shape_section(cases, results, out_dir)
    groups = dict.fromkeys(c.group for c in cases)
    return {**section, "seed": cfg.infer.seed, "steps": cfg.infer.steps, "guidance": cfg.infer.guidance,
            "mask_rules": {g: getattr(cfg.mask, f"{g}_rule") for g in groups},
            "wall_s": round(time.perf_counter() - start, 1)}


SHAPE_NOTE = ("Shape: held-out people given a garment of another type (trousers_to_skirt: a person in trousers "
              "given a skirt, and so on), dressed by the service's path under the config's mask rule and scored "
              "against the rendered truth of that person in that garment. `iou`: outline IoU, the pixels within RGB "
              "distance {threshold:g} of the given garment's colour against the truth's garment pixels (1: the given "
              "garment's outline; low: the worn garment's); `psnr`: masked PSNR (dB) where the change may touch "
              "(the worn and the new garment). Grids: input | garment | LoRA | truth | IoU overlay (green: both, "
              "red: only the result, blue: only the truth).")


def shape_markdown(section: dict[str, Any]) -> str:
    """The shape section of ``report.md``: one line per report name (``shape.<kind>.iou``,
    ``shape.<kind>.psnr``), base vs LoRA with the delta, then the note and the grids."""
    rules = section.get("mask_rules")
    how = f"; masks {', '.join(f'{g}: {r}' for g, r in rules.items())}" if rules else ""
    rows = [f"## Shape ({section['cases']} held-out cross-type cases at {section['size']} px{how})", "",
            "| metric | cases | base | LoRA | delta |", "|---|---:|---:|---:|---:|"]
    for kind, k in section["kinds"].items():
        for q, fmt in (("iou", ".3f"), ("psnr", ".2f")):
            rows.append(f"| `shape.{kind}.{q}` | {k['n']} | {k['base'][q]:{fmt}} | {k['lora'][q]:{fmt}} | "
                        f"{k['delta'][q]:+{fmt}} |")
    rows += ["", SHAPE_NOTE.format(threshold=section["threshold"]), ""]
    rows += [f"![{kind}]({name})" for kind, name in section["grids"].items()]
    return "\n".join(rows)
