"""What a replica keeps on its GPU (issue 24), checked on the tiny model on the CPU.

On a 48 GB L40S the full-size model did not fit a batch of 4 at a 1536x1024 canvas: T5-XXL
(~9.5 GB) and CLIP stayed resident after the one prompt was encoded, and the VAE decoded the whole
batch at once. Now :meth:`catvton.infer.tryon.TryOn.load` drops the text encoders once the prompt's
embeddings are computed (no request carries a prompt: nothing encodes again), and decodes one image
at a time (VAE slicing; by default where the pipeline runs on CUDA). Both must leave every
picture as it was: compared here bit for bit against a pipeline that keeps its encoders and
decodes the batch at once, same seeds.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from conftest import tiny_fill_case

from catvton.config import ConfigError


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """``(cfg, lora, canvas (3,32,64,3), mask (3,32,64))``: the tiny base at 32x32 halves, 2 steps, a
    random LoRA (built once for the module: it is most of the module's time)."""
    return tiny_fill_case(tmp_path_factory.mktemp("lora"), n=3, steps=2)


def kept_encoders_tryon(cfg, lora):
    """The pipeline as ``TryOn.load`` built it before issue 24: text encoders kept, no slicing."""
    from catvton.infer.tryon import TryOn
    from catvton.model.loading import load_pipeline

    pipe = load_pipeline(cfg.model.base, cfg.model.transformer_override, torch_dtype=torch.float32, device="cpu")
    pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        prompt, pooled, _ = pipe.encode_prompt(cfg.model.prompt, prompt_2=None, device="cpu",
                                               max_sequence_length=cfg.model.max_sequence_length)
    return TryOn(pipe, prompt, pooled, cfg).with_levers("cpu", lora_loaded=True)


def test_load_frees_the_text_encoders_and_the_picture_is_the_same(case, monkeypatch):
    import catvton.infer.tryon as tryon_module
    from catvton.infer.tryon import TryOn

    cfg, lora, canvas, mask = case
    canvas, mask = canvas[:2], mask[:2]
    loaded = []
    real_load = tryon_module.load_pipeline

    def recording_load(*args, **kwargs):  # weak references to what load_pipeline gave TryOn.load
        pipe = real_load(*args, **kwargs)
        loaded.extend(weakref.ref(m) for m in (pipe.text_encoder, pipe.text_encoder_2))
        return pipe

    monkeypatch.setattr(tryon_module, "load_pipeline", recording_load)
    freed = TryOn.load(cfg, lora=lora)
    pipe = freed.pipe
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert pipe.tokenizer is None and pipe.tokenizer_2 is None
    held = {name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert held == {"transformer", "vae"}, held
    gc.collect()
    assert len(loaded) == 2 and all(ref() is None for ref in loaded), "the encoders are gone, not merely unlinked"
    assert freed.prompt_embeds.shape[0] == 1 and freed.pooled.shape[0] == 1, "the prompt's embeddings stay"

    monkeypatch.setattr(tryon_module, "load_pipeline", real_load)
    kept = kept_encoders_tryon(cfg, lora)
    assert kept.pipe.text_encoder is not None
    assert torch.equal(freed.prompt_embeds, kept.prompt_embeds) and torch.equal(freed.pooled, kept.pooled)
    for seed in ([0, 1], 7):
        a = freed.fill_canvases(canvas, mask, seed=seed)
        b = kept.fill_canvases(canvas, mask, seed=seed)
        assert np.array_equal(a, b), f"seed {seed}: max difference {np.abs(a - b).max()}"


class BatchSizes:
    """The batch size of every call of a module (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module):
        self.sizes: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.sizes.append(args[0].shape[0]))


def test_vae_slicing_decodes_one_image_at_a_time_and_changes_no_pixel(case):
    """Slicing runs the same decoder on each image alone; the convolutions of a batch of 1 round
    differently from a batch of 3 (measured here: 7.7e-7 at most, float32 on this CPU), so the
    tolerance is 1e-5 in [0, 1] pixels, 1/400 of one 8-bit level: the same picture. Slicing is off by
    default on the CPU, so that CPU outputs stay bit-identical to the evaluation's as before."""
    from catvton.infer.tryon import TryOn

    cfg, lora, canvas, mask = case
    tryon = TryOn.load(cfg, lora=lora, vae_slicing=True)
    vae = tryon.pipe.vae
    assert vae.use_slicing and not vae.use_tiling, "sliced as asked; tiling (pixels change at the seams) never on"
    calls = BatchSizes(vae.decoder)
    b = tryon.fill_canvases(canvas, mask, seed=[0, 1, 2])
    sliced, calls.sizes = calls.sizes, []
    vae.disable_slicing()  # the same pipeline, the whole batch at once
    a = tryon.fill_canvases(canvas, mask, seed=[0, 1, 2])
    assert sliced == [1, 1, 1] and calls.sizes == [3], (sliced, calls.sizes)
    assert np.abs(a - b).max() <= 1e-5, f"max difference {np.abs(a - b).max()}"
    m = mask.astype(bool)
    assert np.array_equal(a[~m], b[~m]), "outside the mask both are the input, exactly"


@pytest.mark.parametrize("setting,device,expected", [
    (None, "cpu", False), (None, "cuda", True), (None, "cuda:1", True), (None, "meta", True),
    (True, "cpu", True), (False, "cuda", False),
])
def test_vae_slicing_is_on_by_default_where_the_pipeline_runs_on_cuda(setting, device, expected):
    from catvton.infer.tryon import wants_vae_slicing

    assert wants_vae_slicing(setting, device) is expected


def test_the_serve_setting_reaches_the_pipeline_and_bad_values_are_refused():
    from catvton.infer.serving import ServeConfig, serve_config_from_dict

    assert ServeConfig().vae_slicing == "auto"
    assert {v: serve_config_from_dict({"vae_slicing": v, "lora": []}).slicing for v in ("auto", "on", "off")} == {
        "auto": None, "on": True, "off": False}
    with pytest.raises(ConfigError) as e:
        serve_config_from_dict({"vae_slicing": "sometimes", "lora": []})
    assert "vae_slicing" in str(e.value) and "auto, on or off" in str(e.value)


def test_a_served_tiny_model_reports_what_it_holds():
    """``TryOnService.load`` (what a replica runs) with ``vae_slicing: on`` on the CPU: /v1/info says
    where the model runs, that the encoders are freed and that the VAE is sliced."""
    from catvton.infer.serving import TryOnService, serve_config_from_dict
    from catvton.offline import resolve

    settings = serve_config_from_dict({"lora": [], "vae_slicing": "on", "device": "cpu",
                                       "overrides": ["model.transformer_override=null"]})
    service = TryOnService.load(settings, prepare=lambda cfg: resolve(cfg, log=lambda _: None))
    assert service.tryon.pipe.vae.use_slicing and service.tryon.pipe.text_encoder_2 is None
    info = service.info()
    assert info["device"] == "cpu"
    assert info["memory"] == {"text_encoders": "freed after encoding the prompt", "vae_slicing": True}
