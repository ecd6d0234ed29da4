import numpy as np
import pytest

from catvton.config import CanvasConfig, MaskConfig
from catvton.data.canvas import build_sample, fit_box, fit_to_half, garment_cutout
from catvton.data.masks import box, convex_hull, dilate, general_mask, iou


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_dilate_grows_by_radius():
    m = rect(50, 50, 20, 30, 20, 30)
    d = dilate(m, 3)
    ys, xs = np.nonzero(d)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (17, 32, 17, 32)
    assert d[m].all()


def test_convex_hull_fills_the_gap_between_legs():
    legs = rect(60, 60, 10, 50, 10, 20) | rect(60, 60, 10, 50, 40, 50)
    hull = convex_hull(legs)
    assert hull[30, 30] and not legs[30, 30]
    assert hull[legs].all()
    assert not hull[5, 30]


def test_box_to_bottom_reaches_the_last_row():
    m = rect(100, 80, 40, 60, 30, 50)
    b = box(m, 5, to_bottom=True)
    ys, xs = np.nonzero(b)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (40, 99, 25, 54)


def test_pants_shorts_skirt_get_about_the_same_lower_mask():
    h, w = 200, 120
    waist = 90
    pants = rect(h, w, waist, 190, 40, 58) | rect(h, w, waist, 190, 62, 80) | rect(h, w, waist, 110, 40, 80)
    shorts = rect(h, w, waist, 130, 40, 80)
    skirt = np.zeros((h, w), bool)
    for y in range(waist, 150):  # flared: wider towards the hem
        half = 20 + (y - waist) // 6
        skirt[y, 60 - half:60 + half] = True
    cfg = MaskConfig()
    gens = [general_mask(m, "lower", cfg) for m in (pants, shorts, skirt)]
    raw = [iou(pants, shorts), iou(pants, skirt), iou(shorts, skirt)]
    general = [iou(gens[0], gens[1]), iou(gens[0], gens[2]), iou(gens[1], gens[2])]
    assert max(raw) < 0.6, raw  # the garments' own masks differ a lot ...
    assert min(general) >= 0.75, general  # ... the general masks far less
    assert min(general) - max(raw) > 0.2
    for g, m in zip(gens, (pants, shorts, skirt)):
        assert g[m].all(), "a general mask always covers the garment"


def test_general_mask_rules_and_shape_errors():
    m = rect(64, 64, 20, 40, 20, 40)
    cfg = MaskConfig(upper_rule="dilate", dilation=0.05)
    assert general_mask(m, "upper", cfg).sum() > m.sum()
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        general_mask(np.zeros((4, 4, 3), bool), "upper", cfg)


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_fit_box_keeps_the_half_aspect(mode):
    top, left, h, w = fit_box((512, 512), (1024, 768), mode)
    assert abs(w / h - 0.75) < 0.01
    if mode == "pad":
        assert (h, w) == (683, 512) and top < 0  # white borders above and below
    else:
        assert (h, w) == (512, 384) and left == 64  # the sides are cut


def test_fit_to_half_shapes_and_padding():
    img = np.zeros((64, 64, 3), np.uint8)
    out = fit_to_half(img, (128, 96), "pad")
    assert out.shape == (128, 96, 3)
    assert (out[0] == 255).all() and (out[64, 48] == 0).all()
    m = fit_to_half(np.ones((64, 64), np.uint8), (128, 96), "pad", nearest=True, fill=0)
    assert m.shape == (128, 96) and m[0].max() == 0 and m[64].min() == 1


def test_garment_cutout_is_white_outside_the_garment():
    photo = np.full((100, 100, 3), 30, np.uint8)
    photo[40:60, 30:70] = (200, 0, 0)
    mask = rect(100, 100, 40, 60, 30, 70)
    cut = garment_cutout(photo, mask, (128, 96), margin=0.05)
    assert cut.shape == (128, 96, 3)
    assert (cut[0, 0] == 255).all()
    assert tuple(cut[64, 48]) == (200, 0, 0)
    assert not (cut == 30).all(axis=2).any(), "nothing outside the mask survives"
    with pytest.raises(ValueError):
        garment_cutout(photo, np.zeros((100, 100), bool), (128, 96), 0.05)


def test_build_sample_canvas_layout():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    mask = rect(96, 96, 50, 80, 30, 60)
    cfg = CanvasConfig(half_width=48, half_height=64)
    s = build_sample(photo, mask, photo, mask, "lower", cfg, MaskConfig())
    assert s.canvas.shape == (64, 96, 3) and s.canvas.dtype == np.float32
    assert s.mask_canvas.shape == (64, 96)
    assert s.masked_canvas.shape == (64, 96, 3)
    assert s.person_mask.shape == (64, 48)
    assert s.mask_canvas[:, :48].max() == 0, "the garment half is never inpainted"
    assert set(np.unique(s.mask_canvas)) == {0.0, 1.0}
    m = s.mask_canvas.astype(bool)
    assert np.allclose(s.masked_canvas[m], 0.5)
    assert np.array_equal(s.masked_canvas[~m], s.canvas[~m])
    assert 0.0 <= s.canvas.min() and s.canvas.max() <= 1.0
    # the general mask contains the dataset's own mask on the person half
    assert s.mask_canvas[:, 48:][s.person_mask].all()
