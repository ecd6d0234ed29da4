"""The one base-model interface (catvton.model.loading) and the tiny offline base (catvton.offline.tiny_base).

Fast structure checks run on a base built with a 5-step VAE into a temporary folder; the VAE
quality check uses the real cached tiny base (``ensure_tiny_base``: built once, about 3 CPU
minutes, then reused from ``$CATVTON_CACHE`` or ``~/.cache/catvton``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_for_a_caller_blocked_on
from diffusers import AutoencoderKL, FluxFillPipeline, FluxTransformer2DModel
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from catvton import artifacts
from catvton.config import load_config
from catvton.model import loading
from catvton.model.loading import BaseModelError
from catvton.offline import resolve
from catvton.offline import tiny_base as tiny
from catvton.offline.tiny_text import CATVTON_PROMPT

ROOT = Path(__file__).resolve().parents[1]

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> Path:
    """A tiny base with a barely trained VAE: every structural property, in seconds."""
    folder = tmp_path_factory.mktemp("small") / "base"
    tiny.build_tiny_base(folder, seed=0, vae_steps=5, synthetic_pids=8, log=lambda _: None)
    return folder


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The real tiny base from the cache (built on first use)."""
    return tiny.ensure_tiny_base()


def _canvas() -> tuple[Image.Image, Image.Image]:
    """A 192x128 canvas (two 96x128 halves) and its mask: 0 on the garment half, 255 on the person."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8))
    mask = np.zeros((128, 192), dtype=np.uint8)
    mask[16:112, 96 + 16 : 192 - 16] = 255
    return image, Image.fromarray(mask)


def _fill(pipe) -> np.ndarray:
    image, mask = _canvas()
    out = pipe(
        prompt=CATVTON_PROMPT,
        image=image,
        mask_image=mask,
        height=128,
        width=192,
        num_inference_steps=2,
        guidance_scale=30.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (192, 128)
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# The folder and plain diffusers loading
# ---------------------------------------------------------------------------------------------


def test_layout_is_the_diffusers_flux_fill_layout(small_base):
    for name in ("model_index.json", "tiny_base.json"):
        assert (small_base / name).is_file(), name
    for name in COMPONENTS:
        assert (small_base / name).is_dir(), name
    index = json.loads((small_base / "model_index.json").read_text())
    assert index["_class_name"] == "FluxFillPipeline"
    assert set(COMPONENTS) <= set(index)
    info = json.loads((small_base / "tiny_base.json").read_text())
    assert info["source"] == tiny.builder_source_hash() and info["vae_steps"] == 5
    assert {"vae_psnr_db", "random_vae_psnr_db", "params"} <= set(info)


def test_plain_from_pretrained_loads_a_flux_fill_pipeline(small_base):
    pipe = FluxFillPipeline.from_pretrained(small_base)
    cfg = pipe.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.guidance_embeds) == (384, 64, True)
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model == 32
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor is not None
    sched = pipe.scheduler.config
    assert (sched.shift, sched.use_dynamic_shifting, sched.base_shift, sched.max_shift) == (3.0, True, 0.5, 1.15)
    assert (sched.base_image_seq_len, sched.max_image_seq_len) == (256, 4096)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert not module.training, f"{name} is in training mode after loading"
            assert all(p.dtype == torch.float32 for p in module.parameters()), name


def test_prompt_tokenizes_to_real_tokens(small_base):
    pipe = FluxFillPipeline.from_pretrained(small_base)
    clip = pipe.tokenizer(CATVTON_PROMPT).input_ids
    assert pipe.tokenizer.model_max_length == 77
    assert 20 < len(clip) <= 77, "the prompt must fit CLIP's 77 tokens untruncated"
    assert len(set(clip)) > 20
    assert "clothing</w>" in pipe.tokenizer.convert_ids_to_tokens(clip)
    t5 = pipe.tokenizer_2(CATVTON_PROMPT, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(t5) == 512
    real = [i for i in t5 if i != pipe.tokenizer_2.pad_token_id]
    assert 20 < len(real) < 512 and pipe.tokenizer_2.unk_token_id not in real
    assert "▁clothing" in pipe.tokenizer_2.convert_ids_to_tokens(real)


def test_fill_runs_and_is_deterministic(small_base):
    pipe = loading.load_pipeline(str(small_base))
    first, second = _fill(pipe), _fill(pipe)
    np.testing.assert_array_equal(first, second)
    assert first.std() > 0


# ---------------------------------------------------------------------------------------------
# loading.py: base resolution, the transformer override, clear errors
# ---------------------------------------------------------------------------------------------


def test_load_pipeline_components_are_eval_and_progress_off(small_base):
    pipe = loading.load_pipeline(str(small_base))
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    assert pipe._progress_bar_config.get("disable") is True


def test_load_vae_and_text_encoders(small_base):
    vae = loading.load_vae(str(small_base))
    assert isinstance(vae, AutoencoderKL) and not vae.training
    tok, enc, tok2, enc2 = loading.load_text_encoders(str(small_base))
    assert not enc.training and not enc2.training
    ids = tok(CATVTON_PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert enc(ids).pooler_output.shape == (1, 32)
    ids2 = tok2(CATVTON_PROMPT, padding="max_length", max_length=512, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = enc2(ids2)[0], enc2(ids2)[0]
    assert a.shape == (1, 512, 32) and torch.equal(a, b)


def test_transformer_override_from_root_or_subfolder(small_base, tmp_path):
    base_t = loading.load_transformer(str(small_base))
    assert base_t.config.in_channels == 384 and not base_t.training

    # A CatVTON-Flux-style checkpoint: config + weights at the folder root, weights changed.
    changed = FluxTransformer2DModel.from_pretrained(small_base, subfolder="transformer")
    with torch.no_grad():
        changed.proj_out.weight.add_(1.0)
    root_ckpt = tmp_path / "catvton-like"
    changed.save_pretrained(root_ckpt)
    loaded = loading.load_transformer(str(small_base), override=str(root_ckpt))
    assert torch.equal(loaded.proj_out.weight, changed.proj_out.weight)

    # A base folder as override: found in transformer/.
    via_sub = loading.load_transformer("not/used-for-this", override=str(small_base))
    assert torch.equal(via_sub.proj_out.weight, base_t.proj_out.weight)

    pipe = loading.load_pipeline(str(small_base), override=str(root_ckpt))
    assert torch.equal(pipe.transformer.proj_out.weight, changed.proj_out.weight)
    assert not pipe.transformer.training


def test_text_to_image_transformer_is_refused(small_base, tmp_path):
    kwargs = dict(tiny.TRANSFORMER_KWARGS, in_channels=64, guidance_embeds=False)
    t2i = tmp_path / "flux-dev-like"
    FluxTransformer2DModel(**kwargs).save_pretrained(t2i)
    with pytest.raises(BaseModelError, match="in_channels=64") as err:
        loading.load_transformer(str(small_base), override=str(t2i))
    assert str(t2i) in str(err.value) and "384" in str(err.value) and "FLUX.1-Fill-dev" in str(err.value)


def test_missing_base_folder_explains_the_layout(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist") as err:
        loading.resolve_base(str(tmp_path / "nowhere"))
    assert "model_index.json" in str(err.value) and "tiny" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no model_index.json"):
        loading.load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(BaseModelError, match="no config.json"):
        loading.load_transformer("unused", override=str(tmp_path / "empty"))


def test_offline_names_are_refused_by_the_library_and_resolved_by_offline():
    """The library never builds offline models: an unresolved ``tiny`` is an error naming the fix,
    and :func:`catvton.offline.resolve` turns it into the cached folder."""
    for call in (lambda: loading.resolve_base("tiny"), lambda: loading.load_transformer("tiny"),
                 lambda: loading.load_transformer(str(Path("/nowhere")), override="tiny-alpha")):
        with pytest.raises(BaseModelError, match="catvton.offline.resolve"):
            call()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.transformer_override=null"])
    resolved = resolve(cfg, log=lambda _: None)
    assert resolved.model.base == str(tiny.ensure_tiny_base()) and Path(resolved.model.base).is_dir()
    assert resolved.data.source == "synthetic" and cfg.model.base == "tiny"  # a copy; the data keeps its name
    assert resolve(resolved, log=lambda _: None).to_dict() == resolved.to_dict()  # resolving twice changes nothing
    prod = load_config(ROOT / "configs" / "l40s.yaml")
    assert resolve(prod, log=lambda _: None).to_dict() == prod.to_dict()  # hub ids pass through


def test_hub_ids_pass_through_unchanged():
    assert loading.resolve_base("black-forest-labs/FLUX.1-Fill-dev") == "black-forest-labs/FLUX.1-Fill-dev"


# ---------------------------------------------------------------------------------------------
# ensure_tiny_base: cache naming, atomic build, one builder at a time (build stubbed: fast)
# ---------------------------------------------------------------------------------------------


def _fake_build(calls: list, fail: bool = False, overlap: Path | None = None):
    """A stub of ``build_tiny_base``; with ``overlap`` (the folder being built) it finishes only
    once another caller is blocked on that folder's lock."""
    def build(out_dir, seed=0, log=print, **_):
        calls.append(Path(out_dir))
        (Path(out_dir) / "model_index.json").write_text("{}")
        if fail:
            raise RuntimeError("crashed mid-build")
        if overlap is not None:
            wait_for_a_caller_blocked_on(overlap)
        (Path(out_dir) / "tiny_base.json").write_text("{}")
        return {}

    return build


def test_ensure_tiny_base_builds_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("CATVTON_PREBUILT", "0")  # build (stubbed), do not copy the shipped base
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build_tiny_base", _fake_build(calls, overlap=tmp_path / tiny.tiny_base_key(0)))
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(tiny.ensure_tiny_base(tmp_path, log=lambda _: None))
        except BaseException as e:  # a thread's exception would otherwise only be printed
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) == 1 and len(set(results)) == 1
    final = results[0]
    assert final.parent == tmp_path and final.name == tiny.tiny_base_key(0)
    assert (final / "tiny_base.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert tiny.ensure_tiny_base(tmp_path, log=lambda _: None) == final and len(calls) == 1


def test_ensure_tiny_base_crash_leaves_nothing_half_built(tmp_path, monkeypatch):
    monkeypatch.setenv("CATVTON_PREBUILT", "0")
    monkeypatch.setattr(tiny, "build_tiny_base", _fake_build([], fail=True))
    with pytest.raises(RuntimeError, match="crashed"):
        tiny.ensure_tiny_base(tmp_path, log=lambda _: None)
    assert not (tmp_path / tiny.tiny_base_key(0)).exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CATVTON_CACHE", str(tmp_path))
    assert artifacts.cache_root() == tmp_path
    monkeypatch.delenv("CATVTON_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert artifacts.cache_root() == tmp_path / "home" / ".cache" / "catvton"
    assert tiny.tiny_base_key(0) != tiny.tiny_base_key(1) != tiny.tiny_base_key(0, vae_steps=5)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.parent.name}/{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_the_build_ignores_the_callers_threads_and_its_key_names_what_decides_the_weights(tmp_path, monkeypatch):
    """Same key only if the weights are identical: a build under a 1-thread caller (pytest) and
    under a 2-thread caller (a job) gives the same weights and the same folder name; a build that
    really runs on another thread count gives other weights, and another name."""
    caller = torch.get_num_threads()
    builds = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tiny.build_tiny_base(tmp_path / f"caller{threads}", vae_steps=5, synthetic_pids=8, log=lambda _: None)
            assert torch.get_num_threads() == threads, "the caller's thread count is restored"
            builds[threads] = (_weights(tmp_path / f"caller{threads}"), tiny.tiny_base_key(0, 5, 8))
    finally:
        torch.set_num_threads(caller)
    (w1, k1), (w2, k2) = builds[1], builds[2]
    assert k1 == k2 and w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the build must not depend on the caller's threads"
    info = json.loads((tmp_path / "caller1" / "tiny_base.json").read_text())
    assert info["build_threads"] == tiny.BUILD_THREADS

    monkeypatch.setattr(tiny, "BUILD_THREADS", 1 if tiny.BUILD_THREADS != 1 else 2)
    tiny.build_tiny_base(tmp_path / "other", vae_steps=5, synthetic_pids=8, log=lambda _: None)
    other = _weights(tmp_path / "other")
    assert any(not torch.equal(w1[k], other[k]) for k in w1), "another thread count rounds differently"
    assert tiny.tiny_base_key(0, 5, 8) != k1, "so it must name another folder"


def test_the_key_follows_the_builders_source(monkeypatch):
    key = tiny.tiny_base_key()
    monkeypatch.setattr(tiny, "builder_source_hash", lambda: "edited")
    assert tiny.tiny_base_key() != key
    from catvton.artifacts import source_files

    files = {f.as_posix() for f in source_files(tiny.BUILDER)}
    assert {"offline/tiny_base.py", "offline/tiny_text.py", "offline/tiny_vae.py", "offline/synthetic.py"} <= files


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        tiny.main(["--help"])
    assert exit_.value.code == 0
    assert "--vae-steps" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The real tiny base: its VAE reconstructs held-out people and garments
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _psnr(vae, images: list[torch.Tensor]) -> float:
    scores = []
    for img in images:
        x = img.unsqueeze(0)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        scores.append(
            peak_signal_noise_ratio(
                ((rec + 1) / 2).clamp(0, 1), (x + 1) / 2, data_range=1.0, dim=(1, 2, 3), reduction="none"
            )
        )
    return float(torch.cat(scores).mean())


def test_tiny_vae_reconstructs_heldout_images(tiny_base):
    info = json.loads((tiny_base / "tiny_base.json").read_text())
    vae = loading.load_vae(str(tiny_base))
    _, heldout = tiny.vae_image_sets(info["synthetic_pids"], info["seed"])
    images = heldout[:32]
    assert len(images) >= 16
    torch.manual_seed(0)
    random_vae = AutoencoderKL.from_config(vae.config).eval()
    trained, random = _psnr(vae, images), _psnr(random_vae, images)
    assert trained >= 18.0, f"tiny VAE held-out PSNR {trained:.2f} dB"
    assert trained > random + 6.0, f"trained {trained:.2f} dB vs random {random:.2f} dB"
    assert abs(trained - info["vae_psnr_db"]) < 1.5  # the build's own figure (96 images) agrees

    # Latent normalisation as FLUX's: (z - shift) * scale has about zero mean and unit std.
    with torch.no_grad():
        z = torch.cat([vae.encode(x.unsqueeze(0)).latent_dist.mode().flatten() for x in images])
    zn = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(zn.mean())) < 0.3 and 0.6 < float(zn.std()) < 1.5


def test_tiny_base_fill_runs(tiny_base):
    pipe = loading.load_pipeline(str(tiny_base))
    out = _fill(pipe)
    assert out.shape == (128, 192, 3)
