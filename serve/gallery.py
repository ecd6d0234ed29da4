"""Example persons and garments for the try-on page, drawn from the synthetic world.

    GET /v1/examples          {"persons": [{id, url, width, height, masks: {upper, lower, full}}],
                               "garments": [{id, region, label, url}]}   (urls relative to the API root)
    GET /examples/{id}.png    a person photo, a person's mask for a region (white = the garment
                              worn there), or a garment's product shot

Public, synthetic pictures: no key needed (``serve/app.py`` lists the paths as open). Rendered
once, on the first request, and kept in memory (~0.3 s, ~300 KB). The persons wear a top and a
bottom (their masks are the renderer's own, the ``full`` mask their union); the garments are
product shots, cut out of another person's photo as ``catvton.data.canvas.garment_cutout`` cuts a
training garment (:func:`catvton.offline.demo_catalogue.product_shot`), so clicking them asks the model for the
case it was trained on. Persons are 3:4 crops of the square renders, the model canvas's shape.

The persons and garments come from :data:`GALLERY_SEED`, not the training set's seed, so they
are items of the same world that no training run has seen.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from PIL import Image

from catvton.offline.synthetic import Garment, plan_pid, render_view
from catvton.offline.demo_catalogue import product_shot

GALLERY_SEED = 15
"""The synthetic world's seed for the examples (the training set uses 0)."""
IMAGE_SIZE = 256
"""Render size: the synthetic training set's ``synthetic_image_size``."""
PERSONS = 4
GARMENTS_PER_REGION = {"upper": 3, "lower": 3, "full": 2}
PREFIX = "/examples/"
"""Where the pictures are served; every path under it is public (``serve/app.py``)."""


@dataclass
class Gallery:
    index: dict[str, Any] = field(default_factory=lambda: {"persons": [], "garments": []})
    png: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, image: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        self.png[name] = buf.getvalue()
        return PREFIX.lstrip("/") + name + ".png"


def label(g: Garment) -> str:
    """``checked teal sweater``: what a shop's thumbnail caption says."""
    pattern = {"hstripes": "striped", "vstripes": "pinstriped", "checks": "checked", "dots": "dotted"}
    return " ".join(w for w in (pattern.get(g.pattern, ""), g.colour_name, g.noun) if w)


def render_gallery(seed: int = GALLERY_SEED, size: int = IMAGE_SIZE) -> Gallery:
    """The first :data:`PERSONS` two-piece pids of ``seed`` as persons, the garments of the pids
    after them as product shots (every worn slot, until each region has its share)."""
    gallery = Gallery()
    want = dict(GARMENTS_PER_REGION)
    crop = slice((size - size * 3 // 4) // 2, (size - size * 3 // 4) // 2 + size * 3 // 4)  # 3:4, centred
    index = 0
    while len(gallery.index["persons"]) < PERSONS or any(want.values()):
        plan = plan_pid(seed, index)
        index += 1
        if index > 500:
            raise RuntimeError(f"seed {seed}: not enough examples in 500 pids: {want} still wanted")
        # rng=None: the canonical, noise-free view (the same picture on every server)
        photo, masks = render_view(plan.person, plan.outfit, "front", size)
        if len(gallery.index["persons"]) < PERSONS and plan.outfit.full is None:
            n = len(gallery.index["persons"]) + 1
            masks["full"] = masks["upper"] | masks["lower"]
            gallery.index["persons"].append({
                "id": f"person{n}", "url": gallery.add(f"person{n}", photo[:, crop]),
                "width": size * 3 // 4, "height": size,
                "label": f"in a {label(plan.outfit.upper)} and {label(plan.outfit.lower)}",
                "masks": {r: gallery.add(f"person{n}_mask_{r}", masks[r][:, crop].astype(np.uint8) * 255)
                          for r in ("upper", "lower", "full")}})
            continue
        for region in plan.outfit.slots:
            if want.get(region, 0) > 0 and masks[region].sum() >= 64:
                want[region] -= 1
                name = f"{region}{GARMENTS_PER_REGION[region] - want[region]}"
                garment = plan.outfit.garment(region)
                gallery.index["garments"].append({"id": name, "region": region, "label": label(garment),
                                                  "url": gallery.add(name, product_shot(photo, masks[region]))})
    order = {r: i for i, r in enumerate(GARMENTS_PER_REGION)}
    gallery.index["garments"].sort(key=lambda g: (order[g["region"]], g["id"]))
    return gallery


def mount(app: FastAPI) -> None:
    """Add ``GET /v1/examples`` and ``GET /examples/{name}.png`` to ``app``; the gallery is
    rendered on the first request to either."""
    lock, built = threading.Lock(), []

    def gallery() -> Gallery:
        with lock:
            if not built:
                built.append(render_gallery())
            return built[0]

    @app.get("/v1/examples", summary="Example persons (with their masks) and garments for the page",
             include_in_schema=False)
    def examples() -> JSONResponse:
        return JSONResponse(gallery().index, headers={"Cache-Control": "public, max-age=3600"})

    @app.get(PREFIX + "{name}.png", include_in_schema=False)
    def example_png(name: str) -> Response:
        png = gallery().png.get(name)
        if png is None:
            return JSONResponse({"error": f"no example {name!r}: GET /v1/examples lists them", "field": "name"},
                                status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})
