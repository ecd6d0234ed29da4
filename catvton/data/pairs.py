"""Try-on pairs from DeepFashion rows, and the train / val / test split by pid.

The dataset has no garment image: the garment is cut out of one view of an item (``pid``) and
the person comes from another view of the same item, so the person's photo is the ground truth.
Everything here is decided per pid from a seeded hash, so the split and the upper-body share
are the same whether pairs are made on the driver (setup report) or inside a Ray Data
``groupby("pid")`` stage (preprocessing), and no pid can land in two splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from catvton.config import DataConfig

SPLITS = ("train", "val", "test")
PERSON_VIEWS = ("front", "side", "back", "full", "additional")
"""Views that show a person wearing the item (``flat`` shows the garment alone, ``zoom`` a detail)."""


def pid_unit(pid: str, seed: int, salt: str) -> float:
    """A deterministic number in [0, 1) for (pid, seed, salt): a stable per-pid coin."""
    h = hashlib.sha256(f"{seed}:{salt}:{pid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(pid: str, cfg: DataConfig) -> str:
    """``train``, ``val`` or ``test`` for a pid, by the configured fractions."""
    u = pid_unit(pid, cfg.seed, "split")
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def pid_selected(pid: str, group: str, cfg: DataConfig) -> bool:
    """Whether this pid's pairs are used: its group is trained on, or it is an upper-body pid
    drawn into the configured ``upper_share`` (to keep tops working)."""
    if group in cfg.groups:
        return True
    return group == "upper" and pid_unit(pid, cfg.seed, "upper") < cfg.upper_share


@dataclass(frozen=True)
class Pair:
    """Garment from row ``garment`` and person from row ``person`` (indices into the rows given
    to :func:`make_pairs`) of one item."""

    pid: str
    group: str
    cloth_type: str
    split: str
    garment: int
    person: int
    garment_pose: str
    person_pose: str
    selected: bool
    """Whether the category filter keeps it (see :func:`pid_selected`)."""


def make_pairs(rows: Sequence[Mapping[str, Any]], cfg: DataConfig) -> tuple[list[Pair], Counter]:
    """Pairs from validated rows (any number of pids, any order).

    Each row needs ``pid``, ``pose``, ``cloth_type``, ``valid``, ``group``, ``view``; invalid
    rows are ignored (they were counted by validation). For each (pid, cloth_type) the garment
    view is the first of ``cfg.garment_views`` present, and every other view showing a person
    gives one pair. Returns the pairs (all, with ``selected`` set) and a Counter of why valid
    rows gave no pair (``single_view``, ``duplicate_pose``, ``no_person_view``,
    ``no_garment_view``).
    """
    skipped: Counter = Counter()
    items: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        if r["valid"]:
            items.setdefault((r["pid"], r["cloth_type"]), []).append(i)
    rank = {v: k for k, v in enumerate(cfg.garment_views)}
    pairs: list[Pair] = []
    for (pid, cloth_type), idx in sorted(items.items()):
        seen: dict[str, int] = {}
        for i in sorted(idx, key=lambda i: rows[i]["pose"]):
            if rows[i]["pose"] in seen:
                skipped["duplicate_pose"] += 1
            else:
                seen[rows[i]["pose"]] = i
        unique = list(seen.values())
        if len(unique) < 2:
            skipped["single_view"] += len(unique)
            continue
        candidates = [i for i in unique if rows[i]["view"] in rank]
        if not candidates:
            skipped["no_garment_view"] += len(unique)
            continue
        garment = min(candidates, key=lambda i: (rank[rows[i]["view"]], rows[i]["pose"]))
        persons = [i for i in unique if i != garment and rows[i]["view"] in PERSON_VIEWS]
        if not persons:
            skipped["no_person_view"] += len(unique)
            continue
        group = rows[garment]["group"]
        split = split_of(pid, cfg)
        selected = pid_selected(pid, group, cfg)
        for p in persons:
            pairs.append(Pair(pid, group, cloth_type, split, garment, p, rows[garment]["pose"],
                              rows[p]["pose"], selected))
    return pairs, skipped
