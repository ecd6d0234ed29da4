"""The tiny base's VAE: a 4-block ``AutoencoderKL`` pre-trained on synthetic people and garment
cut-outs, because a random VAE decodes noise and nothing downstream could be judged.

Part of :mod:`catvton.offline.tiny_base` (which assembles the whole base); kept apart because
VAE training is its own concern: image sets split by pid, random crops, the loss, held-out PSNR
and the latent statistics that set ``shift_factor`` / ``scaling_factor`` as FLUX's are set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from catvton.offline.synthetic import synthetic_rows

VAE_KWARGS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 48, 48),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=128,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


# The VAE's training images: photos at the scale the tiny canvas shows people (a square photo
# cropped into a 96x128 half, configs/tiny.yaml's person_fit: crop), garment cut-outs fitted into a
# 96x128 half on white, as the canvas builder makes them.
PHOTO_SIZE = (128, 128)  # (width, height)
CUTOUT_SIZE = (96, 128)  # (width, height)
CROP = 64
VAE_STEPS = 4000
"""Training steps of the tiny base's VAE: ~5 CPU minutes. Its colours need them: measured on
held-out canvases (mean garment colour error in RGB 0-1 / an oracle's own-vs-swapped garment
margin on lower pairs, i.e. the ground truth and the swapped garment's colour through the VAE):
800 steps 0.09 / 2.7 dB (yellow came back beige, burgundy navy), 2400 steps 0.04 / 4.2 dB."""
VAE_BATCH = 8
VAE_LR = 1e-3
VAE_KL_WEIGHT = 1e-6
SYNTHETIC_IMAGE_SIZE = 256
HELDOUT_FRACTION = 0.1
MAX_EVAL_IMAGES = 96


def new_vae(seed: int):
    """The tiny VAE at its random initialisation for ``seed`` (what training starts from)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 4)
    return AutoencoderKL(**VAE_KWARGS)



# --------------------------------------------------------------------------------------------
# VAE training data: synthetic photos and garment cut-outs
# --------------------------------------------------------------------------------------------


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1], the VAE's input range."""
    import numpy as np

    a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div(127.5).sub(1.0)


def _vae_cutout(photo, mask, size: tuple[int, int] = CUTOUT_SIZE):
    """The masked garment on white, cropped to the mask's box, fitted (aspect kept) into ``size``.

    Returns None when the mask is empty (such a row has no garment to cut out).
    """
    from PIL import Image

    mask = mask.convert("L").resize(photo.size, Image.NEAREST)
    box = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        return None
    white = Image.new("RGB", photo.size, (255, 255, 255))
    cut = Image.composite(photo.convert("RGB"), white, mask).crop(box)
    w, h = cut.size
    scale = min(size[0] / w, size[1] / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(cut.resize((nw, nh), Image.BICUBIC), ((size[0] - nw) // 2, (size[1] - nh) // 2))
    return canvas


def vae_image_sets(
    synthetic_pids: int = 120, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(train, heldout)`` VAE images from synthetic rows, split by pid (no pid in both).

    Each is a list of (3, H, W) tensors in [-1, 1]: photos at 96x96 and garment cut-outs at
    96x128 (width x height). Held out: 10% of the pids (at least 2), chosen from ``seed``.
    """
    from PIL import Image

    by_pid: dict[str, list[torch.Tensor]] = {}
    for row in synthetic_rows(synthetic_pids, image_size=SYNTHETIC_IMAGE_SIZE, seed=seed):
        photo = row["images"].convert("RGB")
        images = by_pid.setdefault(str(row["pid"]), [])
        images.append(_to_tensor(photo.resize(PHOTO_SIZE, Image.BICUBIC)))
        cut = _vae_cutout(photo, row["mask"])
        if cut is not None:
            images.append(_to_tensor(cut))
    pids = sorted(by_pid)
    if len(pids) < 4:
        raise ValueError(f"synthetic_pids={synthetic_pids} gave {len(pids)} pids; need at least 4")
    random.Random(seed).shuffle(pids)
    n_held = max(2, round(HELDOUT_FRACTION * len(pids)))
    held = [t for p in pids[:n_held] for t in by_pid[p]]
    train = [t for p in pids[n_held:] for t in by_pid[p]]
    return train, held


def _random_batch(
    images: list[torch.Tensor], batch: int, crop: int, gen: torch.Generator
) -> torch.Tensor:
    """(batch, 3, crop, crop): random images, random crops, random horizontal flips."""
    out = []
    idx = torch.randint(len(images), (batch,), generator=gen).tolist()
    for i in idx:
        img = images[i]
        _, h, w = img.shape
        top = int(torch.randint(h - crop + 1, (1,), generator=gen))
        left = int(torch.randint(w - crop + 1, (1,), generator=gen))
        x = img[:, top : top + crop, left : left + crop]
        if float(torch.rand((), generator=gen)) < 0.5:
            x = x.flip(-1)
        out.append(x)
    return torch.stack(out)


@torch.no_grad()
def reconstruction_psnr(vae, images: list[torch.Tensor]) -> float:
    """Mean per-image PSNR (dB, pixels in [0, 1]) of ``vae`` reconstructing ``images`` (posterior mean)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    vae.eval()
    scores = []
    for img in images:
        x = img.unsqueeze(0)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        p = peak_signal_noise_ratio(
            ((rec + 1) / 2).clamp(0, 1), (x + 1) / 2, data_range=1.0, dim=(1, 2, 3), reduction="none"
        )
        scores.append(p)
    return float(torch.cat(scores).mean())


def train_vae(
    vae,
    images: list[torch.Tensor],
    steps: int,
    seed: int,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[float]:
    """Train ``vae`` in place: L1 + MSE reconstruction of a posterior sample, plus a tiny KL.

    A sample, not the posterior mean: decoding samples teaches the decoder to forgive small latent
    errors, which a diffusion model always makes (a VAE trained on the mean decoded a LoRA's
    latents as coloured noise). AdamW, 20-step warm-up then cosine decay to 5% of the peak rate;
    batches, crops, flips and posterior samples all come from one generator seeded by ``seed``.
    Returns the loss per step.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=1e-4)
    warm = min(20, max(1, steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    vae.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="tiny VAE", disable=not progress, mininterval=2.0)
    for _ in bar:
        x = _random_batch(images, VAE_BATCH, CROP, gen)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + VAE_KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
    vae.eval()
    if losses:
        log(f"tiny VAE: {steps} steps, last-50 mean loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return losses


@torch.no_grad()
def latent_statistics(vae, images: list[torch.Tensor], seed: int) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: mean and 1/std of posterior samples over ``images``.

    FLUX normalises latents as ``(z - shift_factor) * scaling_factor``; with these values the
    transformer sees latents of zero mean and unit variance, like FLUX.1's (0.1159, 0.3611).
    """
    gen = torch.Generator().manual_seed(seed + 5)
    vae.eval()
    zs = [vae.encode(img.unsqueeze(0)).latent_dist.sample(generator=gen).flatten() for img in images]
    z = torch.cat(zs).double()
    return float(z.mean()), float(1.0 / z.std())


