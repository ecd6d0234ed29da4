"""The production mask rule through training, serving and the catalogue (issue 25, item 5).

``configs/l40s.yaml`` trains and serves bottoms and dresses with ``box_to_bottom`` masks (the
garment's box, widened, down to the photo's last row), while every other test of the default tier
runs ``configs/tiny.yaml``'s hull rule. Here the tiny preset's model and data run with the mask
section of ``configs/l40s.yaml`` grafted on (every field as that file loads, so the box margin and
minimum width are production's too; nothing is copied by hand), and three places are checked:

- training: the latent cache's stages (called in this process) make the training pairs, and two
  optimizer steps of the training step run on them; every training mask of a box group, and every
  mask a step fed to ``fill_loss``, is the production box;
- serving: the LoRA those steps trained, its ``training_config.json`` beside it as the job exports
  it, behind the HTTP API (``serve.app``'s model deployment in this process): the served mask is
  the production box, taken from the LoRA's own config;
- the catalogue job's Ray Data stage (:class:`CatalogueDresser`, called directly) with that LoRA.

The expected box is written out here from the rule's documentation (:func:`production_box`), not
taken from :mod:`catvton.data.masks`. For serving and the catalogue the output must equal the
person photo outside the box exactly: the photo is small enough not to be reduced for the model
(:func:`catvton.infer.request.work_scale` is 1), so the try-on is pasted at the photo's own size
under the mask alone and sent as a lossless PNG; no tolerance is needed, and any other pixel
changed is a defect. Inside the box, pixels that the tiny preset's hull does not cover must have
changed: only the production rule repaints there.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catvton.config import MaskConfig, load_config
from catvton.data.canvas import fit_to_half
from catvton.data.masks import general_mask
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "configs" / "l40s.yaml"
TINY = ROOT / "configs" / "tiny.yaml"
BOX_RULES = ("box", "box_to_bottom")
SMALL = ["data.synthetic_pids=40", "data.val_fraction=0.2", "data.test_fraction=0.2",
         "model.transformer_override=null", "train.batch_size=4", "train.warmup_steps=2"]
"""test_train.py's small job: 40 synthetic pids, the tiny base alone (no alpha to build)."""
STEPS = 2
GARMENT = np.full((60, 40, 3), (200, 40, 40), np.uint8)  # a product shot: all of it is the garment


def production_rule() -> MaskConfig:
    """The mask section as ``configs/l40s.yaml`` loads: the fields it sets, the others at the
    defaults it trains with."""
    return load_config(PRODUCTION).mask


def graft(mask: MaskConfig) -> list[str]:
    """Dotted overrides that set every field of the mask section to ``mask``'s."""
    return [f"mask.{k}={v}" for k, v in dataclasses.asdict(mask).items()]


def box_groups(rule: MaskConfig) -> list[str]:
    from catvton.schema import GROUPS

    return [g for g in GROUPS if getattr(rule, f"{g}_rule") in BOX_RULES]


def production_box(garment: np.ndarray, group: str, rule: MaskConfig) -> np.ndarray:
    """The box rule of ``group`` written out from its documentation (MaskConfig's fields,
    docs/architecture.md), independently of :func:`catvton.data.masks.box`: the garment's bounding
    box grown by the dilation radius (a disk reaches exactly that far along the axes), at least
    ``box_min_width`` of the photo wide about its middle, ``box_margin`` more each side, clipped to
    the photo, down to its last row for ``box_to_bottom``. ``garment``: (h, w) bool."""
    h, w = garment.shape
    ys, xs = np.nonzero(garment)
    r = round(rule.dilation * h)
    top, bottom = max(0, ys.min() - r), min(h, ys.max() + 1 + r)
    left, right = max(0, xs.min() - r), min(w, xs.max() + 1 + r)
    short = max(0, round(rule.box_min_width * w) - (right - left))
    left, right = left - short // 2, right + short - short // 2
    margin = round(rule.box_margin * w)
    out = np.zeros((h, w), bool)
    out[top:h if getattr(rule, f"{group}_rule") == "box_to_bottom" else bottom,
        max(0, left - margin):min(w, right + margin)] = True
    return out


@functools.cache
def tiny_rule() -> MaskConfig:
    return load_config(TINY).mask


def tiny_hull(garment: np.ndarray, group: str) -> np.ndarray:
    """What ``configs/tiny.yaml`` makes of the same garment (its hull rule): the contrast."""
    return general_mask(garment, group, tiny_rule())


def decoded_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def rule() -> MaskConfig:
    rule = production_rule()
    assert box_groups(rule), f"{PRODUCTION} has no box rule: this file tests nothing ({rule})"
    return rule


@pytest.fixture(scope="module")
def job_cfg(rule):
    """The tiny job with the production mask section (resolved: synthetic set and tiny base built)."""
    return tiny_config(*SMALL, *graft(rule))


@pytest.fixture(scope="module")
def source_masks(job_cfg) -> dict[tuple[str, str], np.ndarray]:
    """The data set's own garment mask of every row, by (pid, pose)."""
    from catvton.data.source import iter_rows, resolve_source
    from catvton.data.validate import decode, to_mask

    return {(r["pid"], r["pose"]): to_mask(decode(r["mask"]))
            for r in iter_rows(resolve_source(job_cfg.data), columns=["pid", "pose", "mask"])}


def training_pairs(cfg) -> tuple[dict[str, np.ndarray], dict]:
    """The training split's pairs of the synthetic set, as the latent cache holds them: the cache
    pipeline's own stages called in this process (:class:`RowValidator`, :class:`PairBuilder` per
    pid, :class:`LatentEncoder`), which ``build_latent_cache`` wires with Ray Data. The wiring has
    its tests (test_preprocess, test_train); here it would cost most of this file's time (Ray
    Data's workers each import torch), and the mask is made inside :class:`PairBuilder` from the
    config the stage is given. Returns the encoder's columns and the shapes ``decode_batch`` reads."""
    from catvton.cache.stages import LatentEncoder, PairBuilder
    from catvton.data.source import iter_rows, resolve_source
    from catvton.data.validate import RowValidator
    from conftest import as_batch

    by_pid: dict[str, list[dict]] = {}
    for row in iter_rows(resolve_source(cfg.data)):
        by_pid.setdefault(row["pid"], []).append(row)
    validate, build = RowValidator(dataclasses.asdict(cfg.data), keep_images="valid"), PairBuilder(cfg.to_dict(), False)
    pairs = [build(validate(as_batch(rows))) for rows in by_pid.values()]
    pairs = {k: np.concatenate([p[k] for p in pairs]) for k in pairs[0]}
    train = pairs["split"] == "train"
    encoder = LatentEncoder(cfg.to_dict())
    encoded = encoder({k: v[train] for k, v in pairs.items()})
    factor = 2 ** (len(encoder.vae.config.block_out_channels) - 1)
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    return encoded, {"latent_shape": [encoder.vae.config.latent_channels, H // factor, 2 * W // factor],
                     "mask_shape": [H, 2 * W]}


@pytest.fixture(scope="module")
def trained(job_cfg, tmp_path_factory):
    """``STEPS`` optimizer steps of the training step (:func:`train_step` with :func:`fill_loss`,
    what the Ray loop and the plain loop run) on the training pairs, drawn as the plain loop draws
    them, with every micro-batch ``fill_loss`` saw recorded; then the LoRA exported as the job
    exports it. Returns the pairs, what the steps saw, and the LoRA folder."""
    import torch

    from catvton.artifacts import TRAINING_CONFIG
    from catvton.cache.read import decode_batch
    from catvton.cache.stages import encode_prompt
    from catvton.train.checkpoint import save_weights
    from catvton.train.engine import (TextContext, build_transformer, fill_loss, make_optimizer, train_step,
                                      trainable_parameters)

    torch.set_num_threads(1)  # as the plain loop on a shared CPU
    cfg, cpu = job_cfg, torch.device("cpu")
    pairs, manifest = training_pairs(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_transformer(cfg, cpu, torch.float32)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(cfg, params, STEPS)
    text = TextContext(encode_prompt(cfg), tuple(manifest["latent_shape"][1:]), cpu, torch.float32)
    loss = functools.partial(fill_loss, text=text, cfg=cfg, generator=torch.Generator().manual_seed(cfg.train.seed),
                             garment_dropout=cfg.train.garment_dropout)
    seen: list[tuple[str, str, np.ndarray]] = []

    def recording(model, batch):
        seen.extend(zip(batch["pid"], batch["group"], batch["mask"][:, 0].numpy() > 0.5))
        return loss(model, batch)

    order = np.random.default_rng(cfg.train.seed).permutation(len(pairs["pid"]))  # the plain loop's first epoch
    b = cfg.train.batch_size
    for step in range(STEPS):
        idx = order[step * b:(step + 1) * b]
        batch = decode_batch({k: v[idx] for k, v in pairs.items()}, manifest)
        result = train_step(model, [batch], recording, optimizer, scheduler, params, cfg.train.max_grad_norm)
        assert np.isfinite(result.loss), result
    lora = tmp_path_factory.mktemp("production-mask-lora")
    save_weights(model, lora, cfg)
    # what catvton.train.job.export_weights puts beside the weights: the run's config
    (lora / TRAINING_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return pairs, manifest, seen, lora


@pytest.fixture(scope="module")
def person(rule, source_masks, job_cfg):
    """A person from the data set wearing a garment of the first box group, its mask and the group."""
    from catvton.data.pairs import PERSON_VIEWS
    from catvton.data.source import iter_rows, resolve_source
    from catvton.data.validate import decode, to_rgb
    from catvton.schema import cloth_group, parse_pose

    group = box_groups(rule)[0]
    for r in iter_rows(resolve_source(job_cfg.data), columns=["pid", "pose", "cloth_type", "images"]):
        if cloth_group(r["cloth_type"]) == group and parse_pose(r["pose"]).view in PERSON_VIEWS:
            return to_rgb(decode(r["images"])), source_masks[r["pid"], r["pose"]], group
    raise AssertionError(f"the synthetic set has no {group} garment")


def on_canvas(person_mask: np.ndarray, cfg) -> np.ndarray:
    """A (h, w) bool mask on the person photo as the (H, 2W) training mask canvas: zeros over the
    garment half, the mask placed on the person half as the photo is (the placement, fit_to_half,
    has its own tests; the rule is what is checked here)."""
    half = (cfg.canvas.half_height, cfg.canvas.half_width)
    placed = fit_to_half(person_mask.astype(np.uint8), half, cfg.canvas.person_fit, nearest=True, fill=0) > 0
    return np.concatenate([np.zeros(half, bool), placed], axis=1)


def test_training_steps_see_the_production_boxes(rule, job_cfg, source_masks, trained):
    """Every training pair of a box group carries the production box of its person view's garment
    mask, placed on the canvas; the steps trained on such pairs, each fed its own box."""
    from catvton.cache.format import unpack_mask_bits

    pairs, manifest, seen, _ = trained
    expected: dict[tuple[str, str], list[np.ndarray]] = {}
    checked = 0
    for pid, group, pose, packed in zip(pairs["pid"], pairs["group"], pairs["person_pose"], pairs["mask"]):
        if group not in box_groups(rule):
            continue
        garment = source_masks[pid, pose]
        want = on_canvas(production_box(garment, group, rule), job_cfg)
        expected.setdefault((pid, group), []).append(want)
        got = unpack_mask_bits(packed, tuple(manifest["mask_shape"])) > 0.5
        assert np.array_equal(got, want), (
            f"training mask of {pid} {pose} ({group}) is not the production box: "
            f"{int((got != want).sum())} of {got.size} pixels differ")
        # the check tells the rules apart: the tiny preset's hull of this garment is another mask
        assert not np.array_equal(want, on_canvas(tiny_hull(garment, group), job_cfg)), (pid, pose)
        checked += 1
    assert checked >= 10, f"only {checked} training pairs of {box_groups(rule)}"
    fed = [(pid, group, mask) for pid, group, mask in seen if group in box_groups(rule)]
    assert len(seen) == STEPS * job_cfg.train.batch_size and fed, [(p, g) for p, g, _ in seen]
    for pid, group, mask in fed:
        assert any(np.array_equal(mask, want) for want in expected[pid, group]), (
            f"a training step fed {pid} ({group}) a mask that is no production box of its person views")


def assert_pasted_inside_the_box_only(image: np.ndarray, photo: np.ndarray, box: np.ndarray, hull: np.ndarray,
                                      what: str) -> None:
    """``image`` is ``photo`` outside ``box`` pixel for pixel, and changed where the box goes past
    the tiny preset's ``hull`` (the legs and floor only the production rule repaints)."""
    assert image.shape == photo.shape, what
    outside = ~box
    assert np.array_equal(image[outside], photo[outside]), (
        f"{what}: {int((image[outside] != photo[outside]).any(-1).sum())} pixels outside the production box changed")
    beyond_hull = box & ~hull
    assert beyond_hull.any(), f"{what}: the box adds nothing to the hull here, the check cannot tell them apart"
    assert (image[beyond_hull] != photo[beyond_hull]).any(), (
        f"{what}: nothing changed between the tiny hull and the production box: the box was not repainted")


def test_a_served_tryon_uses_the_box_the_lora_was_trained_with(rule, trained, person):
    """POST /v1/tryon with the LoRA trained above: the model replica pastes inside the production
    box of the request's mask, and the answer is the upload outside it."""
    from fastapi.testclient import TestClient
    from serve_helpers import InProcessModel, png

    from catvton.infer.serving import ServeConfig
    from serve.app import create_api

    class Recording(InProcessModel):
        """The model deployment, keeping what it answered the ingress."""

        def __init__(self, settings: dict):
            super().__init__(settings)
            self.replies: list[dict] = []

        async def tryon(self, payload: dict) -> dict:
            reply = await super().tryon(payload)
            self.replies.append(reply)
            return reply

    *_, lora = trained
    photo, garment_mask, group = person
    # the LoRA folder alone: its training_config.json decides the mask rule, as in production
    model = Recording({"lora": [str(lora)], "torch_threads": 1})
    client = TestClient(create_api(ServeConfig(), model))
    resp = client.post("/v1/tryon", data={"garment_type": group, "steps": "2", "format": "png"},
                       files={"person": ("p.png", png(photo), "image/png"), "garment": ("g.png", png(GARMENT)),
                              "mask": ("m.png", png(garment_mask.astype(np.uint8) * 255), "image/png")})
    assert resp.status_code == 200, resp.text
    box = production_box(garment_mask, group, rule)
    (served,) = model.replies[-1]["passes"]
    assert served["general"].shape == box.shape, "the photo was reduced: compare at its size"
    assert np.array_equal(served["general"], box), (
        f"served mask is not the production box: {int((served['general'] != box).sum())} pixels differ")
    assert_pasted_inside_the_box_only(decoded_png(resp.content), photo, box, tiny_hull(garment_mask, group), "served")
    rules = client.get("/v1/info").json()["mask_rules"]
    assert rules == {g: getattr(rule, f"{g}_rule") for g in rules}, rules


def test_a_catalogue_item_uses_the_box_the_lora_was_trained_with(rule, trained, tmp_path):
    """The catalogue job's stage dresses a person with the LoRA trained above inside the production
    box of the person's mask file, and its PNG is the person photo outside it."""
    from catvton.infer.catalogue import read_mask_file, read_photo_file, scan_catalogue
    from catvton.infer.catalogue_run import CatalogueDresser
    from catvton.infer.serving import ServeConfig, model_config, pick_lora
    from catvton.offline import resolve
    from catvton.offline.demo_catalogue import write_demo_catalogue

    *_, lora = trained
    group = box_groups(rule)[0]
    folders = write_demo_catalogue(tmp_path, people=1, garments={group: 1}, size=128)
    (item,) = scan_catalogue(folders["people"], folders["garments"]).items
    # as ray_jobs/tryon_batch.py picks the model config: the LoRA's own, over the --config default
    settings = ServeConfig(lora=[str(lora)])
    cfg = resolve(model_config(settings, pick_lora(settings)), log=lambda _: None)
    dresser = CatalogueDresser(cfg.to_dict(), lora=str(lora), steps=2)
    out = dresser({"item": np.array([json.dumps(item.to_dict())], dtype=object)})
    assert out["error"][0] == "", out["error"][0]
    (piece,) = item.pieces
    garment_mask = read_mask_file(piece.person_mask)
    box = production_box(garment_mask, group, rule)
    used = dresser.service.start(dresser.request(item)).next_job().general  # prepared again: no model call
    assert np.array_equal(used, box), f"catalogue mask is not the production box: {int((used != box).sum())} differ"
    assert_pasted_inside_the_box_only(decoded_png(bytes(out["png"][0])), read_photo_file(item.person), box,
                                      tiny_hull(garment_mask, group), f"catalogue item {item.id}")
    assert cfg.mask == rule, cfg.mask
