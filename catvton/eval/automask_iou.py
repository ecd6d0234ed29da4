"""How well the server's auto-masks agree with the dataset's own masks: IoU of the two general
masks (:func:`catvton.data.masks.general_mask` of each), per garment group, on one split's
person photos (rows from :func:`catvton.eval.samples.split_rows`)::

    python -m catvton.eval.automask_iou --parser mattmdjaga/segformer_b2_clothes \\
        --config configs/l40s.yaml --split val              # real data, real parser
    python -m catvton.eval.automask_iou --make-tiny /tmp/parser  # a tiny random parser (offline)
    python -m catvton.eval.automask_iou --parser /tmp/parser      # the command on the offline default

The offline default reads the synthetic set, which any offline entry point builds once (e.g.
``python easy_train.py setup``). The plan's target is a mean IoU above 0.85 per group on real
data with a real parser; a random tiny parser only shows that the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from catvton.config import Config, MaskConfig, load_config
from catvton.data.masks import general_mask, iou
from catvton.eval.samples import split_rows
from catvton.infer.automask import AutoMasker, make_tiny_parser

NO_PERSON_VIEWS = ("flat", "zoom")
"""Views that show no person to parse."""


def person_rows(cfg: Config, split: str, max_per_group: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(group, photo (h, w, 3) uint8, dataset mask (h, w) bool)`` of the valid person photos of
    one split, at most ``max_per_group`` per group."""
    taken: dict[str, int] = defaultdict(int)
    for _, check, photo, mask in split_rows(cfg, split):
        if not check.valid or check.view in NO_PERSON_VIEWS or taken[check.group] >= max_per_group:
            continue
        taken[check.group] += 1
        yield check.group, photo, mask


def agreement(masker: AutoMasker, rows: Iterable[tuple[str, np.ndarray, np.ndarray]],
              mask_cfg: MaskConfig) -> dict[str, dict[str, float]]:
    """IoU of the auto general mask and the dataset mask's general mask, per group.

    ``rows``: ``(group, photo (h, w, 3) uint8, dataset mask (h, w) bool)``."""
    scores: dict[str, list[float]] = defaultdict(list)
    for group, photo, mask in rows:
        _, auto = masker.general(photo, group, mask_cfg)
        scores[group].append(iou(auto, general_mask(mask, group, mask_cfg)))
    return {g: {"rows": len(v), "iou_mean": float(np.mean(v)), "iou_median": float(np.median(v)),
                "share_above_0.85": float(np.mean(np.asarray(v) > 0.85))} for g, v in sorted(scores.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parser", help="hub id or folder of a transformers segmentation model")
    ap.add_argument("--config", default="configs/tiny.yaml", help="data and mask sections come from here")
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. data.source=/path")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--max-per-group", type=int, default=200)
    ap.add_argument("--make-tiny", metavar="DIR", help="write a tiny random parser to DIR and stop")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args(argv)
    if args.make_tiny:
        print(make_tiny_parser(args.make_tiny))
        return 0
    if not args.parser:
        ap.error("--parser is required (or --make-tiny DIR)")
    cfg = load_config(args.config, args.set)
    masker = AutoMasker.load(args.parser)
    report = {"parser": args.parser, "split": args.split, "source": cfg.data.source,
              "groups": agreement(masker, person_rows(cfg, args.split, args.max_per_group), cfg.mask)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
