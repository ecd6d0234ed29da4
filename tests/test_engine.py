"""The one training step (:func:`catvton.train.engine.train_step`) on a tiny torch model:
gradient accumulation, clipping, the schedule, DDP's single all-reduce, and the non-finite policy.

A Linear layer with an MSE loss and plain SGD (lr 1), so that a parameter's change is exactly the
gradient that was applied: a wrong accumulation scale or a missing clip shows as a wrong update.
"""

from __future__ import annotations

import copy
import math
import re

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
import torch

from catvton.config import Config
from catvton.train.engine import NonFiniteLoss, make_optimizer, non_finite_message, train_step


def mse(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def setup(seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    batch = {"x": torch.randn(n, 4, generator=g), "y": torch.randn(n, 3, generator=g)}
    return model, batch


def sgd(model: torch.nn.Module, lr: float = 1.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)


def halves(batch: dict) -> list[dict]:
    n = len(batch["x"]) // 2
    return [{k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}]


def full_gradient(model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    m = copy.deepcopy(model)
    mse(m, batch).backward()
    return [p.grad.clone() for p in m.parameters()]


def update(before: torch.nn.Module, after: torch.nn.Module) -> list[torch.Tensor]:
    """What SGD at lr 1 applied: before - after = the gradient it stepped with."""
    return [(a - b).detach() for a, b in zip(before.parameters(), after.parameters())]


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def test_two_accumulated_halves_make_the_same_update_as_the_whole_batch():
    model, batch = setup()
    start = copy.deepcopy(model)
    expected = full_gradient(model, batch)
    whole, split = copy.deepcopy(model), copy.deepcopy(model)

    opt, sched = sgd(whole)
    one = train_step(whole, [batch], mse, opt, sched, list(whole.parameters()), max_grad_norm=0)
    opt, sched = sgd(split)
    two = train_step(split, halves(batch), mse, opt, sched, list(split.parameters()), max_grad_norm=0)

    for e, u1, u2 in zip(expected, update(start, whole), update(start, split)):
        assert torch.allclose(u1, e, rtol=1e-5, atol=1e-6)
        assert torch.allclose(u2, e, rtol=1e-5, atol=1e-6), (u2, e)  # not twice it: each half counts 1/2
    assert norm(expected) > 0.1, "the update is not trivially zero"
    # the reported loss is the mean over the micro-batches: the whole batch's loss for equal halves
    assert math.isclose(two.loss, one.loss, rel_tol=1e-6)
    assert math.isclose(one.loss, float(mse(start, batch).detach()), rel_tol=1e-6)
    assert math.isnan(one.grad_norm) and math.isnan(two.grad_norm), "clipping off: no norm"
    assert all(p.grad is None for p in split.parameters()), "gradients are cleared after the step"


def test_the_returned_norm_is_before_clipping_and_the_applied_gradient_is_clipped():
    model, batch = setup(seed=1)
    start = copy.deepcopy(model)
    pre_clip = norm(full_gradient(model, batch))
    assert pre_clip > 1.0

    opt, sched = sgd(model)
    result = train_step(model, halves(batch), mse, opt, sched, list(model.parameters()), max_grad_norm=0.25)

    assert math.isclose(result.grad_norm, pre_clip, rel_tol=1e-5)
    assert math.isclose(norm(update(start, model)), 0.25, rel_tol=1e-4)  # clip_grad_norm_ adds 1e-6 to the norm
    # clipping only scales: the direction is the whole batch's gradient
    applied = torch.cat([u.flatten() for u in update(start, model)])
    full = torch.cat([g.flatten() for g in full_gradient(start, batch)])
    assert torch.allclose(applied, full * 0.25 / pre_clip, rtol=1e-4, atol=1e-7)


def test_a_norm_below_the_limit_is_left_alone():
    model, batch = setup(seed=2)
    start = copy.deepcopy(model)
    pre_clip = norm(full_gradient(model, batch))
    opt, sched = sgd(model)
    result = train_step(model, [batch], mse, opt, sched, list(model.parameters()), max_grad_norm=10 * pre_clip)
    assert math.isclose(result.grad_norm, pre_clip, rel_tol=1e-5)
    assert math.isclose(norm(update(start, model)), pre_clip, rel_tol=1e-5)


def test_the_schedule_advances_once_per_step_not_per_micro_batch():
    model, batch = setup()
    cfg = Config()
    cfg.train.optimizer = "adamw"
    cfg.train.lr = 1e-2
    cfg.train.warmup_steps = 4
    params = list(model.parameters())
    opt, sched = make_optimizer(cfg, params, total_steps=100)
    assert sched.get_last_lr() == [pytest.approx(1e-2 / 4)]  # warmup step 1 of 4
    micro = halves(batch) + halves(batch)  # 4 micro-batches
    train_step(model, micro, mse, opt, sched, params, max_grad_norm=1.0)
    assert sched.last_epoch == 1
    assert sched.get_last_lr() == [pytest.approx(2e-2 / 4)]
    assert opt.state[params[0]]["step"] == 1, "one optimizer step for the four micro-batches"


def test_a_nonfinite_loss_is_returned_for_the_caller_to_stop_on():
    model, batch = setup()
    batch["y"][0, 0] = float("nan")
    opt, sched = sgd(model)
    result = train_step(model, halves(batch), mse, opt, sched, list(model.parameters()), max_grad_norm=1.0)
    assert math.isnan(result.loss)

    # the policy's message: the step, where the last good weights are, what to do
    ray_loop = non_finite_message(result.loss, 7, "step 5", storage="/runs/ray")
    assert re.search(r"at step \d+; the run stopped\. Last good checkpoint: step", ray_loop)
    assert ray_loop == ("loss became nan at step 7; the run stopped. Last good checkpoint: step 5 (under /runs/ray). "
                        "Lower train.lr or check the data.")
    assert "none yet" in non_finite_message(float("inf"), 1, "", storage="/runs/ray")
    plain = non_finite_message(float("inf"), 3)
    assert plain == "loss became inf at step 3; the run stopped. Lower train.lr or check the data."
    assert issubclass(NonFiniteLoss, RuntimeError)


def test_no_micro_batches_is_an_error():
    model, _ = setup()
    opt, sched = sgd(model)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        train_step(model, [], mse, opt, sched, list(model.parameters()), max_grad_norm=1.0)


def test_under_ddp_only_the_last_micro_batch_all_reduces(tmp_path):
    """A one-process gloo group: DDP's communication hook counts the all-reduces. Three
    micro-batches, one all-reduce, and the same update as without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model, batch = setup(n=6)
        start, plain = copy.deepcopy(model), copy.deepcopy(model)
        ddp = DistributedDataParallel(model)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(bucket.index())
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        thirds = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2, 4)]
        opt, sched = sgd(ddp.module)
        train_step(ddp, thirds, mse, opt, sched, list(ddp.module.parameters()), max_grad_norm=0)
        assert len(calls) == 1, f"{len(calls)} all-reduces for 3 micro-batches"

        opt, sched = sgd(plain)
        train_step(plain, thirds, mse, opt, sched, list(plain.parameters()), max_grad_norm=0)
        for a, b in zip(update(start, ddp.module), update(start, plain)):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_garment_free_tokens_are_the_garment_halfs_noisy_and_masked_image_latents_at_zero():
    import torch

    from catvton.config import load_config
    from catvton.infer.levers import blank_garment_tokens

    hidden = torch.randn(3, 8, 384) + 3.0  # a 2x4 token grid: columns 0-1 are the garment half
    cols = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = blank_garment_tokens(hidden, cols, torch.tensor([True, False, True]))
    assert torch.equal(out[1], hidden[1])
    for i in (0, 2):
        g = out[i, cols < 2]
        assert (g[:, :128] == 0).all() and torch.equal(g[:, 128:], hidden[i, cols < 2, 128:]), "the mask stays"
        assert torch.equal(out[i, cols >= 2], hidden[i, cols >= 2]), "the person half is left alone"
    assert (hidden != 0).all(), "the input is left alone"
    assert (blank_garment_tokens(hidden, cols)[:, cols < 2, :128] == 0).all(), "which=None: every sample"
    with pytest.raises(Exception, match="train.garment_dropout=1.0"):
        load_config(ROOT / "configs/tiny.yaml", ["train.garment_dropout=1.0"])


def test_the_training_loss_feeds_the_model_blanked_garments_at_the_dropout_rate():
    import torch

    from catvton.config import load_config
    from catvton.train.engine import TextContext, fill_loss

    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.garment_dropout=0.5"])
    seen = []

    def model(hidden_states, **kw):
        seen.append(hidden_states)
        return (torch.zeros(hidden_states.shape[0], hidden_states.shape[1], 64, requires_grad=True),)

    text = TextContext({"prompt_embeds": torch.zeros(1, 4, 32), "pooled_prompt_embeds": torch.zeros(1, 32)},
                       (4, 8), "cpu", torch.float32)
    batch = {"target": torch.randn(64, 16, 4, 8), "masked": torch.randn(64, 16, 4, 8) + 3.0,
             "mask": torch.ones(64, 1, 32, 64)}
    fill_loss(model, batch, text, cfg, torch.Generator().manual_seed(0), garment_dropout=0.5)
    fill_loss(model, batch, text, cfg, torch.Generator().manual_seed(0))  # validation: no dropout
    # packed tokens: a 2x4 grid, garment half = columns 0-1; noisy and masked-image latents: channels 0-128
    garment = seen[0].reshape(64, 2, 4, 384)[:, :, :2, :128]
    blanked = (garment == 0).flatten(1).all(1)
    assert 16 <= int(blanked.sum()) <= 48, int(blanked.sum())
    assert (seen[0].reshape(64, 2, 4, 384)[:, :, 2:, 64:128] != 0).all(), "the person half is never blanked"
    assert not (seen[1].reshape(64, 2, 4, 384)[:, :, :2, 64:128] == 0).any()
