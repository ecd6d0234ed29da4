"""The Ray Train LoRA loop: diffusers-format LoRA round trip, DDP agreement, failure and resume.

Mechanics tests train the tiny base's own transformer (no alpha) on a small latent cache built
into a temporary root; the learning test (marker ``slow``) runs the default job. Faults and weight
dumps are injected through ``fit(worker_hooks=...)`` (``tests/train_hooks.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import train_hooks
from conftest import SMALL_DATA
from catvton import artifacts
from catvton.config import load_config
from catvton.offline import resolve
from catvton.train import engine as S
from catvton.train.checkpoint import save_weights

ROOT = Path(__file__).resolve().parents[1]
SMALL = [*SMALL_DATA, "train.batch_size=4", "train.warmup_steps=2"]  # conftest's data: its session cache


def small_cfg(tmp: Path, *extra: str):
    cfg = load_config(ROOT / "configs/tiny.yaml", SMALL + [f"run.storage_path={tmp / 'ray'}",
                                                           f"run.output_dir={tmp / 'out'}",
                                                           "run.wandb_mode=disabled", *extra])
    return resolve(cfg)  # the tiny base and the 40-pid synthetic set (no alpha: the override is null)


def test_saved_lora_loads_into_plain_diffusers_and_reproduces_the_model(tmp_path):
    """save_weights -> FluxFillPipeline.load_lora_weights gives the same transformer outputs and
    the same try-on images as the in-memory trained model (alpha survives the round trip)."""
    from diffusers import FluxFillPipeline

    from catvton.data.canvas import to_uint8
    from catvton.infer.tryon import TryOn

    cfg = small_cfg(tmp_path, "lora.rank=4", "lora.alpha=12.0")  # alpha/rank = 3: a dropped alpha would show
    torch.manual_seed(0)
    model = S.build_transformer(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # a trained-looking LoRA: B is zero at init
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    save_weights(model, tmp_path / "lora", cfg)
    assert (tmp_path / "lora" / artifacts.LORA_WEIGHTS).is_file()

    pipe = FluxFillPipeline.from_pretrained(cfg.model.base)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.set_progress_bar_config(disable=True)
    plain = pipe.transformer.eval()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / artifacts.LORA_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert not any(k.startswith("transformer.proj_out") for k in keys), "the final proj_out is never a target"

    g = torch.Generator().manual_seed(1)
    S_tok, T = 6 * 4, 8
    kwargs = dict(hidden_states=torch.randn(2, S_tok, 384, generator=g), timestep=torch.tensor([0.3, 0.8]),
                  guidance=torch.ones(2), pooled_projections=torch.randn(2, 32, generator=g),
                  encoder_hidden_states=torch.randn(2, T, 32, generator=g),
                  txt_ids=torch.zeros(T, 3), img_ids=torch.rand(S_tok, 3), return_dict=False)
    with torch.no_grad():
        ours, theirs = model(**kwargs)[0], plain(**kwargs)[0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()

    # the whole try-on through both pipelines: identical images for the same seed
    rng = np.random.default_rng(0)
    canvas = rng.random((1, 64, 96, 3)).astype(np.float32)
    mask = np.zeros((1, 64, 96), np.float32)
    mask[:, 16:56, 56:88] = 1
    a = TryOn.from_parts(cfg, transformer=model).fill_canvases(canvas, mask, steps=2)
    b = TryOn(pipe, *TryOn.from_parts(cfg, transformer=model).pipe.encode_prompt(
        cfg.model.prompt, prompt_2=None, max_sequence_length=cfg.model.max_sequence_length)[:2], cfg
    ).fill_canvases(canvas, mask, steps=2)
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()  # float32 rounding only
    # the same 8-bit image, but for a value that float rounding puts across a rounding boundary
    assert np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max() <= 1, "the same 8-bit image"
    # and the LoRA changes the output: it is not silently dropped
    pipe.unload_lora_weights()
    c = TryOn(pipe, *pipe.encode_prompt(cfg.model.prompt, prompt_2=None,
                                        max_sequence_length=cfg.model.max_sequence_length)[:2], cfg
              ).fill_canvases(canvas, mask, steps=2)
    assert np.abs(a - c).max() > 1e-3
    # outside the mask the output is exactly the input (pasted back)
    assert np.array_equal(a[mask == 0], canvas[mask == 0])


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, small_latent_cache):
    """The session's small latent cache (conftest): this module's data is its data."""
    from catvton.cache.build import cache_dir

    folder, root = small_latent_cache
    assert folder == cache_dir(small_cfg(tmp_path_factory.mktemp("train-cache")), root)
    return folder


def test_the_text_encoder_watch_catches_an_encoder_that_is_built(tmp_path):
    """The negative control of test_default_job's sample-grid check (no text encoder in a worker):
    a try-on built without cached prompt embeddings builds CLIP and T5, and the watch, installed as
    a worker installs it (unpickling the hook), records both."""
    import pickle

    from catvton.infer.tryon import TryOn

    watched = tmp_path / "text-encoders"
    cfg = small_cfg(tmp_path)
    pickle.loads(pickle.dumps(train_hooks.WatchTextEncoders(watched)))  # a worker's unpickling installs it
    TryOn.from_parts(cfg, transformer=S.build_transformer(cfg, torch.device("cpu"), torch.float32))
    (record,) = watched.glob("*.txt")
    assert sorted(record.read_text().split()) == sorted(train_hooks.TEXT_ENCODERS)


@pytest.mark.ray
def test_every_epoch_reads_all_pairs_in_a_fresh_global_order(small_cache):
    """The workers' split (Ray Train executes it once an epoch) gives every training pair once per
    epoch, in a different order each epoch, mixed across people from the first batch on; the
    cache itself is written in pid order (issue 11, item 5)."""
    from catvton.cache.read import split_files
    from catvton.train.job import training_dataset

    import pyarrow.parquet as pq

    on_disk = [(p, q) for p, q in zip(*pq.read_table(split_files(small_cache, "train"),
                                                     columns=["pid", "person_pose"]).to_pydict().values())]
    (shard,) = training_dataset(small_cache, seed=0, materialize=True).streaming_split(1, equal=True)
    epochs = []
    for _ in range(2):
        rows = []
        for b in shard.iter_batches(batch_size=4, batch_format="numpy"):
            rows += list(zip(b["pid"].tolist(), b["person_pose"].tolist()))
        epochs.append(rows)
    first, second = epochs
    assert sorted(first) == sorted(second) == sorted(on_disk) and len(first) == len(on_disk) > 20
    assert first != second, "a fresh order each epoch"
    assert first != on_disk and second != on_disk
    people = len({p for p, _ in on_disk})
    # pid order would put the first 8 pairs on ~2 people; a global shuffle spreads them
    assert len({p for p, _ in first[:8]}) >= min(5, people), first[:8]

@pytest.mark.ray
@pytest.mark.slow  # two fits and a restart (~2-3 min); the restore itself: tests/test_train_state.py,
# tests/test_resume_schedule.py; a lost worker through the job: the rehearsal tier
def test_a_worker_failure_is_survived_and_a_rerun_resumes(tmp_path, small_cache):
    from catvton.train.job import checkpoint_state, fit

    cfg = small_cfg(tmp_path, "train.max_steps=12", "train.checkpoint_every=4", "train.val_every=4",
                    "train.val_batches=1", "train.max_failures=2", "run.name=faulty")
    train_hooks.by_value()
    outcome = fit(cfg, small_cache, log_every=5, worker_hooks=train_hooks.FailOnce(step=6))
    assert (outcome.run_dir / train_hooks.FAULT_MARKER).is_file(), "the failure really happened"
    assert outcome.metrics["step"] == 12
    state = checkpoint_state(outcome.checkpoint)
    steps = [h["step"] for h in state["history"]]
    # continuous, no repeats, nothing lost: step 0's validation, then every report of the schedule
    # (val and checkpoint every 4, metrics every 5, the last step); step 5 was re-run after the restart
    assert steps == [0, 4, 5, 8, 10, 12], steps
    assert all(np.isfinite(h["loss"]) for h in state["history"] if "loss" in h)
    assert (outcome.run_dir / "loss_curve.png").stat().st_size > 5000
    # restarted from the step-4 checkpoint, not from 0 (which would give the same history)
    resumes = (outcome.run_dir / "resumes.log").read_text().splitlines()
    assert resumes == ["resumed from step 4"], resumes

    # the same name again: resumes from step 12 instead of starting over
    checkpoints_before = sorted(p.name for p in (tmp_path / "ray" / "faulty").glob("checkpoint_*"))
    again = fit(cfg, small_cache)
    assert checkpoint_state(again.checkpoint)["step"] == 12
    checkpoints_after = sorted(p.name for p in (tmp_path / "ray" / "faulty").glob("checkpoint_*"))
    assert checkpoints_after == checkpoints_before, "no new training happened"
    assert (again.run_dir / "resumes.log").read_text().splitlines()[-1] == "resumed from step 12"


@pytest.mark.ray
@pytest.mark.slow  # three fits (~1 min); the decision is unit-tested in tests/test_resume_schedule.py
def test_a_rerun_with_another_schedule_is_refused_or_continues_never_passed_off(tmp_path, small_cache):
    """A name rerun with a schedule that ends before its checkpoint: refused with what to do, the
    exported LoRA untouched; with a longer schedule: trains on from the checkpoint to the new end
    (issue 11, item 10; the decision itself: tests/test_resume_schedule.py)."""
    from catvton.train.checkpoint import ScheduleChanged
    from catvton.train.job import checkpoint_state, fit

    common = ("train.checkpoint_every=4", "train.val_every=4", "train.val_batches=1", "run.name=rerun")
    first = fit(small_cfg(tmp_path, "train.max_steps=4", *common), small_cache)
    assert first.metrics["step"] == 4
    exported = (first.weights_dir / artifacts.LORA_WEIGHTS).read_bytes()

    with pytest.raises(ScheduleChanged, match=r"checkpoint at step 4 of 4 planned .* this config plans 2 steps.*"
                                              r"--set run.name=rerun-2"):
        fit(small_cfg(tmp_path, "train.max_steps=2", *common), small_cache)
    assert (first.weights_dir / artifacts.LORA_WEIGHTS).read_bytes() == exported, "nothing exported"

    longer = fit(small_cfg(tmp_path, "train.max_steps=6", *common), small_cache, log_every=5)
    assert longer.metrics["step"] == 6
    state = checkpoint_state(longer.checkpoint)
    assert (state["step"], state["total_steps"]) == (6, 6)
    assert [h["step"] for h in state["history"]] == [0, 4, 5, 6], "steps 5 and 6 trained on top of step 4"
    assert (longer.run_dir / artifacts.RESUMES).read_text().splitlines() == [
        "resumed from step 4 (the saved run planned 4 steps; it continues on this config's schedule)"]
    assert (longer.weights_dir / artifacts.LORA_WEIGHTS).read_bytes() != exported


@pytest.mark.ray
@pytest.mark.slow  # a fit through Ray Train that diverges (~45 s); the step's own stop and message:
# tests/test_engine.py (NonFiniteLoss, non_finite_message)
def test_a_nonfinite_loss_stops_the_run_with_the_step_and_checkpoint(tmp_path, small_cache):
    from catvton.train.job import checkpoint_state, fit
    from catvton.train.engine import NonFiniteLoss

    cfg = small_cfg(tmp_path, "train.max_steps=30", "train.checkpoint_every=1", "train.val_every=50",
                    "train.lr=0.9", "train.warmup_steps=0", "train.max_grad_norm=0", "train.schedule=constant",
                    "lora.alpha=1e30", "run.name=diverge")  # alpha/rank ~ 3e28: the second step overflows
    with pytest.raises(NonFiniteLoss, match=r"at step \d+; the run stopped\. Last good checkpoint: step"):
        fit(cfg, small_cache)
