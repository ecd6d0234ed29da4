"""A catalogue's inputs: which person is dressed in which garments, read from two folders and an
optional CSV, every file checked once before any model runs.

The layout (``ray_jobs/tryon_batch.py --help`` shows it to users)::

    people/<person>.png              a person photo (.png, .jpg, .jpeg or .webp)
    people/<person>.<region>.png     optional: where that person wears <region> now (white = the garment;
                                     the photo's size); missing: the human parser makes it, if one is
                                     configured, else the item is skipped with that reason
    garments/<region>/<garment>.png  a product shot (all of it is the garment); <region>: upper, lower, full
    garments/<region>/<garment>.mask.png   optional: the photo is a worn photo and this marks the
                                     garment on it (cut out exactly as training cuts a garment)
    outfits.csv                      optional: columns person,upper,lower,full (garment ids, empty =
                                     none; full is worn alone). Without it: every person x every garment

An item is one person in one *look*: one garment, or an outfit row's garments. Its id is
``<look>/<person>`` where a look is spelled ``upper-<id>+lower-<id>`` (regions in the order the
passes fill them), and its output is ``images/<look>/<person>.png``. Each item's seed comes from its
id (:func:`item_seed`), so an image does not depend on which other items exist or run beside it.

What cannot be used is never dropped silently: :class:`Catalogue` lists each unusable input with
its reason (``bad``: unreadable image, mask of the wrong size or empty, unknown id, a CSV row that
breaks the rules) and each item that cannot be dressed (``skipped``: a person mask missing where no
parser is configured).
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from catvton.data.validate import to_mask, to_rgb
from catvton.infer.request import exif_orientation, upright
from catvton.schema import GROUPS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""Photo and mask files read; other files are listed in ``ignored``."""
GARMENT_MASK = "mask"
"""``<garment>.mask.png`` marks the garment on a worn photo."""
PASS_ORDER = ("upper", "lower", "full")
"""The order a look's regions are spelled in (the model fills the top first, then the bottom;
``full`` is alone)."""
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
"""Person and garment ids: they become file names (no dots: a dot starts a mask's suffix)."""
CSV_COLUMNS = ("person", *PASS_ORDER)


class CatalogueError(ValueError):
    """The inputs as a whole cannot be read (a folder missing, a CSV without a ``person`` column)."""


@dataclass(frozen=True)
class PieceFiles:
    """One garment of an item, as files."""

    region: str
    garment_id: str
    garment: str
    """The garment photo."""
    garment_mask: str | None
    """Marks the garment on a worn photo; None: a product shot."""
    person_mask: str | None
    """Where the person wears ``region`` now; None: the service's human parser makes it."""


@dataclass(frozen=True)
class Item:
    """One person dressed in one look."""

    id: str
    """``<look>/<person>``: also the output's path under ``images/`` (plus ``.png``)."""
    person_id: str
    person: str
    """The person photo."""
    look: str
    pieces: tuple[PieceFiles, ...]
    """In pass order (upper before lower)."""
    seed: int

    def to_dict(self) -> dict:
        return {"id": self.id, "person_id": self.person_id, "person": self.person, "look": self.look,
                "seed": self.seed, "pieces": [vars(p) for p in self.pieces]}

    @classmethod
    def from_dict(cls, d: dict) -> "Item":
        return cls(d["id"], d["person_id"], d["person"], d["look"],
                   tuple(PieceFiles(**p) for p in d["pieces"]), int(d["seed"]))


@dataclass
class Catalogue:
    """What :func:`scan_catalogue` found."""

    items: list[Item]
    people: dict[str, str]
    """Person id -> photo (the usable ones)."""
    garments: dict[str, dict[str, str]]
    """Region -> garment id -> photo (the usable ones)."""
    bad: list[dict] = field(default_factory=list)
    """``{"input", "reason"}`` per unusable input (a file, or ``outfits.csv line N``)."""
    skipped: list[dict] = field(default_factory=list)
    """``{"item", "reason"}`` per item that cannot be dressed as the inputs stand."""
    ignored: list[str] = field(default_factory=list)
    """Files that are not images (a README, a .DS_Store)."""


def item_seed(item_id: str, base: int = 0) -> int:
    """The seed of an item: a hash of ``base`` and its id, below 2**31 - 8 (pass k uses seed + k)."""
    digest = hashlib.sha256(f"{base}/{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 8)


def look_name(garments: dict[str, str]) -> str:
    """``{"lower": "jeans", "upper": "tee"}`` -> ``upper-tee+lower-jeans``."""
    return "+".join(f"{r}-{garments[r]}" for r in PASS_ORDER if r in garments)


def read_photo_file(path: str | Path) -> np.ndarray:
    """``(h, w, 3)`` uint8, upright as a viewer shows it (EXIF), transparency over white."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(upright(img, exif_orientation(img)))


def read_mask_file(path: str | Path) -> np.ndarray:
    """``(h, w)`` bool, upright (the rule of :func:`catvton.data.validate.to_mask`)."""
    with Image.open(path) as img:
        img.load()
        return to_mask(upright(img, exif_orientation(img)))


def scan_catalogue(people_dir: str | Path, garments_dir: str | Path, outfits: str | Path | None = None,
                   auto_mask: bool = False, seed: int = 0) -> Catalogue:
    """Read the layout of the module docstring; every photo and mask is decoded once here.
    ``auto_mask``: a human parser is configured (missing person masks are made, not skipped)."""
    people_dir, garments_dir = Path(people_dir), Path(garments_dir)
    for d, flag in ((people_dir, "--people"), (garments_dir, "--garments")):
        if not d.is_dir():
            raise CatalogueError(f"{flag} {d} is not a folder")
    cat = Catalogue([], {}, {r: {} for r in GROUPS})
    person_files, person_masks = _people_files(people_dir, cat)
    sizes: dict[str, tuple[int, int]] = {}
    for pid, path in person_files.items():
        shape = _check_photo(path, cat)
        if shape is not None:
            cat.people[pid], sizes[pid] = str(path), shape
    masks: dict[tuple[str, str], str] = {}
    for (pid, region), path in person_masks.items():
        if pid not in person_files:
            cat.bad.append({"input": str(path), "reason": f"a mask of no person photo (no {pid}.png in {people_dir})"})
        elif pid in cat.people and _check_mask(path, sizes[pid], f"person photo {cat.people[pid]}", cat):
            masks[pid, region] = str(path)
    garment_masks = _garment_files(garments_dir, cat)
    if outfits is None:
        looks = [({region: gid}, None) for region in PASS_ORDER for gid in sorted(cat.garments[region])]
        pairs = [(look, pid, where) for look, where in looks for pid in sorted(cat.people)]
    else:
        pairs = _outfit_rows(Path(outfits), cat, person_files, _all_garment_ids(garments_dir))
    seen = set()
    for look, pid, where in pairs:
        name = look_name(look)
        item_id = f"{name}/{pid}"
        if item_id in seen:
            continue  # the same row twice: one image
        seen.add(item_id)
        pieces, missing = [], []
        for region in PASS_ORDER:
            if region not in look:
                continue
            mask = masks.get((pid, region))
            if mask is None and not auto_mask:
                missing.append(f"{pid}.{region}.png")
            gid = look[region]
            pieces.append(PieceFiles(region, gid, cat.garments[region][gid], garment_masks.get((region, gid)), mask))
        if missing:
            cat.skipped.append({"item": item_id, "reason": f"no person mask {', '.join(missing)} in {people_dir} and no "
                                                           "human parser (--parser): add the mask or configure a parser"})
            continue
        cat.items.append(Item(item_id, pid, cat.people[pid], name, tuple(pieces), item_seed(item_id, seed)))
    return cat


def _people_files(folder: Path, cat: Catalogue) -> tuple[dict[str, Path], dict[tuple[str, str], Path]]:
    photos: dict[str, list[Path]] = {}
    masks: dict[tuple[str, str], Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            cat.ignored.append(str(path))
            continue
        stem, _, tag = path.stem.rpartition(".")
        if stem and tag in GROUPS:
            if (stem, tag) in masks:
                cat.bad.append({"input": str(path), "reason": f"a second {tag} mask of {stem} (also {masks[stem, tag].name})"})
            masks.setdefault((stem, tag), path)
        elif _valid_id(path.stem, path, cat):
            photos.setdefault(path.stem, []).append(path)
    out = {}
    for pid, paths in photos.items():
        if len(paths) > 1:
            cat.bad.append({"input": str(paths[0]), "reason": f"person {pid} has {len(paths)} photos "
                                                              f"({', '.join(p.name for p in paths)}): keep one"})
        else:
            out[pid] = paths[0]
    return out, masks


def _garment_files(folder: Path, cat: Catalogue) -> dict[tuple[str, str], str]:
    """Fills ``cat.garments``; returns the checked garment masks of worn photos, by (region, id)."""
    checked: dict[tuple[str, str], str] = {}
    for region_dir in sorted(folder.iterdir()):
        if region_dir.name.startswith("."):
            continue
        if not region_dir.is_dir() or region_dir.name not in GROUPS:
            if region_dir.is_dir() or region_dir.suffix.lower() in IMAGE_SUFFIXES:
                cat.bad.append({"input": str(region_dir), "reason": f"garments go in {folder}/<region>/ with <region> "
                                                                    f"one of {list(GROUPS)}"})
            else:
                cat.ignored.append(str(region_dir))
            continue
        region = region_dir.name
        photos: dict[str, list[Path]] = {}
        masks: dict[str, Path] = {}
        for f in sorted(region_dir.iterdir()):
            if f.name.startswith(".") or f.is_dir():
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                cat.ignored.append(str(f))
                continue
            stem, _, tag = f.stem.rpartition(".")
            if stem and tag == GARMENT_MASK:
                masks[stem] = f
            elif _valid_id(f.stem, f, cat):
                photos.setdefault(f.stem, []).append(f)
        for gid, mask in masks.items():
            if gid not in photos:
                cat.bad.append({"input": str(mask), "reason": f"a garment mask of no garment photo ({gid}.png)"})
        for gid, paths in photos.items():
            if len(paths) > 1:
                cat.bad.append({"input": str(paths[0]), "reason": f"garment {region}/{gid} has {len(paths)} photos "
                                                                  f"({', '.join(p.name for p in paths)}): keep one"})
                continue
            shape = _check_photo(paths[0], cat)
            if shape is None:
                continue
            if gid in masks:
                if not _check_mask(masks[gid], shape, f"garment photo {paths[0]}", cat):
                    continue  # a worn photo whose mask is unusable is not taken for a product shot
                checked[region, gid] = str(masks[gid])
            cat.garments[region][gid] = str(paths[0])
    return checked


def _all_garment_ids(folder: Path) -> dict[str, set[str]]:
    """Every garment id present, usable or not (to tell an unknown id from an unusable photo)."""
    return {r: {f.stem for f in (folder / r).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES}
            if (folder / r).is_dir() else set() for r in GROUPS}


def _outfit_rows(path: Path, cat: Catalogue, person_files: dict[str, Path],
                 present: dict[str, set[str]]) -> list[tuple[dict[str, str], str, str]]:
    if not path.is_file():
        raise CatalogueError(f"--outfits {path} is not a file")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's export starts with a BOM
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        unknown = [h for h in header if h not in CSV_COLUMNS]
        if "person" not in header or unknown or not set(header) & set(GROUPS):
            raise CatalogueError(f"{path}: the header must be person plus any of {list(GROUPS)}; it is {header}")
        out = []
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            where = f"{path.name} line {line}"
            look = {r: row[r] for r in GROUPS if row.get(r)}
            problem = _row_problem(row["person"], look, cat, person_files, present)
            if problem:
                cat.bad.append({"input": where, "reason": problem})
            else:
                out.append((look, row["person"], where))
    return out


def _row_problem(pid: str, look: dict[str, str], cat: Catalogue, person_files: dict[str, Path],
                 present: dict[str, set[str]]) -> str | None:
    if pid not in person_files:
        return f"no person {pid!r} in the people folder"
    if pid not in cat.people:
        return f"person {pid!r}: its photo is unusable (listed above)"
    if not look:
        return "no garment: name one in upper, lower or full"
    if "full" in look and len(look) > 1:
        return "full is worn alone: leave upper and lower empty in a row with full"
    for region, gid in look.items():
        if gid not in cat.garments[region]:
            return (f"garment {region}/{gid!r}: its photo is unusable (listed above)" if gid in present[region]
                    else f"no garment {gid!r} in garments/{region}/")
    return None


def _valid_id(name: str, path: Path, cat: Catalogue) -> bool:
    if ID_RE.match(name):
        return True
    cat.bad.append({"input": str(path), "reason": "an id (the file name without its suffix) may hold letters, digits, "
                                                  "'-' and '_' only (it becomes a file name; a dot starts a mask's "
                                                  "suffix: <person>.<region>.png, <garment>.mask.png)"})
    return False


def _check_photo(path: Path, cat: Catalogue) -> tuple[int, int] | None:
    try:
        return read_photo_file(path).shape[:2]
    except Exception as e:  # noqa: BLE001  (PIL raises many types on a bad file)
        cat.bad.append({"input": str(path), "reason": f"not a readable image ({type(e).__name__}: {e})"[:300]})
        return None


def _check_mask(path: Path, size: tuple[int, int], of: str, cat: Catalogue) -> bool:
    try:
        mask = read_mask_file(path)
    except Exception as e:  # noqa: BLE001
        cat.bad.append({"input": str(path), "reason": f"not a readable image ({type(e).__name__}: {e})"[:300]})
        return False
    if mask.shape != size:
        cat.bad.append({"input": str(path), "reason": f"mask is {mask.shape[1]}x{mask.shape[0]} but the {of} is "
                                                      f"{size[1]}x{size[0]}: a mask has its photo's size"})
        return False
    if not mask.any():
        cat.bad.append({"input": str(path), "reason": "mask is empty: mark the garment in white"})
        return False
    return True
