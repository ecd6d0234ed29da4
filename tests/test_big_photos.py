"""Big and phone photos through the ingress and the model deployment, without Ray (the same
classes Serve runs, in this process): an EXIF-rotated photo comes back upright at its upright
size with the mask applied in the upright frame; a photo much larger than the canvas reaches the
model as a reduced copy and comes back at its own size, the upload's pixels outside the mask;
the answer formats.

The 12-megapixel timing is a benchmark, not a test: bench/big_photo.py.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from serve_helpers import InProcessModel, encoded, png

from catvton.data.masks import dilate, general_mask
from catvton.infer.request import ImageLimits, InputError, read_photo, work_scale

HALF = (128, 96)  # the tiny config's canvas half (H, W)
GARMENT = np.full((60, 40, 3), (200, 40, 40), np.uint8)


def person_photo(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth photo that is different in every direction (a turned copy never equals it), and a
    lower-body mask on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([60 + 150 * yy, 60 + 150 * xx, 80 + 100 * yy * xx], -1) + rng.integers(0, 12, (h, w, 3))
    mask = np.zeros((h, w), bool)
    mask[h // 2: h - h // 10, w // 4: 3 * w // 4] = True
    return img.astype(np.uint8), mask


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(1)
    return InProcessModel({"overrides": ["model.transformer_override=null"], "torch_threads": 1})


@pytest.fixture(scope="module")
def client(model):
    from fastapi.testclient import TestClient

    from catvton.infer.serving import ServeConfig
    from serve.app import create_api

    return TestClient(create_api(ServeConfig(), model))


def tryon(client, person: bytes, mask: bytes, **data):
    return client.post("/v1/tryon", data={"garment_type": "lower", "steps": "2", **data},
                       files={"person": ("p", person, "application/octet-stream"), "garment": ("g.png", png(GARMENT)),
                              "mask": ("m.png", mask, "image/png")})


def image_of(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"))


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_an_exif_rotated_photo_comes_back_upright_with_the_mask_in_the_upright_frame(client, model, orientation):
    """The phone stores the pixels turned plus an EXIF orientation; the browser shows them
    upright and the mask is painted there. The answer is the upright photo at the upright size,
    changed only inside the general mask of the upright mask."""
    upright, mask = person_photo(160, 120, seed=orientation)
    stored = encoded(upright, orientation=orientation)
    assert Image.open(io.BytesIO(stored)).size == ((160, 120) if orientation in (6, 8) else (120, 160))
    out = image_of(tryon(client, stored, png(mask.astype(np.uint8) * 255), format="png"))
    assert out.shape == upright.shape, "upright size"
    assert model.payloads[-1]["person"].shape == upright.shape, "the model saw the upright photo"
    general = general_mask(mask, "lower", model.model.service.cfg.mask)
    assert np.array_equal(out[~general], upright[~general]), "outside the mask: the upright upload, untouched"
    assert np.abs(out[general].astype(int) - upright[general]).mean() > 5, "the mask's region was repainted"


def test_a_rotated_phone_jpeg_comes_back_upright_and_a_mask_of_the_stored_frame_is_refused(client):
    upright, mask = person_photo(400, 300, seed=1)
    stored = encoded(upright, "JPEG", orientation=6, quality=95)
    r = tryon(client, stored, png(mask.astype(np.uint8) * 255))
    assert r.headers["content-type"] == "image/jpeg"
    out = image_of(r)
    assert out.shape == upright.shape
    assert np.abs(out[:40].astype(int) - upright[:40]).mean() < 4, "the top rows are the upright photo's (JPEG twice)"
    turned = png(np.rot90(mask).astype(np.uint8) * 255)  # painted on the stored (sideways) pixels
    bad = tryon(client, stored, turned)
    assert bad.status_code == 422 and bad.json()["field"] == "mask" and "upright" in bad.json()["error"]


@pytest.mark.parametrize("orientation", [None, 6])
def test_a_photo_much_larger_than_the_canvas_reaches_the_model_reduced_and_comes_back_whole(client, model,
                                                                                         orientation):
    h, w = 800, 600
    person, mask = person_photo(h, w, seed=3)
    scale = work_scale((h, w), HALF, "crop")
    assert scale == pytest.approx(2 * HALF[0] / h)  # the crop window is the full height here
    out = image_of(tryon(client, encoded(person, orientation=orientation), png(mask.astype(np.uint8) * 255),
                         format="png"))
    sent = model.payloads[-1]
    assert sent["person"].shape == (round(h * scale), round(w * scale), 3)
    assert sent["pieces"][0]["mask"].shape == sent["person"].shape[:2]
    assert out.shape == person.shape
    changed = np.any(out != person, axis=2)
    assert changed.sum() > 0.5 * mask.sum(), "the garment's region was repainted"
    # The general mask was made at the reduced size: it may reach one working pixel (1/scale photo
    # pixels, + 1 for the smooth upscale) beyond the one made at full size, never further.
    full_general = general_mask(mask, "lower", model.model.service.cfg.mask)
    allowed = dilate(full_general, int(np.ceil(1 / scale)) + 1)
    assert not changed[~allowed].any(), "outside the general mask the upload's pixels are kept"


def test_formats_and_the_json_answer(client):
    person, mask = person_photo(160, 120)
    files = (png(person), png(mask.astype(np.uint8) * 255))
    for fmt, media, magic in [("jpeg", "image/jpeg", b"\xff\xd8"), ("webp", "image/webp", b"RIFF"),
                              ("png", "image/png", b"\x89PNG")]:
        r = tryon(client, *files, format=fmt)
        assert r.status_code == 200 and r.headers["content-type"] == media and r.content.startswith(magic)
    clash = tryon(client, *files, output="png", format="jpeg")
    assert clash.status_code == 422 and clash.json()["field"] == "format"
    j = tryon(client, *files, output="json", format="webp").json()
    assert j["media_type"] == "image/webp" and (j["width"], j["height"]) == (120, 160)
    assert Image.open(io.BytesIO(base64.b64decode(j["image_webp_base64"]))).format == "WEBP"
    info = client.get("/v1/info").json()
    assert "upload" in info["default_format"] and info["formats"] == ["jpeg", "webp", "png"]


@pytest.mark.parametrize("upload,media", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_without_format_the_answer_has_the_uploads_format_as_clients_before_format_expect(client, upload, media):
    """Clients written before `format` sent PNGs and read PNGs (``output=png``, the default then, or
    ``output=json``'s ``image_png_base64``): they still do. A phone's JPEG comes back as a JPEG."""
    person, mask = person_photo(160, 120)
    m = png(mask.astype(np.uint8) * 255)
    assert tryon(client, encoded(person, upload), m).headers["content-type"] == media
    assert tryon(client, encoded(person, upload), m, output="png").headers["content-type"] == "image/png"
    if upload == "PNG":
        j = tryon(client, encoded(person, upload), m, output="json").json()
        assert j["media_type"] == "image/png" and base64.b64decode(j["image_png_base64"]).startswith(b"\x89PNG")


def test_read_photo_reduces_only_what_is_larger_than_the_canvas_needs():
    limits = ImageLimits()
    small = read_photo(png(np.zeros((300, 200, 3), np.uint8)), "person", limits, HALF, "crop")
    assert small.work.shape == (300, 200, 3), "reducing would keep over half the pixels: not reduced"
    gradient = np.stack(np.broadcast_arrays(*np.ogrid[0:1200, 0:900], 0), -1)
    photo = ((gradient * [0.2, 0.28, 0]) % 256).astype(np.uint8)
    big = read_photo(encoded(photo, "JPEG", quality=95), "person", limits, HALF, "crop")
    assert big.work.shape == (256, 192, 3)
    assert not big.upright_ready, "a JPEG's model copy is decoded reduced; the full size is decoded later"
    assert big.full.size == (900, 1200) and big.upright_ready
    reference = np.asarray(Image.fromarray(photo).resize((192, 256), Image.BILINEAR, reducing_gap=2.0))
    assert np.abs(big.work.astype(int) - reference).mean() < 2, "the reduced decode is the reduced photo"
    truncated = encoded(photo, "JPEG", quality=95)[:-4000]
    with pytest.raises(InputError, match="truncated"):
        read_photo(truncated, "person", limits, HALF, "crop")
    phone = read_photo(encoded(np.zeros((1200, 900, 3), np.uint8), "JPEG", orientation=6), "person", limits, HALF,
                       "crop")
    assert phone.source.size == (1200, 900) and phone.size == (900, 1200) and phone.work.shape == (256, 192, 3)
    assert not phone.upright_ready, "the full-size turn is left for later (the server: while the model runs)"
    assert phone.full.size == (900, 1200) and phone.upright_ready
