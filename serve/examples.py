"""Write an example request (person, garment, mask) from the synthetic set, for curl and the page.

    python -m serve.examples --out /tmp/tryon            # a lower-body item: pants, shorts or a skirt
    curl -s -o /tmp/tryon/result.png -F person=@/tmp/tryon/person.png -F garment=@/tmp/tryon/garment.png \\
         -F mask=@/tmp/tryon/mask.png -F garment_type=lower http://127.0.0.1:8000/v1/tryon

The person and the garment come from two views of one synthetic item, the garment a cut-out of the
first view (a product shot), the mask the person view's own garment mask (the server generalises it by the training rule).

An outfit (a top and a bottom in one request), from the page's example gallery (:mod:`serve.gallery`)::

    python -m serve.examples --outfit --out /tmp/outfit   # person.png, upper_mask.png, lower_mask.png, top.png, bottom.png
    curl -s -o /tmp/outfit/result.png -F person=@/tmp/outfit/person.png \\
         -F upper=@/tmp/outfit/top.png -F upper_mask=@/tmp/outfit/upper_mask.png \\
         -F lower=@/tmp/outfit/bottom.png -F lower_mask=@/tmp/outfit/lower_mask.png http://127.0.0.1:8000/v1/tryon
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from catvton.offline.demo_catalogue import product_shot
from catvton.offline.synthetic import synthetic_rows
from catvton.schema import cloth_group, parse_pose
from serve.gallery import render_gallery


def write_example(out: Path, group: str = "lower", image_size: int = 256, seed: int = 0) -> dict[str, Path]:
    """person.png, garment.png, mask.png of the first synthetic item of ``group`` with two person views."""
    out.mkdir(parents=True, exist_ok=True)
    by_pid: dict[str, list[dict]] = {}
    for row in synthetic_rows(40, image_size=image_size, seed=seed):
        pose = parse_pose(row["pose"])
        if cloth_group(row["cloth_type"]) != group or pose is None or pose.view in ("flat", "zoom"):
            continue
        by_pid.setdefault(row["pid"], []).append(row)
        views = by_pid[row["pid"]]
        if len(views) == 2:
            garment, person = views
            paths = {"person": out / "person.png", "garment": out / "garment.png", "mask": out / "mask.png"}
            person["images"].save(paths["person"])
            Image.fromarray(product_shot(np.asarray(garment["images"].convert("RGB")),
                                         np.asarray(garment["mask"]) >= 128)).save(paths["garment"])
            person["mask"].save(paths["mask"])
            return paths
    raise RuntimeError(f"no synthetic {group} item with two person views in the first 40 pids")


def write_outfit_example(out: Path) -> dict[str, Path]:
    """person.png with its upper_mask.png and lower_mask.png, and a top.png and a bottom.png
    (product shots of other people's garments): the page's first example person and garments."""
    gallery = render_gallery()
    person = gallery.index["persons"][0]
    garments = {g["region"]: g["id"] for g in reversed(gallery.index["garments"])}  # the first of each region
    names = {"person": person["id"], "upper_mask": f"{person['id']}_mask_upper",
             "lower_mask": f"{person['id']}_mask_lower", "top": garments["upper"], "bottom": garments["lower"]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, key in names.items():
        paths[name] = out / f"{name}.png"
        paths[name].write_bytes(gallery.png[key])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/tryon")
    ap.add_argument("--group", default="lower", choices=["upper", "lower", "full"])
    ap.add_argument("--outfit", action="store_true", help="a person with masks for a top and a bottom, and a top "
                                                          "and a bottom to dress them in")
    args = ap.parse_args()
    paths = write_outfit_example(Path(args.out)) if args.outfit else write_example(Path(args.out), args.group)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
