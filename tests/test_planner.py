"""The memory/FLOP planner against the measured and published full-size figures (FACTS.md), and
against the tiny model it plans for the offline preset (the model the job loads, what its forward saves)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catvton.config import Config, load_config
from catvton.train import planner
from catvton.train.planner import GB, TFLOP, plan, plan_from_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    """768x1024 halves, batch 1, r=16 attention+ff on an L40S, checkpointing on and off."""
    planner.full_size_transformer_meta()  # build the meta model once for the module
    kw = dict(half_width=768, half_height=1024, batch_size=1, rank=16, targets="attention+ff", gpu="L40S")
    return plan(gradient_checkpointing=True, **kw), plan(gradient_checkpointing=False, **kw)


def test_counts(base):
    ck, _ = base
    assert (ck.image_tokens, ck.text_tokens, ck.tokens_per_sample) == (6144, 512, 6656)
    assert ck.params_total == 11_902_391_360
    assert ck.params_trainable == 65_372_160
    assert ck.weights_bytes == 2 * 11_902_391_360
    assert ck.trainable_state_bytes == 16 * 65_372_160


def test_memory_matches_measurements(base):
    """Against the dry run's fake-tensor measurement of this project's step at full size, batch 1,
    r16 (``python -m catvton.train.dryrun --config configs/l40s.yaml --rows all``, docs/PERFORMANCE.md):
    98.79 GB of tensors without checkpointing, 29.14 GB with. FACTS' earlier ~70 GB without came from
    a LoRA kept in bf16; this project's fp32 LoRA on the bf16 base keeps fp32 copies of its inputs."""
    ck, no = base
    # the measurement excludes the CUDA context that the plan adds
    assert no.peak_bytes - no.context_bytes == pytest.approx(98.79 * GB, rel=0.05)
    assert ck.peak_bytes - ck.context_bytes == pytest.approx(29.14 * GB, rel=0.05)
    assert ck.activations_bytes == ck.activations_ckpt_bytes < no.activations_bytes == no.activations_no_ckpt_bytes


def test_flops_match_facts(base):
    ck, no = base
    assert no.flops_forward == pytest.approx(117 * TFLOP, rel=0.05)
    assert no.flops_linear_forward == pytest.approx(86 * TFLOP, rel=0.05)
    assert no.flops_attention_forward == pytest.approx(31 * TFLOP, rel=0.05)
    assert no.flops_backward == pytest.approx(148 * TFLOP, rel=0.05)
    assert no.flops_total == pytest.approx(265 * TFLOP, rel=0.05)
    assert no.flops_recompute == 0
    assert ck.flops_recompute == ck.flops_forward
    assert ck.flops_total == pytest.approx(400 * TFLOP, rel=0.05)
    # floor per sample: L40S ~0.73 s, H100 ~0.27 s (FACTS)
    assert no.seconds_per_sample == pytest.approx(0.73, rel=0.05)
    h100 = plan(768, 1024, 1, 16, "attention+ff", gradient_checkpointing=False, gpu="H100")
    assert h100.seconds_per_sample == pytest.approx(0.27, rel=0.05)


def test_fits_on_l40s():
    assert plan(768, 1024, 2, 16, "attention+ff", gradient_checkpointing=True, gpu="L40S").fits
    assert not plan(768, 1024, 1, 16, "attention+ff", gradient_checkpointing=False, gpu="L40S").fits
    assert plan(768, 1024, 1, 16, "attention+ff", gradient_checkpointing=False, gpu="H200").fits


def test_memory_and_flops_grow_with_batch_and_size():
    peaks = [plan(768, 1024, b, 16, "attention+ff").peak_bytes for b in (1, 2, 4)]
    assert peaks[0] < peaks[1] < peaks[2]
    one, two = plan(768, 1024, 1, 16, "attention"), plan(768, 1024, 2, 16, "attention")
    assert two.activations_bytes == pytest.approx(2 * one.activations_bytes)
    assert two.flops_total == pytest.approx(2 * one.flops_total)
    assert two.seconds_per_sample == pytest.approx(one.seconds_per_sample)
    small = plan(576, 768, 1, 16, "attention+ff")
    assert small.tokens_per_sample == 48 * 72 + 512
    assert small.peak_bytes < plan(768, 1024, 1, 16, "attention+ff").peak_bytes


def test_full_fine_tune_and_optimizer():
    lora = plan(768, 1024, 1, 16, "attention+ff", gradient_checkpointing=False)
    full = plan(768, 1024, 1, 16, "attention+ff", method="full", gradient_checkpointing=False)
    assert full.params_trainable == full.params_total
    assert full.flops_backward == pytest.approx(lora.flops_backward + 86 * TFLOP, rel=0.03)
    assert not plan(768, 1024, 1, 16, "attention+ff", method="full", gpu="H200").fits
    small_state = plan(768, 1024, 1, 16, "attention+ff", optimizer="adamw8bit")
    assert small_state.trainable_state_bytes == 10 * 65_372_160


def test_errors_listed_together():
    with pytest.raises(ValueError) as e:
        plan(770, 1024, 0, 16, "all", gpu="A100")
    msg = str(e.value)
    assert all(s in msg for s in ("770x1024", "batch_size=0", "targets='all'", "gpu='A100'"))


def test_plan_from_config():
    cfg = Config()
    cfg.train.batch_size, cfg.lora.rank = 1, 16
    p = plan_from_config(cfg, "H100")
    assert (p.half_width, p.half_height, p.batch_size, p.gpu, p.gradient_checkpointing) == (768, 1024, 1, "H100", True)
    assert p.params_trainable == 65_372_160


def test_table(base):
    text = base[0].to_table()
    for s in ("6,656", "65,372,160", "fits", "L40S", "recompute"):
        assert s in text
    assert "DOES NOT FIT" in str(base[1])


def test_cli(capsys):
    planner.main(["--gpu", "L40S", "--batch", "1", "--half", "768x1024", "--rank", "16"])
    out = capsys.readouterr().out
    assert "6,656" in out and "batch 1" in out and "checkpointing on" in out and "fits" in out
    planner.main(["--gpu", "L40S", "--batch", "1", "--half", "768x1024", "--no-checkpointing"])
    assert "DOES NOT FIT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        planner.main(["--half", "768"])
    assert e.value.code == 2 and "WIDTHxHEIGHT" in capsys.readouterr().err
    # the module entry point itself (--help needs no model: a couple of seconds)
    out = subprocess.run([sys.executable, "-m", "catvton.train.planner", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--no-checkpointing" in out and "--half" in out


# The plan follows the model the config names (issue 11): the tiny preset is planned as the tiny
# transformer the job loads, not as FLUX.1-Fill-dev at the tiny canvas.


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset on its base's own transformer (resolved: the tiny base, built once into the
    cache; the alpha, a fine-tune of the same architecture, is planned in tests/test_easy_train.py)."""
    from conftest import tiny_config

    cfg = tiny_config("model.transformer_override=null")
    return cfg, plan_from_config(cfg)


def test_the_tiny_preset_is_planned_as_the_tiny_transformer_the_job_loads(tiny):
    from catvton.model.loading import load_transformer
    from catvton.train import engine

    cfg, p = tiny
    loaded = load_transformer(cfg.model.base, cfg.model.transformer_override)
    assert p.params_total == sum(q.numel() for q in loaded.parameters()) < 11_902_391_360
    trained = engine.build_transformer(cfg, torch.device("cpu"), torch.float32)
    assert p.params_trainable == sum(q.numel() for q in engine.trainable_parameters(trained))
    assert p.model == f"{Path(cfg.model.base).name}/transformer" and p.model.startswith("tiny-base-")
    assert p.model_source == str(Path(cfg.model.base) / "transformer" / "config.json")
    blocks = (len(loaded.transformer_blocks), len(loaded.single_transformer_blocks), loaded.inner_dim)
    assert p.architecture == "{} double + {} single blocks, {} wide".format(*blocks)
    # its canvas and prompt: 2 x 96x128 -> 8 x 12 packed image tokens, 64 T5 tokens (configs/tiny.yaml)
    half_w, half_h = cfg.canvas.half_width, cfg.canvas.half_height
    assert (p.image_tokens, p.text_tokens) == ((half_h // 16) * (2 * half_w // 16), cfg.model.max_sequence_length)
    # a CPU run at fp32: this machine's RAM, no CUDA context, no floor time
    assert (p.gpu, p.precision, p.num_workers) == ("CPU", "fp32", cfg.train.num_workers)
    assert p.weights_bytes == 4 * p.params_total and p.context_bytes == 0 and p.seconds_per_sample is None
    assert p.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") and p.fits
    text = p.to_table()
    for s in (f"plan: {p.model}, lora r={cfg.lora.rank}", "CPU fp32", p.architecture, f"{p.params_total:,} total",
              f"{p.params_trainable:,} trainable", "RAM (this machine): fits", "not estimated"):
        assert s in text, (s, text)
    assert "FLUX.1-Fill-dev" not in text and "TFLOP/s" not in text


def test_the_tiny_plans_activations_are_what_its_training_forward_saves(tiny):
    """The FLUX per-token figures scaled to the tiny width (and fp32), against the bytes of every
    tensor autograd saves in one real training forward (``engine.fill_loss``) of the preset's batch."""
    from catvton.train import engine

    cfg, p = tiny
    model = engine.build_transformer(cfg, torch.device("cpu"), torch.float32)
    weights = {q.data_ptr() for q in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    b, h, w = cfg.train.batch_size, cfg.canvas.half_height // 8, 2 * cfg.canvas.half_width // 8
    batch = {"target": torch.randn(b, 16, h, w, generator=g), "masked": torch.randn(b, 16, h, w, generator=g),
             "mask": (torch.rand(b, 1, 8 * h, 8 * w, generator=g) > 0.5).float()}
    embeds = {"prompt_embeds": torch.randn(1, p.text_tokens, 32, generator=g),
              "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    text = engine.TextContext(embeds, (h, w), torch.device("cpu"), torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.fill_loss(model, batch, text, cfg, g)
    saved = sum(storages.values())
    assert not cfg.train.gradient_checkpointing and p.activations_bytes == p.activations_no_ckpt_bytes
    assert 0.8 < p.activations_bytes / saved < 1.25, (p.activations_bytes, saved)


def test_an_unresolved_offline_name_is_refused_with_what_to_do(capsys):
    """The planner cannot import catvton.offline (a library contract): it says to resolve first."""
    from catvton.model.loading import BaseModelError

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(BaseModelError, match=r"base='tiny' .* catvton\.offline\.resolve"):
        plan_from_config(cfg)
    with pytest.raises(SystemExit) as e:
        planner.main(["--config", str(ROOT / "configs" / "tiny.yaml")])
    assert e.value.code == 2 and "python easy_train.py test" in capsys.readouterr().err


def test_the_production_preset_is_still_planned_as_flux_fill_dev():
    """configs/l40s.yaml names hub ids (FLUX.1-Fill-dev + the CatVTON-Flux alpha): planned with the
    built-in full-size config, nothing fetched."""
    p = plan_from_config(load_config(ROOT / "configs" / "l40s.yaml"), "L40S")
    assert p.model == "FLUX.1-Fill-dev" and p.params_total == 11_902_391_360 and p.params_trainable == 65_372_160
    assert "xiaozaa/catvton-flux-alpha planned with it, not fetched" in p.model_source
    assert (p.tokens_per_sample, p.precision, p.gpu, p.context_bytes) == (6_656, "bf16", "L40S", 3 * GB)
    assert p.fits and "plan: FLUX.1-Fill-dev, lora r=16 attention+ff" in p.to_table()
