"""The inference levers of ``cfg.infer`` (catvton.infer.levers, applied in TryOn.load): bad values are
refused with the fix named, ``cache=none`` changes nothing, every cache kind really skips transformer
work on the tiny base, and a fused LoRA gives the unfused LoRA's image (and not the base's).

Tiny base (no alpha), 32x32 halves, 8 steps (the tiny preset's), a random LoRA: seconds each. Nothing
here is timed: bench/tryon_speed.py measures the speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_fill_case

from catvton.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
FUSED_TOLERANCE = 1e-4
"""Largest pixel difference (of [0, 1]) allowed between a fused and an unfused LoRA try-on: float32
rounding of W + BA folded once vs applied as two matmuls; 1/40 of one 8-bit level."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A config on the tiny base at 32x32 halves, a random LoRA on it, and two canvases."""
    return tiny_fill_case(tmp_path_factory.mktemp("lora"), n=2, steps=STEPS)


def _with(cfg, **infer):
    c = config_from_dict(cfg.to_dict())
    for k, v in infer.items():
        setattr(c.infer, k, v)
    return c


def _run(tryon, canvas, mask, steps=STEPS):
    """Results of one try-on per canvas (own seed each) and the transformer work counted."""
    from catvton.infer.levers import PassCounter

    with PassCounter(tryon.pipe.transformer) as counter:
        out = np.concatenate([tryon.fill_canvases(canvas[i:i + 1], mask[i:i + 1], seed=i, steps=steps)
                              for i in range(len(canvas))])
    return out, counter


def test_bad_lever_values_are_refused_all_at_once_with_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", ["infer.cache=teacache", "infer.first_block_threshold=0",
                                                 "infer.taylorseer_interval=0", "infer.mag_retention=1.5",
                                                 "infer.mag_ratios=[1.0, -0.5]"])
    text = str(e.value)
    assert "infer.cache='teacache': choose from ['none', 'first_block', 'taylorseer', 'mag']" in text
    assert "infer.first_block_threshold=0.0: must be positive" in text and "infer.cache=none" in text
    assert "infer.taylorseer_interval=0: must be at least 1" in text
    assert "infer.mag_retention=1.5" in text and "infer.mag_ratios=[1.0, -0.5]" in text
    assert len(e.value.problems) == 5
    with pytest.raises(ConfigError, match="did you mean infer.fuse_lora"):
        load_config(ROOT / "configs/tiny.yaml", ["infer.fuse_loras=true"])


def test_compile_on_a_cpu_is_refused_before_anything_is_touched():
    from catvton.config import InferConfig
    from catvton.infer.levers import apply_levers

    with pytest.raises(ConfigError, match="infer.compile=true needs a CUDA device.*set infer.compile=false"):
        apply_levers(None, InferConfig(compile=True), "cpu", lora_loaded=False)


def test_cache_none_is_bit_identical_to_the_plain_pipeline_call(tiny):
    """``none`` (the default) adds nothing around the call: the same pixels as diffusers' own call."""
    import torch

    from catvton.infer.tryon import TryOn, paste_back

    cfg, lora, canvas, mask = tiny
    tryon = TryOn.load(cfg, lora=lora)
    assert tryon.cache is None and tryon.levers == {"cache": "none", "fused_lora": False, "compiled": False}
    out, counter = _run(tryon, canvas[:1], mask[:1])
    plain = tryon.pipe(image=torch.from_numpy(canvas[:1].transpose(0, 3, 1, 2).copy()),
                       mask_image=torch.from_numpy(mask[:1, None].copy()), height=32, width=64,
                       prompt_embeds=tryon.prompt_embeds, pooled_prompt_embeds=tryon.pooled,
                       num_inference_steps=STEPS, guidance_scale=cfg.infer.guidance,
                       generator=torch.Generator().manual_seed(0), max_sequence_length=cfg.model.max_sequence_length,
                       output_type="np").images
    assert np.array_equal(out, paste_back(canvas[:1], mask[:1], plain.astype(np.float32)))
    assert (counter.calls, counter.full, counter.passes) == (STEPS, STEPS, STEPS)


@pytest.mark.parametrize("kind, settings", [
    ("first_block", dict(first_block_threshold=1e9)),   # any change is "small": only step 0 runs every block
    ("taylorseer", dict(taylorseer_interval=3, taylorseer_warmup=1)),  # full passes at steps 0, 2, 5
    ("mag", dict(mag_threshold=1e9, mag_max_skip=3, mag_retention=0.0)),  # ratios calibrated at load
])
def test_every_cache_kind_skips_transformer_work_on_the_tiny_base(tiny, kind, settings):
    from catvton.infer.tryon import TryOn

    cfg, lora, canvas, mask = tiny
    uncached, _ = _run(TryOn.load(cfg, lora=lora), canvas, mask)
    tryon = TryOn.load(_with(cfg, cache=kind, **settings), lora=lora)
    out, counter = _run(tryon, canvas, mask)
    n = len(canvas)
    assert counter.calls == n * STEPS, "the pipeline still takes every step"
    assert counter.full < n * STEPS and counter.passes < n * STEPS, (kind, counter.full, counter.passes)
    expected_full = {"first_block": 1, "taylorseer": 3, "mag": 2}[kind] * n  # mag: steps 0 and 4 (max 3 skipped)
    assert counter.full == expected_full, (kind, counter.full)
    m = mask.astype(bool)
    assert np.isfinite(out).all() and np.array_equal(out[~m], canvas[~m]), "unmasked pixels are the input's"
    assert np.abs(out - uncached)[m].max() > 1e-4, "skipped work changes the result"
    if kind == "mag":
        ratios = tryon.levers["mag_ratios"]
        assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
        _, fewer = _run(tryon, canvas[:1], mask[:1], steps=4)  # another step count re-arms the schedule
        assert fewer.calls == 4 and fewer.full == 1


def test_a_fused_lora_gives_the_unfused_image_and_leaves_no_adapter_layers(tiny):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from catvton.infer.tryon import TryOn

    cfg, lora, canvas, mask = tiny
    unfused, _ = _run(TryOn.load(cfg, lora=lora), canvas, mask)
    fused_tryon = TryOn.load(_with(cfg, fuse_lora=True), lora=lora)
    fused, counter = _run(fused_tryon, canvas, mask)
    base, _ = _run(TryOn.load(cfg), canvas, mask)
    assert fused_tryon.levers["fused_lora"] is True
    assert not any(isinstance(m, BaseTunerLayer) for m in fused_tryon.pipe.transformer.modules()), \
        "the fused model runs the base's modules only"
    assert np.abs(fused - unfused).max() <= FUSED_TOLERANCE
    assert np.abs(fused - base).max() > 100 * FUSED_TOLERANCE, "the LoRA is applied"
    assert counter.full == len(canvas) * STEPS
    # without a LoRA there is nothing to fold in: the base runs as it is
    assert TryOn.load(_with(cfg, fuse_lora=True)).levers["fused_lora"] is False


def test_serving_and_evaluation_take_the_levers_from_the_config(tiny):
    """Both build their pipeline through TryOn.load: the levers come with the model config."""
    from catvton.eval.generate import TryOnPredictor
    from catvton.infer.serving import ServeConfig, TryOnService

    cfg, lora, canvas, mask = tiny
    service = TryOnService.load(ServeConfig(lora=[str(lora)], device="cpu", overrides=[
        f"model.base={cfg.model.base}", "model.transformer_override=null", "infer.fuse_lora=true",
        "infer.cache=taylorseer"]))
    assert service.tryon.levers["fused_lora"] is True and service.tryon.levers["cache"] == "taylorseer"
    predictor = TryOnPredictor(_with(cfg, cache="first_block").to_dict(), lora=str(lora))
    assert predictor.tryon.levers["cache"] == "first_block" and predictor.tryon.cache is not None


def test_garment_guidance_pushes_away_from_the_garment_free_prediction(tiny):
    """``infer.garment_guidance`` s: every step runs the transformer on the canvas as given and on it
    with the garment half's noisy and masked-image latents at 0, and takes ``free + s * (given - free)``; s=1 is
    the plain call. Checked against a hand-made guided step on the tiny base."""
    import torch

    from catvton.infer.levers import GARMENT_FREE_CHANNELS, garment_guidance
    from catvton.infer.tryon import TryOn

    cfg, lora, canvas, mask = tiny
    plain, plain_count = _run(TryOn.load(cfg, lora=lora), canvas, mask)
    off, _ = _run(TryOn.load(_with(cfg, garment_guidance=1.0), lora=lora), canvas, mask)
    guided_tryon = TryOn.load(_with(cfg, garment_guidance=2.5), lora=lora)
    guided, counter = _run(guided_tryon, canvas, mask)
    assert np.array_equal(off, plain)
    assert counter.calls == plain_count.calls == len(canvas) * STEPS, "one guided call a step"
    assert counter.passes == 2 * plain_count.passes == 2 * len(canvas) * STEPS, "two passes of every block a step"
    m = mask.astype(bool)
    assert np.array_equal(guided[~m], canvas[~m]) and np.abs(guided - plain)[m].max() > 1e-3

    # one step by hand: the garment-free call sees zeros exactly on the garment half's masked-image channels
    t = guided_tryon.pipe.transformer
    seen = []
    hidden = torch.randn(1, 8, 384)  # a 2x4 token grid: columns 0-1 are the garment half
    ids = torch.tensor([[0.0, r, c] for r in range(2) for c in range(4)])
    kwargs = dict(timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]), pooled_projections=torch.zeros(1, 32),
                  encoder_hidden_states=torch.zeros(1, 4, 32), txt_ids=torch.zeros(4, 3), img_ids=ids, return_dict=False)
    hook = t.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    with torch.no_grad():
        given = t(hidden_states=hidden, **kwargs)[0]
        with garment_guidance(t, 3.0):
            out = t(hidden_states=hidden, **kwargs)[0]
        free_in = hidden.clone()
        free_in[:, [0, 1, 4, 5], GARMENT_FREE_CHANNELS] = 0
        free = t(hidden_states=free_in, **kwargs)[0]
    hook.remove()
    # calls: given (plain), given and free (guided), free (plain)
    assert len(seen) == 4 and torch.equal(seen[2], free_in) and torch.equal(seen[1], hidden)
    assert torch.allclose(out, free + 3.0 * (given - free), atol=1e-6)
    assert "forward" not in vars(t), "the plain forward is back after the call"


def test_garment_guidance_with_a_step_cache_is_refused():
    with pytest.raises(ConfigError, match="infer.cache='taylorseer' with infer.garment_guidance=2.0"):
        load_config(ROOT / "configs/tiny.yaml", ["infer.cache=taylorseer", "infer.garment_guidance=2.0"])


def test_guided_calls_that_overlap_in_threads_share_one_arming(tiny):
    """A Serve replica runs batches in threads: overlapping guided calls must not undo each other."""
    import threading

    import torch

    from catvton.infer.levers import garment_guidance
    from catvton.infer.tryon import TryOn

    cfg, lora, canvas, mask = tiny
    t = TryOn.load(cfg, lora=lora).pipe.transformer
    inside, leave = threading.Event(), threading.Event()

    def other():
        with garment_guidance(t, 2.0):
            inside.set()
            leave.wait(30)

    worker = threading.Thread(target=other)
    worker.start()
    assert inside.wait(30)
    with garment_guidance(t, 2.0):
        assert "forward" in vars(t)
    assert "forward" in vars(t), "the other call is still guided"
    with pytest.raises(RuntimeError, match="garment guidance 3.0 asked while 2.0 is armed"):
        with garment_guidance(t, 3.0):
            pass
    leave.set()
    worker.join(30)
    assert "forward" not in vars(t) and "_garment_guidance" not in vars(t)
    assert isinstance(t(hidden_states=torch.randn(1, 8, 384), timestep=torch.tensor([0.5]),
                        guidance=torch.tensor([1.0]), pooled_projections=torch.zeros(1, 32),
                        encoder_hidden_states=torch.zeros(1, 4, 32), txt_ids=torch.zeros(4, 3),
                        img_ids=torch.tensor([[0.0, r, c] for r in range(2) for c in range(4)]),
                        return_dict=False), tuple)
