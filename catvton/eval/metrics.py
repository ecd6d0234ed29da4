"""Try-on quality on the person half, inside the mask: masked PSNR and masked SSIM.

Arrays: ``(N, H, W, 3)`` float in [0, 1] (person halves) and masks ``(N, H, W)`` in {0, 1}.
SSIM comes from torchmetrics (its per-pixel map, averaged inside the mask); PSNR from the
squared error inside the mask.
"""

from __future__ import annotations

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
