"""Rerunning a run name with another schedule (issue 11, item 10): ``easy_train.py full --epochs 1``
after the 1000-step demo printed ``resumed from step 1000 of 144``, trained nothing and exported the
demo's LoRA as the new run. A checkpoint now records the length its run planned; a rerun continues
to a new length that lies ahead of it, and is refused, saying what to do, when the checkpoint is
already at or past the new end. Unit level: checkpoints written with ``save_checkpoint`` on the
tiny base, no Ray (``tests/test_train.py`` runs the same through ``job.fit``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from catvton import artifacts
from catvton.config import load_config
from catvton.train.checkpoint import ModelChanged, ScheduleChanged, load_checkpoint, model_change, resume_note, save_checkpoint
from catvton.train.engine import build_transformer, make_optimizer, trainable_parameters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    from catvton.offline.tiny_base import ensure_tiny_base

    c = load_config(ROOT / "configs" / "tiny.yaml", ["model.transformer_override=null", "lora.rank=4", "lora.alpha=8.0"])
    c.model.base = str(ensure_tiny_base())
    return c  # run.name tiny-lora, storage outputs/ray, lr 4e-3, 20 warmup steps, cosine


def training(cfg, total: int, seed: int):
    torch.manual_seed(seed)
    model = build_transformer(cfg, torch.device("cpu"), torch.float32)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(cfg, params, total)
    return model, params, optimizer, scheduler, torch.Generator().manual_seed(seed)


def saved_run(cfg, folder: Path, step: int, total: int) -> dict[str, torch.Tensor]:
    """A checkpoint at ``step`` of a run that planned ``total`` steps; returns its LoRA weights."""
    model, params, optimizer, scheduler, generator = training(cfg, total, seed=0)
    with torch.no_grad():  # trained-looking weights (B is zero at init) and Adam moments
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
            p.grad = torch.randn_like(p)
    optimizer.step()
    for _ in range(step):
        scheduler.step()
    save_checkpoint(folder, model, optimizer, scheduler, step, [{"step": step, "loss": 0.5}], cfg, generator, total)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_shorter_schedule_than_the_saved_step_is_refused_before_anything_is_restored(cfg, tmp_path):
    saved_run(cfg, tmp_path / "ckpt", step=1000, total=1000)  # the demo: 1000 steps
    model, _, optimizer, scheduler, generator = training(cfg, 144, seed=1)  # full --epochs 1: 144 steps
    before = lora_weights(model)
    with pytest.raises(ScheduleChanged) as refused:
        load_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, cfg, generator, total=144)
    assert str(refused.value) == (
        "run.name=tiny-lora has a checkpoint at step 1000 of 1000 planned (under outputs/ray/tiny-lora), and this "
        "config plans 144 steps: resuming would train nothing and present that run as this one. Give this run a new "
        "name (--set run.name=tiny-lora-144), or, to train this name again from step 0, delete outputs/ray/tiny-lora")
    after = lora_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the new run's weights were left alone"
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0


def test_a_longer_schedule_continues_from_the_saved_step_on_the_new_schedule(cfg, tmp_path):
    weights = saved_run(cfg, tmp_path / "ckpt", step=600, total=1000)
    model, params, optimizer, scheduler, generator = training(cfg, 2000, seed=1)
    step, history, note = load_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, cfg, generator, total=2000)
    assert (step, history) == (600, [{"step": 600, "loss": 0.5}])
    assert note == "resumed from step 600 (the saved run planned 1000 steps; it continues on this config's schedule)"
    restored = lora_weights(model)
    assert all(torch.equal(weights[k], restored[k]) for k in weights)
    assert len(optimizer.state_dict()["state"]) == len(params), "Adam's moments restored"
    # the next step's learning rate follows the cosine over 2000 steps (warmup 20), not over 1000
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()

    def cosine(total: int) -> float:
        return cfg.train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (601 - 20) / (total - 20))))

    assert scheduler.get_last_lr()[0] == pytest.approx(cosine(2000), rel=1e-9)
    assert abs(cosine(2000) - cosine(1000)) > 0.1 * cfg.train.lr


@pytest.mark.parametrize("saved_step, saved_total, total, expected", [
    (600, 1000, 1000, "resumed from step 600"),  # a worker failure: the same run goes on
    (1000, 1000, 1000, "resumed from step 1000"),  # the same finished run again: nothing to train, same run
    (600, 1000, 700, "resumed from step 600 (the saved run planned 1000 steps; it continues on this config's schedule)"),
    (144, 1000, 144, ScheduleChanged),  # step 144 of a 1000-step plan is not a 144-step run
    (1000, 1000, 144, ScheduleChanged),
    (600, None, 1000, "resumed from step 600"),  # a checkpoint that did not record its plan
    (1000, None, 144, ScheduleChanged),  # ... is refused when past the new end
])
def test_what_a_rerun_does_with_each_saved_schedule(cfg, saved_step, saved_total, total, expected):
    if expected is ScheduleChanged:
        with pytest.raises(ScheduleChanged, match=rf"checkpoint at step {saved_step}\b.*plans {total} steps"):
            resume_note(saved_step, saved_total, total, cfg)
    else:
        assert resume_note(saved_step, saved_total, total, cfg) == expected


def test_a_checkpoint_records_the_length_its_run_planned(cfg, tmp_path):
    saved_run(cfg, tmp_path / "ckpt", step=10, total=144)
    state = artifacts.load_training_state(tmp_path / "ckpt")
    assert (state["step"], state["total_steps"]) == (10, 144)


def test_a_checkpoint_of_another_model_is_refused_before_anything_is_restored(cfg, tmp_path):
    """A run name whose checkpoint trained another model (here: another LoRA rank; in the field: a
    tiny base rebuilt wider, an upgraded alpha) is refused with what to do, not a shape error from
    deep inside a Ray worker."""
    import json

    saved_run(cfg, tmp_path / "ckpt", step=600, total=1000)
    wider = load_config(ROOT / "configs" / "tiny.yaml", ["model.transformer_override=null", "lora.rank=8",
                                                         "lora.alpha=16.0"])
    wider.model.base = cfg.model.base
    model, _, optimizer, scheduler, generator = training(wider, 1000, seed=1)
    before = lora_weights(model)
    with pytest.raises(ModelChanged) as refused:
        load_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, wider, generator, total=1000)
    assert str(refused.value) == (
        "run.name=tiny-lora has a checkpoint of another model (under outputs/ray/tiny-lora; lora.rank: 4 then, 8 now): "
        "its weights cannot continue this run. Give this run a new name (--set run.name=tiny-lora-2), or, to train "
        "this name again from step 0, delete outputs/ray/tiny-lora")
    assert all(torch.equal(before[k], v) for k, v in lora_weights(model).items())

    saved = json.loads((tmp_path / "ckpt" / artifacts.CHECKPOINT_CONFIG).read_text())
    assert model_change(saved, cfg) == []  # the same model resumes
    other_base = json.loads(json.dumps(saved))
    other_base["model"]["base"] = str(tmp_path / "tiny-base-000000000000")  # a base built by other code
    (tmp_path / "tiny-base-000000000000").mkdir()
    assert model_change(other_base, cfg) == [f"model.base: tiny-base-000000000000 then, {Path(cfg.model.base).name} now"]
    moved = json.loads(json.dumps(saved))
    moved["model"]["base"] = "/elsewhere/cache/" + Path(cfg.model.base).name  # the same base, another machine
    assert model_change(moved, cfg) == []
