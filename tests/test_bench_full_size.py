"""bench/full_size_step.py without a GPU: the full-size model built through the training code on
the meta device (parameter counts), every benchmark path run at a tiny size on CPU (rows, levers,
the try-on with each inference lever), and the planner figures it reports (MFU, prediction error)
checked against the planner. The GPU figures themselves: docs/PERFORMANCE.md ("not measured" until a GPU run)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_full_size_step", ROOT / "bench/full_size_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


B = _load_bench()
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_full_size_model_goes_through_the_training_code_with_flux_shapes():
    from catvton.train import engine as S

    cfg = B.bench_config(1, True, torch.bfloat16)
    model = S.build_transformer(cfg, torch.device("meta"), torch.bfloat16,
                                base=B.build_base(B.FULL, torch.device("meta"), torch.bfloat16))
    trainable = S.trainable_parameters(model)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 11_902_391_360  # FACTS.md
    assert sum(p.numel() for p in trainable) == 65_372_160  # LoRA r=16, attention + feed-forward
    assert {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert model.is_gradient_checkpointing
    assert B.FULL.latent_hw == (128, 192)  # 768x1024 halves: 96x64 = 6,144 packed image tokens
    assert B.FULL.latent_hw[0] * B.FULL.latent_hw[1] // 4 + B.FULL.text_tokens == 6_656


@pytest.mark.parametrize("spec", [
    dict(batch=1, checkpointing=True),
    dict(batch=2, checkpointing=False),
    dict(batch=1, checkpointing=True, sdpa="math"),
    dict(batch=1, checkpointing=True, keep_blocks=1),
])
def test_every_row_kind_runs_the_real_step_at_tiny_size(spec):
    from catvton.model.lora import count_lora_params

    row = B.time_row(B.TINY, CPU, torch.float32, steps=2, warmup=1, **spec)
    assert row["oom"] is False and row["steps_timed"] == 2
    assert row["sec_per_sample"] > 0 and math.isclose(row["sec_per_sample"], row["sec_per_step"] / spec["batch"])
    assert math.isfinite(row["loss"]) and row["peak_bytes"] > 0
    base = B.build_base(B.TINY, CPU, torch.float32)
    assert row["trainable_params"] == count_lora_params(base, 16, "attention+ff") > 0
    if "keep_blocks" in spec:  # 1 double + 2 single blocks, the last one keeps its activations
        assert row["recomputed_blocks"] == 2
    assert "OOM" not in B.format_row(row)


def test_a_row_times_the_training_codes_own_step(monkeypatch):
    """Every timed step is ``engine.train_step`` (clipping, AdamW, schedule), one micro-batch each."""
    from catvton.train import engine as S

    calls, train_step = [], S.train_step

    def counting(model, micro_batches, *args, **kwargs):
        calls.append(len(micro_batches))
        return train_step(model, micro_batches, *args, **kwargs)

    monkeypatch.setattr(S, "train_step", counting)
    row = B.time_row(B.TINY, CPU, torch.float32, batch=1, checkpointing=False, steps=2, warmup=1)
    assert calls == [1, 1, 1] and row["steps_timed"] == 2 and math.isfinite(row["loss"])


def test_a_lever_the_device_cannot_run_is_recorded_not_fatal():
    row = B.time_row(B.TINY, CPU, torch.float32, batch=1, checkpointing=True, steps=1, warmup=0, sdpa="cudnn")
    assert row["oom"] is False and "kernel" in row["error"].lower(), row
    assert "sec_per_step" not in row and "ERROR" in B.format_row(row)
    planned = B.add_plan(dict(row), B.FULL, "H100")
    assert "mfu" not in planned and "predicted_peak_bytes" not in planned  # no planner figures for it


def test_recompute_wrapper_gives_the_same_gradients():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    block(x).sum().backward()
    plain = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    B.Recompute(block)(x).sum().backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(plain, block.parameters()))


SKIP_ALL = {"first_block": {"first_block_threshold": 1e9}, "mag": {"mag_threshold": 1e9}}
"""Thresholds under which the step caches skip every step they may: with random weights, what the
default thresholds skip is no figure to hold a count to, at these the count is exact."""


@pytest.mark.parametrize("lever", list(B.TRYON_LEVERS))
def test_tryon_runs_the_fill_pipeline_at_the_canvas_with_each_lever(lever, monkeypatch):
    """Each try-on row runs with its lever applied by the serving code, its passes counted."""
    from catvton.config import InferConfig

    steps = 6
    monkeypatch.setitem(B.TRYON_LEVERS, lever, {**B.TRYON_LEVERS[lever], **SKIP_ALL.get(lever, {})})
    t = B.time_tryon(B.TINY, CPU, torch.float32, steps=steps, lever=lever)
    assert t["lever"] == lever and t["steps"] == steps and t["seconds"] > 0
    assert t["output_shape"] == [1, B.TINY.half_height, 2 * B.TINY.half_width, 3]
    assert t["finite"]
    assert t["fused_lora"] is (lever == "fused")
    if lever in ("none", "fused"):
        assert t["passes"] == steps
    elif lever == "taylorseer":  # defaults: 2 warm-up steps, then every 3rd: full passes at steps 0, 1, 3
        assert t["passes"] == 3
    elif lever == "first_block":  # step 0 runs all 3 blocks (1 double + 2 single), then only the first block
        assert B.TINY_TRANSFORMER["num_layers"] + B.TINY_TRANSFORMER["num_single_layers"] == 3
        assert t["passes"] == pytest.approx(1 + (steps - 1) / 3)
    else:  # mag: step 0 kept (0.2 of 6 steps, rounded), 3 skipped (mag_max_skip), a full pass, 1 skipped
        assert (InferConfig().mag_retention, InferConfig().mag_max_skip) == (0.2, 3)
        assert t["passes"] == 2


def test_reported_mfu_and_prediction_error_are_the_planners():
    from catvton.train import planner as P

    p = P.plan(768, 1024, 2, rank=16, targets="attention+ff", gradient_checkpointing=True, gpu="H100")
    tensors = p.peak_bytes - p.context_bytes
    row = {"batch": 2, "checkpointing": True, "oom": False, "sec_per_step": 2 * p.seconds_per_sample,
           "peak_bytes": 1.1 * tensors}
    B.add_plan(row, B.FULL, "H100")
    assert math.isclose(row["prediction_error"], 0.1)
    assert math.isclose(row["hfu"], 1.0)  # at the planner's floor time, hardware utilisation is 100%
    assert math.isclose(row["mfu"], (p.flops_forward + p.flops_backward) / p.flops_total)
    assert row["mfu"] < row["hfu"] and row["predicted_fits"] is True
    oom = B.add_plan({"batch": 2, "checkpointing": False, "oom": True, "peak_bytes": 0.0}, B.FULL, "L40S")
    assert oom["predicted_fits"] is False and "mfu" not in oom
    # partial checkpointing interpolates per block: keeping every block is the no-checkpointing plan
    off = P.plan(768, 1024, 1, rank=16, targets="attention+ff", gradient_checkpointing=False, gpu="H100")
    keep_all = B.add_plan({"batch": 1, "checkpointing": True, "recomputed_blocks": 0, "oom": False,
                           "sec_per_step": 1.0, "peak_bytes": 1.0}, B.FULL, "H100")
    assert math.isclose(keep_all["predicted_peak_bytes"], off.peak_bytes)
    assert math.isclose(keep_all["hfu"], keep_all["mfu"])  # nothing recomputed


def test_full_size_on_cpu_is_refused_with_a_pointer_to_tiny(capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--device", "cpu"])
    assert e.value.code == 2
    assert "--tiny" in capsys.readouterr().err
    assert B.planner_gpu("NVIDIA H100 80GB HBM3") == "H100" and B.planner_gpu("NVIDIA L40S") == "L40S"
    assert B.planner_gpu("Tesla T4") is None
