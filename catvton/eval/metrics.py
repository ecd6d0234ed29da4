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


def masked_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N,) mean of torchmetrics' SSIM map over the masked pixels of each image."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    p = torch.from_numpy(np.ascontiguousarray(pred.transpose(0, 3, 1, 2))).double()
    t = torch.from_numpy(np.ascontiguousarray(target.transpose(0, 3, 1, 2))).double()
    _, full = ssim(p, t, data_range=1.0, kernel_size=7, reduction="none", return_full_image=True)
    smap = full.mean(dim=1).numpy()  # (N, H, W), averaged over channels
    m = mask.astype(np.float64)
    return (smap * m).sum(axis=(1, 2)) / np.maximum(m.sum(axis=(1, 2)), 1.0)


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

    return ssim(_nchw(pred), _nchw(target), data_range=1.0, kernel_size=7, reduction="none").numpy()


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
