"""The training math against hand-computed values and against diffusers' own FLUX Fill code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

from catvton.train import flow


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- normalisation and packing ----------------------------------------------------------------


def test_normalize_round_trip_and_value():
    raw = torch.tensor([1.1159, -0.8841])
    x = flow.normalize_latents(raw, 0.1159, 0.3611)
    torch.testing.assert_close(x, torch.tensor([0.3611, -0.3611]))
    torch.testing.assert_close(flow.denormalize_latents(x, 0.1159, 0.3611), raw)


def test_pack_known_order():
    x = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    assert flow.pack_latents(x).tolist() == [[[0.0, 1.0, 2.0, 3.0]]]
    # two channels: a token holds channel 0's 2x2 patch, then channel 1's
    x = torch.arange(8.0).view(1, 2, 2, 2)
    assert flow.pack_latents(x).tolist() == [[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]]
    # one channel, 2x4: two tokens, left patch then right patch
    x = torch.arange(8.0).view(1, 1, 2, 4)  # [[0 1 2 3], [4 5 6 7]]
    assert flow.pack_latents(x).tolist() == [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]


def test_pack_unpack_match_diffusers_and_round_trip():
    x = torch.randn(2, 16, 6, 10, generator=gen())
    packed = flow.pack_latents(x)
    assert packed.shape == (2, 15, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(flow.unpack_latents(packed, 6, 10), x, rtol=0, atol=0)
    # diffusers' unpack takes pixel sizes
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 80, 8), x, rtol=0, atol=0)


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        flow.pack_latents(torch.zeros(1, 16, 3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        flow.unpack_latents(torch.zeros(1, 6, 64), 4, 4)


def test_latent_image_ids_hand_and_diffusers():
    ids = flow.latent_image_ids(4, 6)  # 2 x 3 tokens
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    h, w = 12, 20
    ref = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    torch.testing.assert_close(flow.latent_image_ids(h, w), ref, rtol=0, atol=0)
    assert flow.text_ids(7).shape == (7, 3) and not flow.text_ids(7).any()


def test_pack_mask_hand_positions():
    m = torch.zeros(1, 1, 16, 16)
    m[0, 0, 0, 1] = 1  # latent cell (0,0), dy=0 dx=1 -> mask channel 1; packed 1*4 + 0 = 4
    m[0, 0, 9, 2] = 1  # latent cell (1,0), dy=1 dx=2 -> mask channel 10; packed 10*4 + 1*2 + 0 = 42
    p = flow.pack_mask(m)
    assert p.shape == (1, 1, 256)
    assert p[0, 0].nonzero().flatten().tolist() == [4, 42]


def _dummy_fill_pipe():
    # Just what FluxFillPipeline.prepare_mask_latents reads from self; passing latents with
    # num_channels_latents channels as the masked image skips the VAE.
    return SimpleNamespace(
        vae_scale_factor=8,
        vae=SimpleNamespace(config=SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611)),
        _pack_latents=FluxFillPipeline._pack_latents,
    )


def test_pack_mask_matches_pipeline_prepare_mask_latents():
    g = gen(1)
    b, hh, ww = 2, 32, 64  # pixels: a 2x4 token canvas
    mask = (torch.rand(b, 1, hh, ww, generator=g) > 0.5).float()
    raw = torch.randn(b, 16, hh // 8, ww // 8, generator=g)
    ref_mask, ref_masked = FluxFillPipeline.prepare_mask_latents(
        _dummy_fill_pipe(), mask, raw, b, 16, 1, hh, ww, torch.float32, "cpu", None
    )
    torch.testing.assert_close(flow.pack_mask(mask), ref_mask, rtol=0, atol=0)
    ours = flow.pack_latents(flow.normalize_latents(raw, 0.1159, 0.3611))
    torch.testing.assert_close(ours, ref_masked)


def test_fill_input_channel_order():
    noisy, masked, mask = torch.full((1, 3, 64), 1.0), torch.full((1, 3, 64), 2.0), torch.full((1, 3, 256), 3.0)
    x = flow.fill_input(noisy, masked, mask)
    assert x.shape == (1, 3, 384)
    assert x[0, 0, :64].eq(1).all() and x[0, 0, 64:128].eq(2).all() and x[0, 0, 128:].eq(3).all()
    with pytest.raises(ValueError, match="token shapes differ"):
        flow.fill_input(noisy, masked[:, :2], mask)


def test_guidance_tensor():
    g = flow.guidance_tensor(30, 3)
    assert g.dtype == torch.float32 and g.tolist() == [30.0, 30.0, 30.0]


# --- timesteps and noise ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uniform", "logit_normal"])
def test_sigmas_deterministic_and_in_open_interval(mode):
    a = flow.sample_sigmas(1000, gen(3), mode=mode)
    b = flow.sample_sigmas(1000, gen(3), mode=mode)
    assert a.shape == (1000,) and torch.equal(a, b)
    assert not torch.equal(a, flow.sample_sigmas(1000, gen(4), mode=mode))
    assert (a > 0).all() and (a < 1).all()


def test_sigma_distributions():
    u = flow.sample_sigmas(20000, gen(0))
    assert abs(u.mean().item() - 0.5) < 0.01
    ln = flow.sample_sigmas(20000, gen(0), mode="logit_normal", logit_mean=0.5, logit_std=1.0)
    assert abs(ln.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01
    with pytest.raises(ValueError, match="mode"):
        flow.sample_sigmas(2, gen(), mode="cosine")


def test_static_shift():
    base = flow.sample_sigmas(64, gen(5))
    shifted = flow.sample_sigmas(64, gen(5), shift=3.0)
    torch.testing.assert_close(shifted, (3 * base / (1 + 2 * base)).clamp(1e-5, 1 - 1e-5))
    torch.testing.assert_close(flow.sample_sigmas(64, gen(5), shift=1.0), base)
    assert (shifted >= base).all()  # shift > 1 moves mass to high noise


def test_flux_shift_values_and_monotone():
    s = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    e = math.exp(0.5)  # mu = base_shift = 0.5 at 256 image tokens
    torch.testing.assert_close(flow.flux_shift(s, 256), e / (e + (1 / s - 1)))
    assert flow.flux_shift(torch.tensor([0.5]), 256).item() == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert flow.flux_mu(4096) == pytest.approx(1.15)
    assert flow.flux_mu(6144) == pytest.approx(calculate_shift(6144))
    out = flow.flux_shift(s, 6144)
    assert (out.diff() > 0).all()  # monotone in sigma
    assert (out > flow.flux_shift(s, 1024)).all()  # more tokens, more noise
    torch.testing.assert_close(flow.flux_shift(torch.tensor([1.0]), 6144), torch.tensor([1.0]))


def test_flux_shift_matches_the_pipeline_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    n, seq = 8, 6144
    base = np.linspace(1.0, 1 / n, n)
    sched.set_timesteps(sigmas=base, mu=calculate_shift(seq))
    ours = flow.flux_shift(torch.tensor(base, dtype=torch.float32), seq)
    torch.testing.assert_close(sched.sigmas[:-1], ours)
    # the pipeline feeds timestep / 1000 to the transformer: that is sigma
    torch.testing.assert_close(sched.timesteps / 1000, sched.sigmas[:-1])


def test_add_noise_and_target():
    x0, noise = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -2.0)
    xt = flow.add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    assert flow.add_noise(x0, noise, torch.tensor([0.25, 0.25])).eq(1.0).all()  # 0.75*2 - 0.25*2
    assert flow.flow_target(x0, noise).eq(-4.0).all()
    with pytest.raises(ValueError, match="must be"):
        flow.add_noise(x0, noise, torch.tensor([0.5]))


def test_euler_steps_with_the_true_velocity_walk_the_noising_path():
    # The pipeline's scheduler stepping with the exact target velocity lands on add_noise at the
    # next sigma, and on x0 at the end: our noising and target match the sampler.
    g = gen(7)
    x0, noise = torch.randn(1, 6, 64, generator=g), torch.randn(1, 6, 64, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5))
    x = flow.add_noise(x0, noise, sched.sigmas[:1])
    for i, t in enumerate(sched.timesteps):
        x = sched.step(flow.flow_target(x0, noise), t, x, return_dict=False)[0]
        torch.testing.assert_close(x, flow.add_noise(x0, noise, sched.sigmas[i + 1: i + 2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


# --- loss ------------------------------------------------------------------------------------


def test_flow_loss_hand_values():
    pred = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])  # squared errors: token 0 -> 1+1, token 1 -> 9+9
    target = torch.zeros_like(pred)
    assert flow.flow_loss(pred, target).item() == pytest.approx(5.0)
    assert flow.flow_loss(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(5.0)
    assert flow.flow_loss(pred, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1.0)
    assert flow.flow_loss(pred, target, torch.tensor([[3.0, 1.0]])).item() == pytest.approx((3 * 2 + 18) / 8)
    assert flow.flow_loss(pred, target, torch.zeros(1, 2)).item() == 0.0
    with pytest.raises(ValueError, match="weights"):
        flow.flow_loss(pred, target, torch.ones(2))


def test_flow_loss_bf16_computed_in_float32():
    pred = torch.full((1, 4, 8), 1.0, dtype=torch.bfloat16, requires_grad=True)
    loss = flow.flow_loss(pred, torch.zeros(1, 4, 8, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None


def test_region_weights_hand_mask():
    mask = torch.zeros(1, 1, 16, 64)  # latent 2x8 -> 1x4 tokens, canvas [garment | person]
    mask[0, 0, :, 32:48] = 1  # token 2 fully covered
    mask[0, 0, :8, 48:56] = 1  # token 3: a quarter
    assert flow.token_region_weights(mask, "canvas", 2, 8).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert flow.token_region_weights(mask, "person", 2, 8).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert flow.token_region_weights(mask, "mask", 2, 8).tolist() == [[0.0, 0.0, 1.0, 0.25]]
    with pytest.raises(ValueError, match="region"):
        flow.token_region_weights(mask, "face", 2, 8)
    with pytest.raises(ValueError, match="does not match"):
        flow.token_region_weights(mask, "mask", 4, 8)


def test_person_region_is_right_half_in_token_order():
    b, hh, ww = 2, 48, 128  # 3 x 8 tokens
    w = flow.token_region_weights(torch.zeros(b, 1, hh, ww), "person", hh // 8, ww // 8)
    grid = w.view(b, 3, 8)
    assert grid[:, :, :4].eq(0).all() and grid[:, :, 4:].eq(1).all()
    # the same tokens as packing a per-pixel "is person" map
    right = torch.zeros(b, 1, hh // 8, ww // 8)
    right[..., ww // 16:] = 1
    torch.testing.assert_close(w, flow.pack_latents(right).mean(-1))
