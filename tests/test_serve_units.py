"""Serving without Ray: request decoding and limits, the canvas and its way back, settings, auth,
the model replica's batcher.

The HTTP behaviour against a running Serve instance is in test_serve_api.py; these pin the library
pieces it is made of, quickly.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import png, png_header_only

from catvton.config import ConfigError, load_config
from catvton.data.canvas import build_sample, fit_box, to_uint8
from catvton.data.masks import general_mask
from catvton.infer.batching import Batcher
from catvton.infer.request import (ImageLimits, InputError, parse_size, read_mask, read_photo, request_sample,
                                   to_person_size)
from catvton.infer.serving import ServeConfig, TryOnService, pick_lora, refuse_pickles, serve_config_from_dict

ROOT = Path(__file__).resolve().parents[1]

LIMITS = ImageLimits(min_side=16, max_side=4096, max_pixels=4_000_000)
HALF = (128, 96)  # the tiny canvas's half: photos up to twice its size are not reduced


def photo(h=120, w=90, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("data,status,words", [
    (b"", 422, "empty"),
    (b"definitely not an image", 422, "not a readable image"),
    (png(photo())[:200], 422, "truncated"),
    (png_header_only(0, 0), 422, "readable"),
    (png(photo(8, 8)), 422, "at least 16"),
    (png_header_only(5000, 5000), 413, "pixels in all"),
    (png_header_only(100_000, 100_000), 413, "enormous"),
])
def test_read_photo_refuses_bad_uploads_naming_the_field(data, status, words):
    with pytest.raises(InputError) as e:
        read_photo(data, "person", LIMITS, HALF, "crop")
    assert e.value.field == "person" and e.value.status == status
    assert words in e.value.message


def test_read_photo_composites_transparency_over_white():
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent
    out = read_photo(png(rgba), "garment", LIMITS, HALF, "pad")
    assert out.work.shape == (20, 20, 3) and (out.work == 255).all() and out.full.size == (20, 20)


def test_read_mask_checks_size_and_emptiness():
    person = read_photo(png(photo(120, 90)), "person", LIMITS, HALF, "crop")
    m = np.zeros((120, 90), np.uint8)
    with pytest.raises(InputError, match="empty") as e:
        read_mask(png(m), "mask", LIMITS, person)
    assert e.value.field == "mask"
    m[50:100, 20:70] = 255
    with pytest.raises(InputError, match="person photo's size"):
        read_mask(png(m), "mask", LIMITS, read_photo(png(photo(100, 90)), "person", LIMITS, HALF, "crop"))
    got = read_mask(png(m), "mask", LIMITS, person)
    assert got.dtype == bool and got.sum() == 50 * 50


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "0/1"])
def test_read_mask_reads_every_mode_like_the_dataset_masks(mode):
    """One rule for masks: the request's (in PIL, no full-size array) is the dataset's to_mask."""
    from catvton.data.validate import to_mask

    rng = np.random.default_rng(5)
    values = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    if mode == "0/1":
        img = Image.fromarray((values > 128).astype(np.uint8))
    elif mode in ("L", "1", "P"):
        img = Image.fromarray(values).convert(mode)
    else:
        img = Image.fromarray(np.stack([values, values // 2, 255 - values] + ([values] if mode == "RGBA" else []), -1))
    data = png(np.asarray(img)) if mode != "P" else _png_image(img)
    person = read_photo(png(photo(40, 30)), "person", LIMITS, HALF, "crop")
    assert np.array_equal(read_mask(data, "mask", LIMITS, person), to_mask(Image.open(io.BytesIO(data))))


def _png_image(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size,expect", [(None, None), ("", None), ("96x128", (128, 96)), ("768x1024", (1024, 768))])
def test_parse_size(size, expect):
    assert parse_size(size, 1024 * 1024) == expect


@pytest.mark.parametrize("size,status", [("abc", 422), ("100x100", 422), ("16x16", 422), ("2048x2048", 413)])
def test_parse_size_refuses(size, status):
    with pytest.raises(InputError) as e:
        parse_size(size, 1024 * 1024)
    assert e.value.field == "size" and e.value.status == status


def test_request_canvas_is_the_training_canvas_and_comes_back_at_the_person_size():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    person, garment = photo(300, 200, 1), photo(80, 60, 2)
    mask = np.zeros((300, 200), bool)
    mask[150:280, 60:140] = True
    half = (cfg.canvas.half_height, cfg.canvas.half_width)
    s = request_sample(person, garment, mask, "lower", cfg, half)
    ref = build_sample(garment, np.ones((80, 60), bool), person, mask, "lower", cfg.canvas, cfg.mask)
    assert np.array_equal(s.canvas, ref.canvas) and np.array_equal(s.mask_canvas, ref.mask_canvas)

    generated = np.full_like(s.canvas, 0.25)  # what a model might paint
    out = to_person_size(generated, person, mask, "lower", cfg)
    assert out.shape == person.shape and out.dtype == np.uint8
    general = general_mask(mask, "lower", cfg.mask)
    assert np.array_equal(out[~general], person[~general]), "outside the general mask: the upload, untouched"
    # the photo's window that the canvas showed (all of it with person_fit pad; cropped rows with crop)
    top, left, win_h, win_w = fit_box(person.shape[:2], half, cfg.canvas.person_fit)
    shown = np.zeros(person.shape[:2], bool)
    shown[max(0, top):top + win_h, max(0, left):left + win_w] = True
    assert (general & shown).any()
    assert np.abs(out[general & shown].astype(int) - 64).max() <= 1, "inside: the generated pixels, scaled back"
    assert np.array_equal(out[general & ~shown], person[general & ~shown]), "never generated: the upload"


def test_to_person_size_is_exact_when_the_photo_has_the_half_size():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    person = photo(H, W, 3)
    mask = np.zeros((H, W), bool)
    mask[60:120, 30:70] = True
    result = np.random.default_rng(4).random((H, 2 * W, 3), dtype=np.float32)
    general = general_mask(mask, "lower", cfg.mask)
    out = to_person_size(result, person, mask, "lower", cfg)
    assert np.array_equal(out[general], to_uint8(result[:, W:])[general])
    assert np.array_equal(out[~general], person[~general])


def test_serve_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        serve_config_from_dict({"max_steps": 0, "device": "tpu", "lora": ["/nope/a", "/nope/b"], "colour": 1})
    text = str(e.value)
    assert "colour" in text  # unknown keys stop before the semantic checks
    with pytest.raises(ConfigError) as e:
        serve_config_from_dict({"max_steps": 0, "device": "tpu", "lora": ["/nope/a", "/nope/b"]})
    assert len(e.value.problems) == 3 and "lora" in str(e.value) and "device" in str(e.value)
    assert serve_config_from_dict({"lora": ""}).lora == []


def test_api_key_from_the_environment_wins(monkeypatch):
    s = ServeConfig(api_key="from-config")
    assert s.resolved_api_key() == "from-config"
    monkeypatch.setenv("TRYON_API_KEY", "from-env")
    assert s.resolved_api_key() == "from-env"


def _service_without_model(**settings) -> TryOnService:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    return TryOnService(ServeConfig(**settings), cfg, tryon=None, lora=None, masker=None)


def test_no_mask_and_no_parser_says_what_to_send():
    svc = _service_without_model()
    with pytest.raises(InputError) as e:
        svc.prepare(photo(), photo(), None, "lower", None, None, None, None)
    assert e.value.field == "mask" and "send a mask" in e.value.message


def test_prepare_checks_group_and_steps():
    svc = _service_without_model(max_steps=10)
    mask = np.zeros((120, 90), bool)
    mask[60:110, 20:70] = True
    with pytest.raises(InputError) as e:
        svc.prepare(photo(), photo(), mask, "hat", None, None, None, None)
    assert e.value.field == "garment_type"
    with pytest.raises(InputError) as e:
        svc.prepare(photo(), photo(), mask, "lower", None, 11, None, None)
    assert e.value.field == "steps"
    job = svc.prepare(photo(), photo(), mask, "lower", 7, None, None, None)
    assert (job.seed, job.steps, job.mask_source) == (7, svc.cfg.infer.steps, "request")


def test_auth_and_body_limit_without_ray():
    """The ingress app with a stand-in backend: key checks and body limit happen before any model."""
    from fastapi.testclient import TestClient

    from serve.app import create_api

    class Backend:
        """Answers a grey person half over the request's mask, as a model replica's reply would."""

        async def tryon(self, payload):
            (piece,) = payload["pieces"]
            return {"passes": [{"region": piece["region"], "half": np.full((128, 96, 3), 128, np.uint8),
                                "general": piece["mask"], "mask_source": "request"}], "fit": "crop",
                    "seed": 0, "steps": 1, "guidance": 1.0, "mask_source": "request", "regions": [piece["region"]],
                    "prepare_s": 0.0, "model_s": 0.0}

        async def info(self):
            return {"base": "stand-in", "canvas": {"half_width": 96, "half_height": 128, "person_fit": "crop"}}

    client = TestClient(create_api(ServeConfig(api_key="s3cret", max_body_mb=0.5), Backend()))
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200  # the page's static HTML
    r = client.get("/v1/info")
    assert r.status_code == 401 and r.json()["field"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).json()["base"] == "stand-in"
    big = client.post("/v1/tryon", headers={"Authorization": "Bearer s3cret"},
                      files={"person": ("p.png", b"x" * 600_000, "image/png")})
    assert big.status_code == 413 and big.json()["field"] == "body"
    m = np.zeros((120, 90), np.uint8)
    m[60:110, 20:70] = 255
    ok = client.post("/v1/tryon", headers={"Authorization": "Bearer s3cret"},
                     files={"person": ("p.png", png(photo()), "image/png"), "garment": ("g.png", png(photo()), "image/png"),
                            "mask": ("m.png", png(m), "image/png")}, data={"garment_type": "lower"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"  # a PNG upload's default
    assert Image.open(io.BytesIO(ok.content)).size == (90, 120)
    assert {s.split(";")[0] for s in ok.headers["server-timing"].split(", ")} >= {"decode", "model", "paste", "encode"}


def test_only_safetensors_are_loaded(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="only safetensors"):
        pick_lora(ServeConfig(lora=[str(tmp_path / "missing"), str(lora)]))
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert pick_lora(ServeConfig(lora=[str(tmp_path / "missing"), str(lora)])) == lora
    base = tmp_path / "base"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="pickled weights"):
        refuse_pickles(base, "model")


# ---------------------------------------------------------------------------------------------
# The batcher: lone requests never wait; requests that arrive during a batch go together


def test_batcher_runs_a_lone_request_at_once_and_groups_those_that_wait():
    calls: list[list[int]] = []

    async def run(items):
        calls.append(list(items))
        await asyncio.sleep(0.05)  # the model, busy
        return [i * 10 for i in items]

    async def scenario():
        batcher = Batcher(run, max_size=3)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0)  # the worker takes it alone
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        return await asyncio.gather(first, *rest), batcher.sizes

    results, sizes = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40, 50]
    assert calls == [[0], [1, 2, 3], [4, 5]], "arrival order, at most max_size, no waiting alone"
    assert sizes == [1, 3, 2]


def test_batcher_gives_each_request_of_a_failed_batch_the_error_and_keeps_serving():
    async def run(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    async def scenario():
        batcher = Batcher(run, max_size=4)
        failed = await asyncio.gather(batcher.submit("bad"), return_exceptions=True)
        return failed, await batcher.submit("good")

    failed, good = asyncio.run(scenario())
    assert isinstance(failed[0], ValueError) and good == "good"


def test_the_published_schema_describes_a_form_a_client_can_send():
    """Issue 28, item 6: FastAPI described each optional form field as ``<type> or null``, and a
    client generated from the schema (schemathesis ``--checks all``) sent the text ``null`` for a
    file, which the server rightly refuses (422 "Expected UploadFile"). Published now: one type per
    field, a file as ``format: binary``, optional fields left out of ``required``."""
    import json

    from fastapi.testclient import TestClient

    from serve.app import create_api
    from serve.openapi import form_field_schema

    spec = TestClient(create_api(ServeConfig(), object())).get("/openapi.json").json()
    ref = spec["paths"]["/v1/tryon"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert '"null"' not in json.dumps(body), [k for k, v in body["properties"].items() if '"null"' in json.dumps(v)]
    files = sorted(k for k, v in body["properties"].items() if v.get("format") == "binary")
    assert files == sorted(["person", "garment", "mask", "garment_mask", *(
        f"{r}{s}" for r in ("upper", "lower", "full") for s in ("", "_mask", "_garment_mask"))])
    assert all(body["properties"][k]["type"] == "string" for k in files)
    assert body["required"] == ["person"]
    assert body["properties"]["garment_type"]["enum"] == ["upper", "lower", "full"]
    assert body["properties"]["steps"] == {"type": "integer", "maximum": 1000, "minimum": 1, "title": "Steps",
                                           "description": "Denoising steps (default from the model config)"}
    # the rule on FastAPI's own shapes: a null alternative dropped, a non-optional field kept as it is
    optional = {"anyOf": [{"type": "string", "contentMediaType": "application/octet-stream"}, {"type": "null"}],
                "title": "Mask"}
    assert form_field_schema(optional) == {"type": "string", "contentMediaType": "application/octet-stream",
                                           "format": "binary", "title": "Mask"}
    union = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert form_field_schema(union) == union


def test_the_grafana_dashboard_plots_every_metric_the_service_exports_and_no_other():
    """serve/grafana_dashboard.json's queries name exactly serve/metrics.py's metrics (as Ray
    exports them: ``ray_`` prefix, ``_total`` / ``_bucket`` / ``_sum`` / ``_count`` samples)."""
    import json
    import re

    from serve import metrics

    dashboard = json.loads((ROOT / "serve" / "grafana_dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", name.removeprefix("ray_"))
            for q in queries for name in re.findall(r"ray_tryon_\w+", q)}
    assert used == {m._name for m in metrics._metrics().values()}
    assert len(dashboard["panels"]) == len({p["id"] for p in dashboard["panels"]}) >= 6
