"""The latent cache: PairBuilder / LatentEncoder called directly, then the Ray Data pipeline.

The stages are tested without Ray first (principle 5); the pipeline then builds two small caches
into a temporary root (the tiny base and the synthetic rows stay in the default cache, where
they are built once): the synthetic set at the tiny canvas, and a hub-layout folder with a
planted bad row at a smaller canvas.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from catvton import artifacts
from catvton.cache import build as E
from catvton.cache import format as F
from catvton.cache import read as R
from catvton.cache import stages as St
from catvton.data import validate as V
from conftest import SMALL_DATA, as_batch, make_row, person_and_mask, png_cell, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = SMALL_DATA  # conftest's: the session's small cache is built from it


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(*SMALL)


def one_pid_rows(pid: str = "id_00000007", cloth_type: str = "Pants", size: int = 96) -> list[dict]:
    poses = ["01_1_front", "01_2_side", "01_3_back", "01_4_full"]
    return [make_row(pid=pid, pose=p, cloth_type=cloth_type, size=size, seed=i) for i, p in enumerate(poses)]


def validated(rows: list[dict], cfg) -> dict[str, np.ndarray]:
    import dataclasses

    return V.RowValidator(dataclasses.asdict(cfg.data), keep_images="valid")(as_batch(rows))


@pytest.fixture(scope="module")
def encoder(cfg):
    return St.LatentEncoder(cfg.to_dict())  # loads the tiny VAE once for the module


@pytest.fixture(scope="module")
def one_pid(cfg):
    """PairBuilder output (3 pairs + the stats row) for one Pants item in 4 views."""
    return St.PairBuilder(cfg.to_dict())(validated(one_pid_rows(), cfg))


def pairs_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch["split"] != F.STATS_SPLIT
    return {k: v[keep] for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# The stages, without Ray


def test_pair_builder_makes_canvases_and_counts_bad_rows(cfg):
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    rows = one_pid_rows() + [make_row(pid="id_00000007", pose="01_7_additional", mask=None)]
    out = St.PairBuilder(cfg.to_dict())(validated(rows, cfg))
    pairs = pairs_only(out)
    assert len(pairs["pid"]) == 3  # garment from the front view, persons side / back / full
    assert set(pairs["garment_pose"]) == {"01_1_front"}
    assert sorted(pairs["person_pose"]) == ["01_2_side", "01_3_back", "01_4_full"]
    assert set(pairs["group"]) == {"lower"} and set(pairs["cloth_type"]) == {"Pants"}
    for png, bits in zip(pairs["canvas"], pairs["mask"]):
        canvas = np.asarray(Image.open(io.BytesIO(png)))
        assert canvas.shape == (H, 2 * W, 3) and canvas.dtype == np.uint8
        mask = F.unpack_mask_bits(bits, (H, 2 * W))
        assert not mask[:, :W].any(), "the garment half must never be inpainted"
        assert mask[:, W:].mean() > 0.05
    (stats,) = out["stats"][out["split"] == F.STATS_SPLIT]
    s = json.loads(stats)
    assert s["bad_rows"] == {V.MISSING_MASK: 1} and s["rows"] == 5 and s["valid"] == 4 and s["pairs"] == 3


def test_pair_builder_with_no_pair_gives_empty_columns(cfg):
    batch = validated([make_row(pid="id_00000008", pose="01_1_front")], cfg)
    out = St.PairBuilder(cfg.to_dict(), with_stats=False)(batch)
    assert all(len(v) == 0 for v in out.values())
    assert {"pid", "split", "group", "canvas", "mask"} <= set(out)
    with_stats = St.PairBuilder(cfg.to_dict())(batch)
    assert list(with_stats["split"]) == [F.STATS_SPLIT]
    assert json.loads(with_stats["stats"][0])["pairing_skipped"] == {"single_view": 1}


def test_latent_encoder_shapes_and_pass_through(cfg, encoder, one_pid):
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    built = one_pid
    out = encoder(built)
    n = len(built["pid"])
    assert len(out["pid"]) == n and list(out["split"]) == list(built["split"])
    latent_bytes = 16 * (H // 8) * (2 * W // 8) * 2  # float16
    assert list(out["mask"]) == list(built["mask"]) and list(out["person_pose"]) == list(built["person_pose"])
    for split, t, m, c in zip(out["split"], out["target"], out["masked"], out["canvas"]):
        if split == F.STATS_SPLIT:
            assert t == b"" and m == b""
            continue
        assert len(t) == len(m) == latent_bytes
        assert (len(c) > 0) == (split in F.KEEP_CANVAS_SPLITS)  # pixels only where evaluation needs them
    z = np.frombuffer(pairs_only(out)["target"][0], np.float16).reshape(16, H // 8, 2 * W // 8)
    assert np.isfinite(z).all() and 0.1 < z.astype(np.float32).std() < 10  # normalised latents


def test_masked_canvas_is_the_canvas_builders(cfg):
    """Recomputed from the stored uint8 canvas + mask: exactly build_sample's masked canvas."""
    from catvton.data.canvas import build_sample, to_uint8

    photo, mask = person_and_mask(96, seed=1)
    s = build_sample(photo, mask > 0, photo[:, ::-1].copy(), mask[:, ::-1] > 0, "lower", cfg.canvas, cfg.mask)
    got = St.masked_canvas(to_uint8(s.canvas)[None], s.mask_canvas[None])[0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, s.masked_canvas * 2 - 1, atol=1e-5)
    assert np.all(got[s.mask_canvas > 0] == 0)  # mid-grey: 0 after the pipeline's [-1, 1] scaling


def test_latents_match_the_fill_pipeline_preprocessing(cfg, encoder, one_pid):
    """Our target / masked latents = what FluxFillPipeline feeds its transformer (argmax mode)."""
    from diffusers.image_processor import VaeImageProcessor

    enc = encoder
    built = pairs_only(one_pid)
    ours = pairs_only(enc(built))
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    canvas = Image.open(io.BytesIO(built["canvas"][0])).convert("RGB")
    mask = Image.fromarray(F.unpack_mask_bits(built["mask"][0], (H, 2 * W)).astype(np.uint8) * 255)
    image_proc = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16)
    mask_proc = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16, do_normalize=False,
                                  do_binarize=True, do_convert_grayscale=True)
    init = image_proc.preprocess(canvas, height=H, width=2 * W)
    m = mask_proc.preprocess(mask, height=H, width=2 * W)
    with torch.no_grad():
        for x, key in ((init, "target"), (init * (1 - m), "masked")):
            z = enc.vae.encode(x).latent_dist.mode()
            z = (z - enc.vae.config.shift_factor) * enc.vae.config.scaling_factor
            got = np.frombuffer(ours[key][0], np.float16).reshape(z.shape[1:]).astype(np.float32)
            np.testing.assert_allclose(got, z[0].numpy(), atol=2e-2, rtol=1e-2)


def test_decode_batch_shapes(cfg, encoder, one_pid):
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    out = pairs_only(encoder(one_pid))
    manifest = {"latent_shape": [16, H // 8, 2 * W // 8], "mask_shape": [H, 2 * W]}
    b = R.decode_batch(out, manifest)
    assert b["target"].shape == b["masked"].shape == (3, 16, H // 8, 2 * W // 8)
    assert b["target"].dtype == torch.float32
    assert b["mask"].shape == (3, 1, H, 2 * W) and set(b["mask"].unique().tolist()) <= {0.0, 1.0}
    assert b["mask"][:, :, :, :W].sum() == 0
    assert b["group"] == ["lower"] * 3
    with pytest.raises(ValueError, match="latent shape"):
        R.decode_batch(out, {**manifest, "latent_shape": [16, 8, 12]})


def test_cache_key_tracks_what_changes_the_latents(cfg):
    other = tiny_config(*SMALL, "canvas.half_width=48", "canvas.half_height=64")
    same = tiny_config(*SMALL, "train.lr=0.5", "lora.rank=4")
    assert E.cache_key(other) != E.cache_key(cfg)
    assert E.cache_key(same) == E.cache_key(cfg)  # training knobs do not touch the cache
    assert E.cache_dir(cfg, "/x").parent == Path("/x")


# ---------------------------------------------------------------------------------------------
# The pipeline, with Ray


@pytest.fixture(scope="module")
def built(cfg, small_latent_cache):
    """The session's small cache (built through Ray Data by conftest), of this module's config."""
    folder, root = small_latent_cache
    assert folder == E.cache_dir(cfg, root), "conftest's SMALL_DATA is this module's SMALL"
    return folder, root


def rows_in(folder: Path, split: str) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in R.split_files(folder, split))


@pytest.mark.ray
def test_cache_manifest_matches_the_split_folders(built, cfg):
    folder, root = built
    m = R.load_manifest(folder)
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    assert folder == E.cache_dir(cfg, root) and m["cache_key"] == E.cache_key(cfg)
    assert m["latent_shape"] == [16, H // 8, 2 * W // 8] and m["mask_shape"] == [H, 2 * W]
    assert m["dtype"] == "float16" and m["prompt"] == cfg.model.prompt
    for split in ("train", "val", "test"):
        assert rows_in(folder, split) == sum(m["counts"][split].values()) == m["pairs"][split]
    assert m["pairs"]["train"] > m["pairs"]["val"] > 0
    assert m["rows"]["total"] == m["rows"]["valid"] and m["skipped"]["bad_rows"] == {}
    assert not (folder / f"split={F.STATS_SPLIT}").exists()
    assert not list(root.glob("*.tmp-*")), "the temporary build folder must be gone"

    pids = {s: set(pq.read_table(R.split_files(folder, s), columns=["pid"]).column("pid").to_pylist())
            for s in ("train", "val", "test")}
    assert not (pids["train"] & pids["val"] or pids["train"] & pids["test"] or pids["val"] & pids["test"])
    assert {s: len(v) for s, v in pids.items()} == m["pids"]


@pytest.mark.ray
def test_cache_rows_decode_and_text_is_stored_once(built, cfg):
    from safetensors import safe_open

    folder, _ = built
    m = R.load_manifest(folder)
    table = pq.read_table(R.split_files(folder, "train"))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False)[:4] for c in table.column_names}
    b = R.decode_batch(batch, m)  # as the plain training loop reads it (open_split: see below)
    assert b["target"].shape == (4, *m["latent_shape"]) and b["mask"].shape == (4, 1, *m["mask_shape"])

    assert [p.name for p in folder.rglob("*.safetensors")] == [artifacts.TEXT_EMBEDS]
    cols = set(pq.ParquetFile(R.split_files(folder, "train")[0]).schema_arrow.names)
    assert cols == {"pid", "group", "cloth_type", "garment_pose", "person_pose", "target", "masked", "mask",
                    "canvas", "stats"}
    with safe_open(str(folder / artifacts.TEXT_EMBEDS), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"prompt_embeds": m["text_embeds"]["prompt_embeds"],
                      "pooled_prompt_embeds": m["text_embeds"]["pooled_prompt_embeds"]}
    assert shapes["prompt_embeds"][:2] == [1, cfg.model.max_sequence_length]
    direct = St.encode_prompt(cfg)
    stored = R.load_text_embeds(folder)
    for k in direct:
        torch.testing.assert_close(stored[k], direct[k])

    with np.load(folder / artifacts.SAMPLES) as s:
        n = m["samples"]["count"]
        assert 0 < n <= E.NUM_SAMPLES and s["canvas"].shape == (n, *m["mask_shape"], 3)
        assert s["mask"].shape == (n, *m["mask_shape"]) and set(np.unique(s["mask"])) <= {0, 1}
        assert s["target"].shape == (n, *m["latent_shape"])
        assert set(s["pid"]) <= set(pq.read_table(R.split_files(folder, "val"), columns=["pid"])
                                    .column("pid").to_pylist())


@pytest.mark.ray
def test_same_config_reuses_the_cache(built, cfg, monkeypatch):
    folder, root = built
    mtime = (folder / artifacts.MANIFEST).stat().st_mtime_ns
    monkeypatch.setattr(E, "_build", lambda *a, **k: pytest.fail("the same config built the cache again"))
    said: list[str] = []
    again = E.build_latent_cache(cfg, cache_root=root, progress=False, log=said.append)
    assert again == folder and (folder / artifacts.MANIFEST).stat().st_mtime_ns == mtime
    assert said == [f"reusing latent cache {folder}"]


@pytest.mark.ray
@pytest.mark.slow  # a second cache through Ray Data (~30-60 s); without Ray: the key's inputs
# (tests/test_cache_keys.py) and bad rows counted with their reason (test_pair_builder_makes_canvases_and_counts_bad_rows)
def test_new_canvas_and_planted_bad_row_build_a_new_cache(built, tmp_path, cfg):
    """A hub-layout folder with a planted bad row, at a 48x64 half: a new folder, smaller
    latents, and the bad row counted under its reason."""
    from catvton.offline.synthetic import write_dataset

    folder, root = built
    photo, mask = person_and_mask(64)
    bad = [make_row(pid="id_09999999", pose="01_1_front", mask=png_cell(np.zeros((64, 64), np.uint8))),
           make_row(pid="id_09999999", pose="01_2_side", cloth_type="Socks")]
    write_dataset(tmp_path / "df", num_pids=12, image_size=64, seed=5, num_shards=2, extra_rows=bad)
    small = tiny_config(f"data.source={tmp_path / 'df'}", "canvas.half_width=48", "canvas.half_height=64",
                        "data.val_fraction=0.25", "data.test_fraction=0.25", "model.transformer_override=null")
    new = E.build_latent_cache(small, cache_root=root, progress=False)
    m = R.load_manifest(new)
    assert new != folder and new.parent == root
    assert m["latent_shape"] == [16, 8, 12] and m["mask_shape"] == [64, 96]
    assert m["skipped"]["bad_rows"] == {V.EMPTY_MASK: 1, V.UNKNOWN_CLOTH_TYPE: 1}
    assert m["skipped"]["bad_row_values"] == {V.UNKNOWN_CLOTH_TYPE: {"Socks": 1}}
    assert m["rows"]["total"] == m["rows"]["valid"] + 2
    for split in ("train", "val", "test"):
        assert rows_in(new, split) == sum(m["counts"][split].values())
    b = R.decode_batch(R.open_split(new, "train").take_batch(2, batch_format="numpy"), m)
    assert b["target"].shape == (2, 16, 8, 12) and b["mask"].shape == (2, 1, 64, 96)
