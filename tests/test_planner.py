"""The memory/FLOP planner against the measured and published full-size figures (FACTS.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from catvton.config import Config
from catvton.train import planner
from catvton.train.planner import GB, TFLOP, plan, plan_from_config

torch.set_num_threads(1)


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
    ck, no = base
    assert no.peak_bytes == pytest.approx(70 * GB, rel=0.10)
    assert ck.peak_bytes == pytest.approx(28 * GB, rel=0.15)
    # FACTS' figures exclude the 2-4 GB context that the plan adds
    assert no.peak_bytes - no.context_bytes == pytest.approx(70 * GB, rel=0.02)
    assert ck.peak_bytes - ck.context_bytes == pytest.approx(28 * GB, rel=0.02)
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
