"""The training math of CatVTON-Flux: latent packing, the Fill conditioning, timesteps, noise, loss.

Pure functions on tensors: no Ray, no I/O, no model. Everything random takes a ``torch.Generator``
so that a test (or a resumed run) gets the same numbers. The conventions are exactly those of
diffusers' ``FluxFillPipeline`` (0.42), so a transformer trained with these functions works in
that pipeline unchanged:

- latents are VAE latents normalised as ``(raw - shift_factor) * scaling_factor``;
- a latent ``(B, 16, h, w)`` is packed 2x2 into ``(B, h/2 * w/2, 64)`` tokens, row-major;
- the transformer input is ``cat(noisy 64, masked-image latent 64, mask 256)`` = 384 channels;
- ``img_ids`` are ``[0, row, col]`` of each token, ``txt_ids`` zeros;
- the pipeline's scheduler timesteps are ``sigma * 1000`` and it calls the transformer with
  ``timestep / 1000``: **the transformer's ``timestep`` argument is sigma itself**, in (0, 1);
- guidance is a float32 tensor of shape ``(B,)`` (1.0 in CatVTON-Flux training, 30 at inference).

Shapes used below: ``B`` batch, ``H, W`` pixel sizes of the whole canvas ([garment | person]
along width), ``h = H/8, w = W/8`` latent sizes, ``S = h/2 * w/2`` packed image tokens.

One training step, in these terms::

    x0 = pack_latents(normalize_latents(vae_raw, shift, scale))          # (B, S, 64)
    noise = torch.randn(x0.shape, generator=g)
    s = sample_sigmas(B, g)                                              # (B,)
    xt = add_noise(x0, noise, s)
    inp = fill_input(xt, pack_latents(masked_latent), pack_mask(mask))   # (B, S, 384)
    pred = transformer(hidden_states=inp, timestep=s, guidance=guidance_tensor(1.0, B), ...)
    loss = flow_loss(pred, flow_target(x0, noise), token_region_weights(mask, "canvas", h, w))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

VAE_SCALE = 8
"""Pixels per latent cell along each side (the FLUX VAE)."""

PATCH = 2 * VAE_SCALE
"""Pixels per packed token along each side: 8x VAE, then 2x2 packing = 16."""

REGIONS = ("canvas", "person", "mask")


# ---------------------------------------------------------------------------------------------
# Latent normalisation and packing


def normalize_latents(raw: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """VAE latent -> model space: ``(raw - shift_factor) * scaling_factor`` (any shape)."""
    return (raw - shift_factor) * scaling_factor


def denormalize_latents(x: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Model space -> VAE latent, the inverse of :func:`normalize_latents`."""
    return x / scaling_factor + shift_factor


def _check_even(h: int, w: int, what: str) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"{what} {h}x{w} must be even to pack 2x2 (pixel sizes a multiple of 16)")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B, h/2 * w/2, 4C)``: each 2x2 latent patch becomes one token.

    Tokens are in row-major order of the patches; a token's channels are ``c * 4 + dy * 2 + dx``
    (as ``FluxPipeline._pack_latents``). ``h, w`` are latent sizes and must be even.
    """
    b, c, h, w = x.shape
    _check_even(h, w, "latent size")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, h/2 * w/2, 4C) -> (B, C, h, w)``, the inverse of :func:`pack_latents`.

    ``h, w`` are LATENT sizes (pixels / 8), unlike ``FluxPipeline._unpack_latents`` which takes
    pixel sizes and the VAE scale factor.
    """
    b, s, c4 = packed.shape
    _check_even(h, w, "latent size")
    if s != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not fit a {h}x{w} latent")
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(h/2 * w/2, 3)`` position ids ``[0, row, col]`` of the packed tokens of an ``h x w`` latent.

    Equal to ``FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, ...)``; ``h, w`` are
    latent sizes (before packing).
    """
    _check_even(h, w, "latent size")
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(n_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n_tokens, 3)`` zeros: FLUX gives text tokens no position in the rotary embedding."""
    return torch.zeros(n_tokens, 3, device=device, dtype=dtype)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pixel mask ``(B, 1, H, W)`` (1 = inpaint) -> ``(B, S, 256)`` as ``FluxFillPipeline`` builds it.

    Each 8x8 pixel cell of the mask becomes 64 channels of one latent cell (``b (h 8) (w 8) ->
    b (8 8) h w``, channel ``dy * 8 + dx``), then the ``(B, 64, h, w)`` result is packed 2x2 like
    a latent: 256 channels a token. The mask is not thresholded or resized here.
    """
    b, one, hh, ww = mask.shape
    if one != 1 or hh % PATCH or ww % PATCH:
        raise ValueError(f"mask {tuple(mask.shape)}: expected (B, 1, H, W) with H, W multiples of {PATCH}")
    h, w = hh // VAE_SCALE, ww // VAE_SCALE
    m = mask[:, 0].reshape(b, h, VAE_SCALE, w, VAE_SCALE).permute(0, 2, 4, 1, 3)
    return pack_latents(m.reshape(b, VAE_SCALE * VAE_SCALE, h, w))


def fill_input(noisy_packed: torch.Tensor, masked_packed: torch.Tensor, mask_packed: torch.Tensor) -> torch.Tensor:
    """The Fill transformer's ``hidden_states``: ``(B,S,64) + (B,S,64) + (B,S,256) -> (B,S,384)``.

    Channel order as the pipeline: noisy latent, masked-image latent, mask.
    """
    if not (noisy_packed.shape[:2] == masked_packed.shape[:2] == mask_packed.shape[:2]):
        raise ValueError(
            f"fill_input: token shapes differ: noisy {tuple(noisy_packed.shape)}, masked "
            f"{tuple(masked_packed.shape)}, mask {tuple(mask_packed.shape)}"
        )
    return torch.cat((noisy_packed, masked_packed, mask_packed.to(noisy_packed.dtype)), dim=-1)


def guidance_tensor(value: float, batch: int, device=None) -> torch.Tensor:
    """``(B,)`` float32 guidance, as the pipeline passes it (1.0 in training, 30 at inference)."""
    return torch.full((batch,), float(value), device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Timesteps (sigmas) and noise

_EPS = 1e-5


def _time_shift(sigmas: torch.Tensor, exp_mu: float) -> torch.Tensor:
    # exp(mu) / (exp(mu) + (1/sigma - 1)), written as a ratio that is exact at sigma = 1
    return exp_mu * sigmas / (1.0 + (exp_mu - 1.0) * sigmas)


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    mode: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float | None = None,
    device=None,
) -> torch.Tensor:
    """``(B,)`` noise levels sigma in (0, 1) (1 = pure noise), float32.

    ``uniform`` (CatVTON-Flux's script) or ``logit_normal`` (``sigmoid(N(mean, std))``, SD3).
    ``shift``, if given, applies the static shift ``s*sigma / (1 + (s-1)*sigma)`` (s > 1 puts
    more samples at high noise); for FLUX's resolution-dependent shift see :func:`flux_shift`.
    Drawn on the generator's device, then moved to ``device``. Clamped to ``[1e-5, 1 - 1e-5]``.
    """
    gdev = generator.device
    if mode == "uniform":
        s = torch.rand(batch, generator=generator, device=gdev)
    elif mode == "logit_normal":
        z = torch.randn(batch, generator=generator, device=gdev)
        s = torch.sigmoid(z * logit_std + logit_mean)
    else:
        raise ValueError(f"sample_sigmas: mode={mode!r}; choose uniform or logit_normal")
    if shift is not None:
        if shift <= 0:
            raise ValueError(f"sample_sigmas: shift={shift} must be positive")
        s = _time_shift(s, float(shift))
    return s.clamp(_EPS, 1.0 - _EPS).to(device=device if device is not None else gdev)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` of FLUX's time shift: linear in the image token count (diffusers ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_shift(sigmas: torch.Tensor, image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
               base_shift: float = 0.5, max_shift: float = 1.15) -> torch.Tensor:
    """FLUX's resolution-dependent shift: ``exp(mu) / (exp(mu) + (1/sigma - 1))`` (any shape).

    The same map as the scheduler's exponential ``time_shift(mu, 1.0, sigma)`` with ``mu`` from
    :func:`flux_mu`: more tokens, more noise. A 768x1024 canvas pair has 6,144 image tokens
    (mu ~ 1.41, past ``max_seq_len``: the line is extrapolated, as diffusers does).
    """
    mu = flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    return _time_shift(sigmas, math.exp(mu))


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(f"sigmas {tuple(sigmas.shape)} must be (B,) for a batch of {like.shape[0]}")
    return sigmas.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Rectified flow: ``x_t = (1 - s) * x0 + s * noise``; ``sigmas (B,)`` broadcast over the rest."""
    s = _per_sample(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer predicts: ``noise - x0`` (d x_t / d s)."""
    return noise - x0


# ---------------------------------------------------------------------------------------------
# Loss


def token_region_weights(mask_pixels: torch.Tensor, region: str, h_lat: int, w_lat: int) -> torch.Tensor:
    """``(B, S)`` weight of each packed token (row-major, S = h_lat/2 * w_lat/2) in the loss.

    - ``canvas``: all ones, the whole [garment | person] canvas (as CatVTON-Flux trains);
    - ``person``: 1 on tokens of the right half (the person), 0 on the garment half;
    - ``mask``: the fraction of each token's 16x16-pixel patch covered by the mask.

    ``mask_pixels (B, 1, H, W)`` is the canvas mask in {0, 1} with ``H = 8 h_lat``, ``W = 8 w_lat``.
    """
    b = mask_pixels.shape[0]
    _check_even(h_lat, w_lat, "latent size")
    th, tw = h_lat // 2, w_lat // 2
    if tuple(mask_pixels.shape[1:]) != (1, h_lat * VAE_SCALE, w_lat * VAE_SCALE):
        raise ValueError(
            f"mask {tuple(mask_pixels.shape)} does not match a {h_lat}x{w_lat} latent "
            f"(expected (B, 1, {h_lat * VAE_SCALE}, {w_lat * VAE_SCALE}))"
        )
    dev = mask_pixels.device
    if region == "canvas":
        return torch.ones(b, th * tw, device=dev)
    if region == "person":
        if tw % 2:
            raise ValueError(f"{tw} token columns cannot be split into two equal halves")
        w = torch.zeros(th, tw, device=dev)
        w[:, tw // 2:] = 1.0
        return w.reshape(1, -1).expand(b, -1).clone()
    if region == "mask":
        cover = F.avg_pool2d(mask_pixels.float(), kernel_size=PATCH)  # (B, 1, th, tw)
        return cover.reshape(b, th * tw)
    raise ValueError(f"token_region_weights: region={region!r}; choose from {list(REGIONS)}")


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over ``(B, S, C)``, in float32; weighted per token when ``weights (B, S)``.

    Weighted: ``sum_bsc w_bs (pred - target)^2 / (C * sum_bs w_bs)``, so all-ones weights give the
    plain mean. A batch whose weights are all zero gives 0 (no gradient); the data stage rejects
    empty masks before that can happen.
    """
    if pred.shape != target.shape:
        raise ValueError(f"flow_loss: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    err = (pred.float() - target.float()).pow(2)
    if weights is None:
        return err.mean()
    if weights.shape != pred.shape[:2]:
        raise ValueError(f"flow_loss: weights {tuple(weights.shape)} must be {tuple(pred.shape[:2])}")
    w = weights.float()
    return (err.sum(-1) * w).sum() / (w.sum() * pred.shape[-1]).clamp_min(1e-12)
