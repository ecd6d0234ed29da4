"""Outfits in one request (issue 15): a top and a bottom in one picture, worn-photo garments.

Through the ingress's FastAPI app and the model deployment's class in this process (no Ray): the
shipped tiny base + alpha, 2 steps, on a synthetic person wearing a top and a bottom, with the
masks the renderer drew for both.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from catvton.cache import format as F
from catvton.cache import stages as St
from catvton.data import validate as V
from catvton.data.masks import general_mask
from catvton.infer.outfit import OutfitRequest, Piece, check_pieces
from catvton.infer.request import InputError
from catvton.offline.synthetic import plan_pid, render_view, synthetic_rows
from conftest import as_batch, png_cell
from serve_helpers import InProcessModel, png

STEPS = "2"


@pytest.fixture(scope="module")
def model():
    """The model deployment's class with the shipped alpha, in this process, without Ray (resolving
    a shipped alpha starts none)."""
    import torch

    torch.set_num_threads(1)
    return InProcessModel({"torch_threads": 1})


@pytest.fixture(scope="module")
def client(model):
    from fastapi.testclient import TestClient

    from catvton.infer.serving import ServeConfig
    from serve.app import create_api

    return TestClient(create_api(ServeConfig(), model))


def two_piece_person(size: int = 192) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The first synthetic person in a top and a bottom, front view: photo and both slots' masks."""
    for i in range(40):
        plan = plan_pid(0, i)
        if plan.outfit.full is None:
            photo, masks = render_view(plan.person, plan.outfit, "front", size, np.random.default_rng(i))
            return photo, masks
    raise AssertionError("no two-piece outfit in the first 40 synthetic pids")


def garment(colour: tuple[int, int, int], h: int = 120, w: int = 90) -> np.ndarray:
    """A product shot: a plain garment of ``colour`` on white."""
    img = np.full((h, w, 3), 255, np.uint8)
    img[10:h - 10, 15:w - 15] = colour
    return img


def mask_png(mask: np.ndarray) -> tuple[str, bytes, str]:
    return ("m.png", png(mask.astype(np.uint8) * 255), "image/png")


def file(arr: np.ndarray) -> tuple[str, bytes, str]:
    return ("x.png", png(arr), "image/png")


def outfit(client, person, masks, top, bottom, **data):
    return client.post("/v1/tryon", data={"steps": STEPS, "format": "png", **data},
                       files={"person": file(person), "upper": file(top), "upper_mask": mask_png(masks["upper"]),
                              "lower": file(bottom), "lower_mask": mask_png(masks["lower"])})


def image_of(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"))


RED, BLUE, GREEN = (200, 30, 30), (30, 40, 200), (40, 170, 60)


@pytest.fixture(scope="module")
def person():
    return two_piece_person()


@pytest.fixture(scope="module")
def red_green(client, model, person):
    """The red-top, green-bottom outfit's response, with the payload the model got for it
    (``.payload``: later requests of the module append theirs to ``model.payloads``)."""
    photo, masks = person
    r = outfit(client, photo, masks, garment(RED), garment(GREEN))
    r.payload = model.payloads[-1]
    return r


def test_an_outfit_is_one_picture_changed_only_inside_the_two_general_masks(model, person, red_green):
    photo, masks = person
    r = red_green
    out = image_of(r)
    assert out.shape == photo.shape, "one picture at the person's size"
    assert r.headers["x-tryon-regions"] == "upper,lower", "the top first, then the bottom"
    assert r.headers["x-tryon-mask-source"] == "request,request"
    cfg = model.model.service.cfg
    upper, lower = general_mask(masks["upper"], "upper", cfg.mask), general_mask(masks["lower"], "lower", cfg.mask)
    union = upper | lower
    assert np.array_equal(out[~union], photo[~union]), "outside the union of the general masks: the upload"
    for region, general in (("upper", upper), ("lower", lower)):
        changed = np.any(out[general] != photo[general], axis=-1).mean()
        assert changed > 0.5, f"the {region} region was repainted ({changed:.0%} of it changed)"
    passes = [p["region"] for p in r.payload["pieces"]]
    assert sorted(passes) == ["lower", "upper"]


def test_swapping_the_bottom_changes_only_the_bottom_region(model, client, person, red_green):
    photo, masks = person
    a = image_of(red_green)
    b = image_of(outfit(client, photo, masks, garment(RED), garment(BLUE)))
    lower = general_mask(masks["lower"], "lower", model.model.service.cfg.mask)
    differs = np.any(a != b, axis=-1)
    assert not differs[~lower].any(), "the top's pass does not see the bottom: nothing outside the bottom changes"
    assert differs[lower].mean() > 0.5, "the bottom given reaches the bottom region"
    # and the bottom region moved towards the bottom given: bluer with the blue one
    blue_shift = b[lower][:, 2].astype(float).mean() - a[lower][:, 2].astype(float).mean()
    green_shift = a[lower][:, 1].astype(float).mean() - b[lower][:, 1].astype(float).mean()
    assert blue_shift + green_shift > 0, (blue_shift, green_shift)


def test_swapping_the_top_changes_the_top_region(model, client, person, red_green):
    photo, masks = person
    a = image_of(red_green)
    c = image_of(outfit(client, photo, masks, garment(BLUE), garment(GREEN)))
    upper = general_mask(masks["upper"], "upper", model.model.service.cfg.mask)
    differs = np.any(a != c, axis=-1)
    assert differs[upper].mean() > 0.5, "the top given reaches the top region"
    assert c[upper][:, 2].astype(float).mean() > a[upper][:, 2].astype(float).mean(), "bluer with the blue top"


def test_full_with_upper_or_lower_is_a_422_naming_full(client, person):
    photo, masks = person
    for other in ("upper", "lower"):
        r = client.post("/v1/tryon", data={"steps": STEPS},
                        files={"person": file(photo), "full": file(garment(RED)), other: file(garment(BLUE))})
        assert r.status_code == 422 and r.json()["field"] == "full", r.text
        assert "worn alone" in r.json()["error"]


@pytest.mark.parametrize("files, data, field", [
    ({}, {}, "garment"),                                                      # nothing to wear
    ({"garment": "G"}, {}, "garment_type"),                                   # old API without its region
    ({"lower_mask": "M"}, {}, "lower"),                                       # a mask without its garment
    ({"garment": "G", "lower": "G"}, {"garment_type": "lower"}, "lower"),     # two garments for one region
    ({"upper": "G", "upper_garment_mask": "SMALL"}, {}, "upper_garment_mask"),  # not the garment photo's size
    ({"lower": "G"}, {"lower_worn": "true"}, "lower_worn"),                   # worn, no garment mask, no parser
    ({"upper": "G"}, {}, "upper_mask"),                                       # no mask, no parser
])
def test_outfit_fields_are_checked_and_named(client, person, files, data, field):
    photo, masks = person
    values = {"G": file(garment(RED)), "M": mask_png(masks["lower"]), "SMALL": mask_png(np.ones((20, 20), bool))}
    sent = {"person": file(photo), **{k: values[v] for k, v in files.items()}}
    if "upper" in files and "upper_mask" not in files and field != "upper_mask":
        sent["upper_mask"] = mask_png(masks["upper"])
    if "lower" in files and "lower_mask" not in files:
        sent["lower_mask"] = mask_png(masks["lower"])
    r = client.post("/v1/tryon", data={"steps": STEPS, **data}, files=sent)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_a_single_garment_request_is_the_outfit_of_one_pass(client, person):
    """The API before outfits: ``garment`` + ``garment_type`` gives the same picture as the outfit field."""
    photo, masks = person
    old = client.post("/v1/tryon", data={"garment_type": "lower", "steps": STEPS, "format": "png"},
                      files={"person": file(photo), "garment": file(garment(GREEN)), "mask": mask_png(masks["lower"])})
    new = client.post("/v1/tryon", data={"steps": STEPS, "format": "png"},
                      files={"person": file(photo), "lower": file(garment(GREEN)), "lower_mask": mask_png(masks["lower"])})
    assert old.headers["x-tryon-garment-type"] == "lower"
    assert np.array_equal(image_of(old), image_of(new))


def test_check_pieces_orders_the_passes_and_refuses_a_full_with_others():
    g = garment(RED)
    order = check_pieces([Piece("lower", g), Piece("upper", g)])
    assert [p.region for p in order] == ["upper", "lower"]
    with pytest.raises(InputError) as e:
        check_pieces([Piece("upper", g), Piece("full", g)])
    assert e.value.field == "full"
    with pytest.raises(InputError) as e:
        check_pieces([Piece("hat", g, fields={"region": "garment_type"})])
    assert e.value.field == "garment_type"


# --------------------------------------------------------------------------------------------
# A garment from a worn photo (issue 15, item 2)


def lower_pid_rows(size: int = 256) -> list[dict]:
    """The rows of the first synthetic lower-body item with at least two person views, as cells."""
    by_pid: dict[str, list[dict]] = {}
    for row in synthetic_rows(40, image_size=size, seed=0):
        if row["cloth_type"] in ("Pants", "Shorts", "Skirts", "Denim", "Leggings") and "flat" not in row["pose"]:
            by_pid.setdefault(row["pid"], []).append(row)
    pid, rows = next((p, r) for p, r in by_pid.items() if len(r) >= 2)
    return [{**r, "images": png_cell(np.asarray(r["images"])), "mask": png_cell(np.asarray(r["mask"]), "L"),
             "mask_overlay": None} for r in rows]


def training_pairs(rows: list[dict], cfg) -> dict[str, np.ndarray]:
    """The latent cache's pair builder on ``rows``: its pairs (the stats row dropped)."""
    validated = V.RowValidator(dataclasses.asdict(cfg.data), keep_images="valid")(as_batch(rows))
    out = St.PairBuilder(cfg.to_dict())(validated)
    keep = out["split"] != F.STATS_SPLIT
    return {k: v[keep] for k, v in out.items()}


def served_canvas(model, payload) -> tuple[np.ndarray, np.ndarray]:
    """The canvas and mask canvas the model deployment made of ``payload`` (its first pass)."""
    from catvton.data.canvas import to_uint8

    request = OutfitRequest(payload["person"], [Piece(**p) for p in payload["pieces"]], payload["seed"],
                            payload["steps"], payload["guidance"], payload["half_hw"])
    job = model.model.service.start(request).next_job()
    return to_uint8(job.canvas), job.mask_canvas


class OracleParser:
    """A parser that knows the dataset's masks: answers each photo it was told about with its mask."""

    def __init__(self, known: list[tuple[np.ndarray, np.ndarray]]):
        self.known = known

    def garment_mask(self, photo: np.ndarray, group: str) -> np.ndarray:
        for p, m in self.known:
            if p.shape == photo.shape and np.array_equal(p, photo):
                return m
        return np.zeros(photo.shape[:2], bool)

    def general(self, photo, group, mask_cfg):
        own = self.garment_mask(photo, group)
        return own, general_mask(own, group, mask_cfg)


@pytest.mark.parametrize("parsed", [False, True], ids=["garment_mask sent", "parser finds it"])
def test_a_worn_photo_garment_gives_the_training_pair_builders_canvas(model, client, parsed, monkeypatch):
    """The same two dataset rows make the same canvas through the API as through training's pair
    builder: the garment is cut out of the worn photo with its mask (sent, or found by the parser)."""
    rows = lower_pid_rows()
    cfg = model.model.service.cfg
    pairs = training_pairs(rows, cfg)
    assert len(pairs["pid"]) >= 1
    by_pose = {r["pose"]: r for r in rows}
    g_row, p_row = by_pose[pairs["garment_pose"][0]], by_pose[pairs["person_pose"][0]]
    files = {"person": ("p.png", p_row["images"]["bytes"], "image/png"),
             "lower": ("g.png", g_row["images"]["bytes"], "image/png"),
             "lower_mask": ("m.png", p_row["mask"]["bytes"], "image/png")}
    data = {"steps": STEPS, "format": "png"}
    if parsed:
        decode = lambda cell: np.asarray(Image.open(io.BytesIO(cell["bytes"])))  # noqa: E731
        monkeypatch.setattr(model.model.service, "masker",
                            OracleParser([(decode(g_row["images"]), decode(g_row["mask"]) >= 128)]))
        data["lower_worn"] = "true"
    else:
        files["lower_garment_mask"] = ("gm.png", g_row["mask"]["bytes"], "image/png")
    r = client.post("/v1/tryon", data=data, files=files)
    assert r.status_code == 200, r.text
    canvas, mask_canvas = served_canvas(model, model.payloads[-1])
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    trained = np.asarray(Image.open(io.BytesIO(pairs["canvas"][0])))
    assert np.array_equal(canvas, trained), "the garment half and the person half are training's"
    assert np.array_equal(mask_canvas, F.unpack_mask_bits(pairs["mask"][0], (H, 2 * W)).astype(np.float32))
    # a product shot of the same photo is not the same canvas: the cut-out matters
    product, _ = served_canvas(model, {**model.payloads[-1], "pieces": [
        {**model.payloads[-1]["pieces"][0], "garment_mask": None, "worn": False}]})
    assert not np.array_equal(product[:, :W], trained[:, :W])


def test_a_server_of_one_model_refuses_another_models_name_and_lists_its_own(client):
    """No LoRA here: the base serves, as model "base". Naming another model is a 404, never that
    model's name on this one's picture; naming its own, or none, is served."""
    listed = client.get("/v1/models").json()
    assert [m["id"] for m in listed["models"]] == ["base"] and listed["default"] == "base"
    photo, masks = two_piece_person()
    files = {"person": ("p.png", png(photo), "image/png"), "garment": ("g.png", png(garment((200, 40, 40))), "image/png"),
             "mask": ("m.png", png(masks["lower"].astype(np.uint8) * 255), "image/png")}
    data = {"garment_type": "lower", "steps": "1"}
    r = client.post("/v1/tryon", files=files, data=data, headers={"x-tryon-model": "m-other"})
    assert r.status_code == 404 and r.json()["field"] == "model" and "'base'" in r.json()["error"], r.text
    assert client.post("/v1/tryon", files=files, data={**data, "model": "base"}).status_code == 200
