"""The dataset readiness report of ``easy_train.py setup``: counts, pairs, sizes, mask coverage,
what the masks mark (:mod:`catvton.data.placement`), a storage estimate for the latent cache, a
plain-language verdict, and sample grids.

Everything here is pure over the validated row metadata (see :class:`RowValidator`), so a test
can build a report from a handful of rows without Ray.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from catvton.config import Config
from catvton.data import placement
from catvton.data.canvas import build_sample, fit_box, to_uint8
from catvton.data.pairs import SPLITS, Pair, make_pairs
from catvton.schema import GROUPS
from catvton.data.validate import decode, to_mask, to_rgb

T5_TOKENS, T5_DIM, CLIP_DIM = 512, 4096, 768
"""FLUX.1-Fill-dev text embedding sizes (T5-XXL, CLIP-L pooled), stored once per prompt."""


def latent_sample_bytes(half_height: int, half_width: int) -> int:
    """Bytes of one cached sample: target and masked-canvas VAE latents in bf16 (16 channels at
    1/8 resolution over the (H, 2W) canvas) plus the pixel mask bit-packed."""
    latent = 16 * (half_height // 8) * (2 * half_width // 8) * 2
    return 2 * latent + (half_height * 2 * half_width) // 8


def text_embedding_bytes() -> int:
    """Bytes of one prompt's T5 sequence and CLIP pooled embedding in bf16."""
    return (T5_TOKENS * T5_DIM + CLIP_DIM) * 2


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, [5, 25, 50, 75, 95])
    return {"n": int(a.size), "mean": round(float(a.mean()), 4),
            **{f"p{p}": round(float(v), 4) for p, v in zip((5, 25, 50, 75, 95), q)}}


def build_report(rows: Sequence[Mapping[str, Any]], cfg: Config, source_name: str) -> dict[str, Any]:
    """The report dict from validated row metadata (one dict per dataset row)."""
    d = cfg.data
    valid = [r for r in rows if r["valid"]]
    bad = Counter(r["reason"] for r in rows if not r["valid"])
    bad_details: dict[str, dict[str, int]] = defaultdict(dict)
    for reason in ("unknown_cloth_type", "unparseable_pose"):
        vals = Counter(r["detail"] for r in rows if not r["valid"] and r["reason"] == reason)
        if vals:
            bad_details[reason] = dict(vals.most_common(20))

    pairs, skipped = make_pairs(rows, d)
    pair_counts = {s: {g: 0 for g in GROUPS} for s in SPLITS}
    pair_counts_all = {s: {g: 0 for g in GROUPS} for s in SPLITS}
    split_pids: dict[str, set[str]] = {s: set() for s in SPLITS}
    for p in pairs:
        pair_counts_all[p.split][p.group] += 1
        if p.selected:
            pair_counts[p.split][p.group] += 1
            split_pids[p.split].add(p.pid)

    sizes = Counter(f"{r['width']}x{r['height']}" for r in rows if r["width"] > 0)
    where = placement.summarize_groups(rows, GROUPS)
    coverage = {g: _percentiles([r["mask_fraction"] for r in valid if r["group"] == g]) for g in GROUPS}
    n_selected = sum(sum(v.values()) for v in pair_counts.values())
    storage = n_selected * latent_sample_bytes(cfg.canvas.half_height, cfg.canvas.half_width) + text_embedding_bytes()

    report: dict[str, Any] = {
        "source": source_name,
        "rows_total": len(rows),
        "rows_valid": len(valid),
        "bad_rows": dict(sorted(bad.items())),
        "bad_row_values": dict(bad_details),
        "by_cloth_type": dict(sorted(Counter(r["cloth_type"] for r in valid).items())),
        "by_group": {g: sum(1 for r in valid if r["group"] == g) for g in GROUPS},
        "by_view": dict(sorted(Counter(r["view"] for r in valid).items())),
        "by_gender": dict(sorted(Counter(r["gender"] for r in valid).items())),
        "pids": len({r["pid"] for r in valid}),
        "pids_by_split": {s: len(v) for s, v in split_pids.items()},
        "pairs": pair_counts,
        "pairs_before_category_filter": pair_counts_all,
        "pairing_skipped_rows": dict(skipped),
        "image_sizes": dict(sizes.most_common()),
        "mask_coverage": coverage,
        "mask_levels": dict(sorted(Counter(str(r["mask_levels"]) for r in valid).items())),
        "mask_placement": where,
        "mask_kinds": {g: {"kind": k, "why": why} for g, (k, why) in placement.judge(where).items()},
        "mask_not_judged": placement.not_judged(where),
        "canvas": {"half_width": cfg.canvas.half_width, "half_height": cfg.canvas.half_height,
                   "person_fit": cfg.canvas.person_fit},
        "storage_estimate_bytes": int(storage),
        "config": {"groups": list(d.groups), "upper_share": d.upper_share, "seed": d.seed,
                   "val_fraction": d.val_fraction, "test_fraction": d.test_fraction},
    }
    report["ready"], report["reasons"], report["blocking"] = verdict(report, cfg)
    return report


def verdict(report: Mapping[str, Any], cfg: Config) -> tuple[bool, list[str], list[str]]:
    """(ready, every finding in plain words, the findings that make it not ready)."""
    blocking: list[str] = []
    notes: list[str] = []
    total, valid = report["rows_total"], report["rows_valid"]
    if total == 0 or valid == 0:
        blocking.append(f"no usable rows: {total} rows read, {valid} valid")
    elif (total - valid) / total > 0.2:
        blocking.append(f"{total - valid} of {total} rows ({(total - valid) / total:.0%}) are bad: "
                        f"{report['bad_rows']} — check the source before training")
    elif total > valid:
        notes.append(f"{total - valid} of {total} rows are bad and excluded: {report['bad_rows']}")
    for g in cfg.data.groups:
        n_train = report["pairs"]["train"][g]
        if n_train < cfg.data.min_pairs_per_group:
            blocking.append(f"group '{g}' has {n_train} training pairs, fewer than "
                            f"data.min_pairs_per_group={cfg.data.min_pairs_per_group}")
        for s in ("val", "test"):
            if report["pairs"][s][g] == 0:
                blocking.append(f"group '{g}' has no {s} pairs: nothing to measure it on")
    if report["image_sizes"]:
        size, count = next(iter(report["image_sizes"].items()))
        w, h = (int(v) for v in size.split("x"))
        H, W = cfg.canvas.half_height, cfg.canvas.half_width
        _, _, win_h, _ = fit_box((h, w), (H, W), cfg.canvas.person_fit)
        scale = H / win_h
        if scale > 1.0:
            notes.append(f"the most common source size is {w}x{h} ({count} rows): fitted to a {W}x{H} half "
                         f"it is upscaled {scale:.2f}x, so the model learns from interpolated pixels and "
                         "fine garment detail at full canvas resolution is not in the data")
        if len(report["image_sizes"]) > 1:
            notes.append(f"source images come in {len(report['image_sizes'])} sizes: {report['image_sizes']}")
    for g in cfg.data.groups:
        cov = report["mask_coverage"].get(g, {})
        if cov.get("n", 0) and cov["p50"] < 0.02:
            notes.append(f"group '{g}' masks are small (median {cov['p50']:.1%} of the image): check what they mark")
    used = set(cfg.data.groups) | ({"upper"} if cfg.data.upper_share > 0 else set())
    for g, k in report.get("mask_kinds", {}).items():
        if k["kind"] in ("whole-person", "all-clothing"):
            (blocking if g in used else notes).append(
                f"group '{g}' masks look like {k['kind']} masks, not the one garment of their cloth_type: "
                f"{k['why']}. Garment cut-outs and general masks would show and hide more than the garment "
                "(see mask_suspicious.png); fix or replace the masks before training")
        elif k["kind"] == "unknown" and g in used and report["by_group"].get(g):
            notes.append(f"what group '{g}' masks mark was not judged: {k['why']}")
    multi = {k: v for k, v in report["mask_levels"].items() if k not in ("1", "2")}
    if multi:
        notes.append(f"{sum(multi.values())} masks are not plain binary (value counts {multi}); "
                     "they are thresholded at 128 (or >0 for 0/1 masks)")
    if report["bad_row_values"].get("unknown_cloth_type"):
        notes.append(f"unknown cloth_type values (excluded, not guessed): {report['bad_row_values']['unknown_cloth_type']}")
    gb = report["storage_estimate_bytes"] / 1e9
    notes.append(f"the latent cache at {cfg.canvas.half_width}x{cfg.canvas.half_height} per half needs about {gb:.2f} GB")
    return not blocking, [f"[blocking] {b}" for b in blocking] + [f"[note] {n}" for n in notes], blocking


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"# Dataset readiness: {report['source']}", ""]
    lines.append(f"**Ready: {'yes' if report['ready'] else 'NO'}**")
    lines.append("")
    lines += [f"- {r}" for r in report["reasons"]]
    lines += ["", "## Rows", "",
              f"{report['rows_valid']} valid of {report['rows_total']} rows, {report['pids']} items (pids).", "",
              "| bad-row reason | rows |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["bad_rows"].items()] or ["| (none) | 0 |"]
    lines += ["", "| cloth_type | rows |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["by_cloth_type"].items()]
    lines += ["", "| view | rows |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in report["by_view"].items()]
    lines += ["", "## Try-on pairs (after the category filter)", "", "| split | upper | lower | full |", "|---|---:|---:|---:|"]
    for s, by_group in report["pairs"].items():
        lines.append(f"| {s} | " + " | ".join(str(by_group[g]) for g in GROUPS) + " |")
    lines += ["", f"Items per split: {report['pids_by_split']} (split by pid: no pid is in two splits).", "",
              "## Masks", "", "| group | rows | mean | p5 | p50 | p95 |", "|---|---:|---:|---:|---:|---:|"]
    for g, c in report["mask_coverage"].items():
        if c.get("n"):
            lines.append(f"| {g} | {c['n']} | {c['mean']:.3f} | {c['p5']:.3f} | {c['p50']:.3f} | {c['p95']:.3f} |")
    lines += ["", "Mask area as a share of the photo, before generalising.", ""]
    if "mask_placement" in report:
        kinds = {g: (k["kind"], k["why"]) for g, k in report["mask_kinds"].items()}
        lines += placement.markdown(report["mask_placement"], kinds)
        lines += [f"![{g}]({g})" for g in report.get("mask_grids", [])] + [""]
    lines += ["## Sizes", "", "| image size | rows |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["image_sizes"].items()]
    lines += ["", f"Latent cache estimate: {report['storage_estimate_bytes'] / 1e9:.2f} GB "
              f"at {report['canvas']['half_width']}x{report['canvas']['half_height']} per half.", ""]
    return "\n".join(lines)


THUMB_HEIGHT = 256


def _label(img: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + 14), "white")
    out.paste(img, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill="black")
    return out


def sample_grid(rows: Sequence[Mapping[str, Any]], pairs: Sequence[Pair], cfg: Config) -> Image.Image:
    """One line per pair: garment | person | general mask over the person | masked canvas.

    ``rows`` carry ``image_bytes`` and ``mask_bytes``; pair indices point into ``rows``.
    """
    lines = []
    for p in pairs:
        g, q = rows[p.garment], rows[p.person]
        sample = build_sample(to_rgb(decode(g["image_bytes"])), to_mask(decode(g["mask_bytes"])),
                              to_rgb(decode(q["image_bytes"])), to_mask(decode(q["mask_bytes"])),
                              p.group, cfg.canvas, cfg.mask)
        W = cfg.canvas.half_width
        garment, person = sample.canvas[:, :W], sample.canvas[:, W:]
        m = sample.mask_canvas[:, W:, None]
        overlay = person * (1 - 0.5 * m) + np.array([1.0, 0.0, 0.0]) * 0.5 * m
        panels = [garment, person, overlay, sample.masked_canvas]
        tiles = [Image.fromarray(to_uint8(a)) for a in panels]
        for t in tiles:  # production canvases are 1024 px tall: keep the grid viewable
            t.thumbnail((4 * THUMB_HEIGHT, THUMB_HEIGHT))
        names = [f"garment {p.garment_pose}", f"person {p.person_pose}", "general mask", "masked canvas"]
        tiles = [_label(t, n) for t, n in zip(tiles, names)]
        line = Image.new("RGB", (sum(t.width for t in tiles) + 4 * len(tiles), tiles[0].height), "white")
        x = 0
        for t in tiles:
            line.paste(t, (x, 0))
            x += t.width + 4
        lines.append(_label(line, f"{p.pid} {p.cloth_type} ({p.split})"))
    grid = Image.new("RGB", (max(l.width for l in lines), sum(l.height + 6 for l in lines)), "white")
    y = 0
    for l in lines:
        grid.paste(l, (0, y))
        y += l.height + 6
    return grid


def pick_sample_pairs(rows: Sequence[Mapping[str, Any]], cfg: Config, per_group: int = 4) -> dict[str, list[Pair]]:
    """Up to ``per_group`` pairs of distinct pids per group among rows that carry pixels."""
    usable = [dict(r, valid=bool(r["valid"] and r.get("image_bytes") is not None)) for r in rows]
    pairs, _ = make_pairs(usable, cfg.data)
    chosen: dict[str, list[Pair]] = {}
    for p in pairs:
        picked = chosen.setdefault(p.group, [])
        if len(picked) < per_group and all(p.pid != o.pid for o in picked):
            picked.append(p)
    return chosen


def placement_grid(rows: Sequence[Mapping[str, Any]], title: str) -> Image.Image:
    """One line per row: photo | its mask in red | what the placement measure saw (silhouette
    grey, mask red, mid-height blue). ``rows`` carry ``image_bytes`` and ``mask_bytes``."""
    lines = []
    for r in rows:
        photo, mask = to_rgb(decode(r["image_bytes"])), to_mask(decode(r["mask_bytes"]))
        tinted = photo.copy()
        tinted[mask] = photo[mask] // 2 + np.array([127, 0, 0], np.uint8)
        seen = placement.picture(photo, mask)
        tiles = [Image.fromarray(a) for a in (photo, tinted) + ((seen,) if seen is not None else ())]
        h = min(THUMB_HEIGHT, photo.shape[0])
        tiles = [t.resize((max(1, round(t.width * h / t.height)), h), Image.NEAREST) for t in tiles]
        names = ["photo", "mask", "silhouette estimate"]
        tiles = [_label(t, n) for t, n in zip(tiles, names)]
        text = (f"{r['pid']} {r['pose']} {r['cloth_type']} ({r['group']}): top {r['mask_top']:.2f} "
                f"bottom {r['mask_bottom']:.2f} upper {r['upper_cover']:.2f} lower {r['lower_cover']:.2f}")
        width = max(sum(t.width + 4 for t in tiles), int(ImageDraw.Draw(tiles[0]).textlength(text)) + 4)
        line = Image.new("RGB", (width, tiles[0].height), "white")
        x = 0
        for t in tiles:
            line.paste(t, (x, 0))
            x += t.width + 4
        lines.append(_label(line, text))
    grid = Image.new("RGB", (max([l.width for l in lines] + [400]), 16 + sum(l.height + 6 for l in lines)), "white")
    ImageDraw.Draw(grid).text((2, 2), title, fill="black")
    y = 16
    for l in lines:
        grid.paste(l, (0, y))
        y += l.height + 6
    return grid


def pick_placement_rows(rows: Sequence[Mapping[str, Any]], kinds: Mapping[str, Mapping[str, str]],
                        per_group: int = 4, typical_per_group: int = 2
                        ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(the ``per_group`` most suspicious measured rows with pixels of each flagged group, the
    ``typical_per_group`` of every group nearest its median mask top)."""
    measured = [r for r in rows if r["valid"] and r.get("image_bytes") is not None and r.get("mask_top", -1) >= 0]
    suspicious, typical = [], []
    for g, k in kinds.items():
        mine = [r for r in measured if r["group"] == g]
        if not mine:
            continue
        if k["kind"] in ("whole-person", "all-clothing"):
            suspicious += sorted(mine, key=lambda r: -placement.suspicion(r, k["kind"]))[:per_group]
        mid = float(np.median([r["mask_top"] for r in mine]))
        typical += sorted(mine, key=lambda r: (abs(r["mask_top"] - mid), r["pid"], r["pose"]))[:typical_per_group]
    return suspicious, typical


def write_report(out_dir: Path, rows: Sequence[Mapping[str, Any]], cfg: Config, source_name: str) -> dict[str, Any]:
    """Write ``dataset_report.json``, ``dataset_report.md``, ``samples_<group>.png``,
    ``mask_placement.png`` and, when masks look like more than the garment, ``mask_suspicious.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(rows, cfg, source_name)
    suspicious, typical = pick_placement_rows(rows, report["mask_kinds"])
    report["mask_grids"] = []
    for name, picked, title in (
            ("mask_suspicious.png", suspicious, "masks that look like more than the garment (most suspicious first)"),
            ("mask_placement.png", typical, "typical masks per group (mask top nearest the group's median)")):
        (out_dir / name).unlink(missing_ok=True)  # a grid of an earlier run would mislead
        if picked:
            placement_grid(picked, title).save(out_dir / name)
            report["mask_grids"].append(name)
    grids = []
    for group, pairs in sorted(pick_sample_pairs(rows, cfg).items()):
        path = out_dir / f"samples_{group}.png"
        sample_grid(rows, pairs, cfg).save(path)
        grids.append(path.name)
    report["sample_grids"] = grids
    (out_dir / "dataset_report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report) + "\n" + "".join(f"![{g}]({g})\n" for g in grids)
    (out_dir / "dataset_report.md").write_text(md)
    return report
