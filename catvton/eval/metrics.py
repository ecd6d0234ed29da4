"""Try-on quality on the person half, inside the mask: masked PSNR and masked SSIM.

Arrays: ``(N, H, W, 3)`` float in [0, 1] (person halves) and masks ``(N, H, W)`` in {0, 1}.
SSIM comes from torchmetrics (its per-pixel map, averaged inside the mask); PSNR from the
squared error inside the mask. Over the whole half, PSNR, SSIM, LPIPS, FID and KID come from
torchmetrics; the ones that need pretrained networks raise :class:`MetricUnavailable` here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def masked_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB over the masked pixels of each image (data range 1)."""
    m = mask[..., None].astype(np.float64)
    se = ((pred.astype(np.float64) - target.astype(np.float64)) ** 2 * m).sum(axis=(1, 2, 3))
    count = np.maximum(m.sum(axis=(1, 2, 3)) * 3, 1.0)
    mse = np.maximum(se / count, 1e-10)
    return 10.0 * np.log10(1.0 / mse)


SSIM_CHUNK = 8
"""Images per torchmetrics SSIM call. Its peak memory is ~60 MB an image at 96x128 (float64): one
call on 100 images took 6.5 GB, on a 184-pair group ~11 GB. Every value is per image, so the
chunking changes no figure."""


def masked_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N,) mean of torchmetrics' SSIM map over the masked pixels of each image."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    out = []
    for k in range(0, len(pred), SSIM_CHUNK):
        p, t = _nchw(pred[k:k + SSIM_CHUNK]), _nchw(target[k:k + SSIM_CHUNK])
        _, full = ssim(p, t, data_range=1.0, kernel_size=7, reduction="none", return_full_image=True)
        smap = full.mean(dim=1).numpy()  # (n, H, W), averaged over channels
        m = mask[k:k + SSIM_CHUNK].astype(np.float64)
        out.append((smap * m).sum(axis=(1, 2)) / np.maximum(m.sum(axis=(1, 2)), 1.0))
    return np.concatenate(out) if out else np.zeros(0)


def grey_fill(person: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The trivial baseline: the masked region filled with mid-grey."""
    m = mask[..., None]
    return person * (1 - m) + 0.5 * m


def half_psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB over the whole person half (torchmetrics, data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio as psnr

    p, t = _nchw(pred), _nchw(target)
    return np.array([float(psnr(p[i:i + 1], t[i:i + 1], data_range=1.0)) for i in range(len(p))])


def half_ssim(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) SSIM over the whole person half (torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    return np.concatenate([ssim(_nchw(pred[k:k + SSIM_CHUNK]), _nchw(target[k:k + SSIM_CHUNK]), data_range=1.0,
                                kernel_size=7, reduction="none").numpy().reshape(-1)
                           for k in range(0, len(pred), SSIM_CHUNK)] or [np.zeros(0)])


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()


class MetricUnavailable(RuntimeError):
    """A metric whose network weights cannot be had here (no download): report it absent."""


def fid_kid(real: np.ndarray, fake: np.ndarray, extractor: torch.nn.Module | None = None) -> dict[str, float]:
    """FID and KID (mean) between two image sets ``(N, H, W, 3)`` in [0, 1], through torchmetrics.

    ``extractor``: a feature network (with ``num_features``); None uses torchmetrics' default
    Inception, which needs ``torch-fidelity`` and its weights: :class:`MetricUnavailable` if not."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    feature: Any = extractor if extractor is not None else 2048
    try:
        fid = FrechetInceptionDistance(feature=feature, normalize=True)
        kid = KernelInceptionDistance(feature=feature, normalize=True, subset_size=min(50, len(real), len(fake)))
    except Exception as e:  # ModuleNotFoundError (torch-fidelity) or a failed weight download
        raise MetricUnavailable(f"needs the Inception network and its weights ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120]}); install torch-fidelity where the weights "
                                "can be downloaded") from e
    r, f = _nchw(real).float(), _nchw(fake).float()
    for m in (fid, kid):
        m.update(r, real=True)
        m.update(f, real=False)
    kid_mean, _ = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}


def lpips(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean LPIPS (torchmetrics, SqueezeNet): :class:`MetricUnavailable` without torchvision and
    the pretrained weights."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="squeeze", normalize=True)
    except Exception as e:
        raise MetricUnavailable(f"needs torchvision and the pretrained LPIPS weights ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120]})") from e
    return float(metric(_nchw(pred).float(), _nchw(target).float()))


# --------------------------------------------------------------------------------------------
# Garment transfer: does the person wear *this* garment?
# --------------------------------------------------------------------------------------------

GARMENT_WHITE = 0.99
"""A garment half's pixel with every channel at or above this is the cut-out's white ground
(garment_cutout fills 255); garments themselves are at most 250 ("white", 0.98) before shading."""


def swap_partners(pids: list[str]) -> np.ndarray:
    """(N,) for each pair, the index of the pair whose garment it gets in the swapped run: half
    the group further on (cyclic), moved on until the pid differs, so a garment is never swapped
    for another photo of itself. Needs at least two pids."""
    n = len(pids)
    if len(set(pids)) < 2:
        raise ValueError(f"a garment swap needs at least 2 pids in the group, got {sorted(set(pids))}")
    out = np.empty(n, np.int64)
    for i in range(n):
        j = (i + max(1, n // 2)) % n
        while pids[j] == pids[i]:
            j = (j + 1) % n
        out[i] = j
    return out


def garment_colours(garments: np.ndarray) -> np.ndarray:
    """(N, 3) the mean colour of each garment half ``(N, H, W, 3)`` over its garment pixels (not
    the white ground, :data:`GARMENT_WHITE`)."""
    garment = garments.min(axis=-1) < GARMENT_WHITE
    if not garment.any(axis=(1, 2)).all():
        raise ValueError("a garment half is all white: no garment to measure")
    return np.stack([g[m].mean(axis=0) for g, m in zip(garments, garment)])


def region_colours(images: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(N, 3) the mean colour of each ``(N, H, W, 3)`` image inside its ``(N, H, W)`` region."""
    if not regions.any(axis=(1, 2)).all():
        raise ValueError("an empty garment region: the person half shows no garment to measure")
    return np.stack([img[r > 0].mean(axis=0) for img, r in zip(images, regions)])


def colour_following(given: np.ndarray, generated: np.ndarray) -> float:
    """How closely the generated garment's colour tracks the garment given, across pairs: the
    Pearson correlation of ``given`` and ``generated`` ``(N, 3)`` colours, per RGB channel,
    averaged over the channels (1: follows exactly; 0: unrelated, or the same colour whatever
    was given; a channel that does not vary among the given garments is left out; NaN if none
    varies)."""
    rs = [float(np.corrcoef(given[:, c], generated[:, c])[0, 1]) if generated[:, c].std() > 1e-6 else 0.0
          for c in range(3) if given[:, c].std() > 1e-6]
    return float(np.mean(rs)) if rs else float("nan")


def colour_strength(given: np.ndarray, generated: np.ndarray) -> float:
    """How much of a change in the garment's colour reaches the person: the least-squares slope of
    ``generated`` on ``given`` ``(N, 3)`` colours across pairs, per RGB channel, averaged over the
    channels that vary (1: the full change; 0.6: the model hedges towards an average colour; NaN if
    no channel varies). :func:`colour_following` says whether the colour is followed at all, this
    says how far: a hedging model keeps a high correlation and loses masked PSNR."""
    slopes = [float(np.polyfit(given[:, c], generated[:, c], 1)[0]) for c in range(3) if given[:, c].std() > 1e-6]
    return float(np.mean(slopes)) if slopes else float("nan")

