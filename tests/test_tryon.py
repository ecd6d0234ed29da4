"""The tiny base runs a try-on on a canvas made by the pair builder (the same code as training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from catvton.config import load_config
from catvton.data.canvas import build_sample
from catvton.offline.synthetic import synthetic_rows
from catvton.data.validate import check_row, to_rgb

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_base_two_step_tryon_on_a_pair_builder_canvas():
    from catvton.infer.tryon import TryOn
    from catvton.offline.tiny_base import ensure_tiny_base

    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.transformer_override=null"])
    cfg.model.base = str(ensure_tiny_base())
    rows = [r for r in synthetic_rows(3, image_size=128, seed=0) if r["pid"] == "id_00000002"]
    rows = [r for r in rows if not r["pose"].endswith("flat")][:2]
    checked = []
    for r in rows:
        cell = {k: ({"bytes": _png(v), "path": None} if k in ("images", "mask") else v) for k, v in r.items()}
        check, photo, mask = check_row(cell, cfg.data)
        assert check.valid
        checked.append((to_rgb(photo), mask, check.group))
    (gp, gm, group), (pp, pm, _) = checked
    s = build_sample(gp, gm, pp, pm, group, cfg.canvas, cfg.mask)
    tryon = TryOn.load(cfg)
    out = tryon.fill_canvases(s.canvas[None], s.mask_canvas[None], steps=2)
    assert out.shape == (1, cfg.canvas.half_height, 2 * cfg.canvas.half_width, 3)
    m = s.mask_canvas.astype(bool)
    assert np.array_equal(out[0][~m], s.canvas[~m]), "unmasked pixels are the input's (pasted back)"
    assert np.abs(out[0][m] - 0.5).mean() > 0.01, "the masked region was generated, not left grey"
    again = tryon.fill_canvases(s.canvas[None], s.mask_canvas[None], steps=2)
    assert np.array_equal(out, again), "fixed seed: deterministic"


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
