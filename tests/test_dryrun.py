"""The dry run of the GPU job (``python -m catvton.train.dryrun``) at reduced depth: FLUX.1-Fill-dev's
full width and the production canvas (768x1024 a half, 6,656 tokens), 1 double + 1 single block.

- the job's stages run on ``meta`` end to end (the production config, the production serve config);
- a CPU tensor planted in the step stops it, naming the planted file and line;
- the fake-tensor measurement counts what the model holds (parameters to the byte, AdamW's two
  moments) and agrees with the planner's FLOPs, which are arithmetic from the layer shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catvton.config import load_config
from catvton.model.skeleton import write_skeleton
from catvton.train import dryrun
from catvton.train.full_size import dry_config, text_embeds
from catvton.train.measure import measure_step
from catvton.train.planner import plan

ROOT = Path(__file__).resolve().parents[1]
L40S = ROOT / "configs" / "l40s.yaml"


def test_the_production_job_and_replica_run_on_meta_at_full_width(tmp_path):
    out = tmp_path / "dry.json"
    assert dryrun.main(["--config", str(L40S), "--blocks", "1", "1", "--placement-only", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "failed" not in result
    placement = result["placement"]
    cfg = load_config(L40S)
    # FLUX.1-Fill-dev's width with 1 + 1 blocks, and the production LoRA (r16, attention + ff) on it
    p = plan(cfg.canvas.half_width, cfg.canvas.half_height, 1, rank=cfg.lora.rank, targets=cfg.lora.targets,
             model=_one_plus_one())
    assert placement["params"] == p.params_total + p.params_trainable
    assert placement["trainable_params"] == p.params_trainable
    assert placement["serve_max_batch"] >= 1  # the Serve replica's try-on ran at batch 1 and its max batch


def _one_plus_one():
    from catvton.train.planner import FULL_SIZE, PlannedModel

    config = json.loads(FULL_SIZE.config_json)
    config.update(num_layers=1, num_single_layers=1)
    return PlannedModel("FLUX.1-Fill-dev 1+1", "test", json.dumps(config, sort_keys=True))


def _planted_copy(tmp_path: Path, module: str, anchor: str, line: str) -> tuple[Path, int]:
    """The repository's code in ``tmp_path`` with ``line`` inserted after ``anchor`` in ``module``;
    returns the copy and the planted line's number."""
    for name in ("catvton", "configs", "serve"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / module
    lines = path.read_text().splitlines()
    at = next(i for i, text in enumerate(lines) if anchor in text)
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())] if "def " not in lines[at] else \
        lines[at + 1][: len(lines[at + 1]) - len(lines[at + 1].lstrip())]
    lines.insert(at + 1, indent + line)
    path.write_text("\n".join(lines) + "\n")
    return tmp_path, at + 2


@pytest.mark.parametrize("module, anchor, planted", [
    # the example: a CPU tensor in the noising of every step
    ("catvton/train/flow.py", "def add_noise(", "x0 = x0 * torch.ones(1, 1, 1)"),
    # a CPU tensor in the serving path only (the sample grid and the Serve replica's fill); slow: the
    # default tier keeps one planted case, this one's subprocess costs ~40 s more
    pytest.param("catvton/infer/tryon.py", "n, h, w2, _ = canvases.shape", "torch.ones(1, 1, 1) * self.prompt_embeds",
                 marks=pytest.mark.slow),
])
def test_a_cpu_tensor_planted_in_the_job_stops_the_dry_run_at_its_line(tmp_path, module, anchor, planted):
    copy, line = _planted_copy(tmp_path, module, anchor, planted)
    env = {**os.environ, "PYTHONPATH": str(copy)}
    r = subprocess.run([sys.executable, "-m", "catvton.train.dryrun", "--config", str(copy / "configs/l40s.yaml"),
                        "--blocks", "1", "1", "--placement-only"], cwd=copy, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"at {module}:{line} in " in r.stderr, r.stderr[-3000:]
    assert "is not on the expected device" in r.stderr or "same device" in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry")
    base = write_skeleton(tmp / "flux-fill", (1, 1))
    return dry_config(load_config(L40S), base, tmp), base


@pytest.mark.slow  # four fake full-width steps, ~1 min (default tier budget)
def test_the_fake_step_counts_the_models_bytes_and_the_planners_flops(skeleton):
    cfg, base = skeleton
    # two micro-batches: the second runs with the first's gradients resident, as every step but the first
    row = measure_step(cfg, batch=1, rank=16, checkpointing=True, accum=2)
    from catvton.model.loading import weightless
    from catvton.train.engine import build_transformer

    with weightless():
        model = build_transformer(cfg, torch.device("meta"), torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert row.categories["parameters"] == weights  # bf16 base + fp32 LoRA, to the byte
    # AdamW: exp_avg and exp_avg_sq in fp32 per trainable parameter, plus a step counter each
    assert 8 * trainable <= row.categories["optimizer"] <= 8 * trainable + 64 * len(list(model.parameters()))
    assert row.categories["gradients"] == 4 * trainable  # fp32 LoRA gradients
    p = plan(cfg.canvas.half_width, cfg.canvas.half_height, 1, rank=16, targets=cfg.lora.targets, model=_one_plus_one())
    planned = 2 * (p.flops_forward + p.flops_backward + p.flops_recompute)  # two micro-batches
    assert abs(row.flops / planned - 1) < 0.10, (row.flops, planned)
    # without checkpointing the step recomputes nothing: the forward's FLOPs fewer
    off = measure_step(cfg, batch=1, rank=16, checkpointing=False, accum=2)
    assert abs((row.flops - off.flops) / (2 * p.flops_forward) - 1) < 0.10


def test_rank0s_sample_grid_decodes_one_image_at_a_time_on_a_gpu(skeleton):
    """Measured: the grid's 4 canvases at 1536x1024 through an unsliced VAE held 9.7 GB of
    activations beside the training state (1+1 blocks), 4.6 GB sliced."""
    from catvton.infer.tryon import TryOn
    from catvton.model.loading import weightless
    from catvton.train.engine import build_transformer

    cfg, base = skeleton
    g = torch.Generator().manual_seed(0)
    with weightless():
        model = build_transformer(cfg, torch.device("meta"), torch.bfloat16)
        tryon = TryOn.from_parts(cfg, model, text_embeds(cfg, g, 4096, 768))
    assert tryon.pipe.vae.use_slicing
    assert tryon.prompt_embeds.device.type == "meta" and tryon.prompt_embeds.dtype == torch.bfloat16
