"""Reading a tensor's values on the host: the one seam between device code and Python numbers.

The GPU job's code reads values in few places (the loss and gradient norm of a step, a validation
loss, a checkpoint's LoRA, a generated image). Each goes through these functions, so the dry run
(:mod:`catvton.train.dryrun`) runs that code unchanged on tensors that hold no data: ``meta``
tensors and ``FakeTensorMode``'s fakes. For them the values are NaN (floats) of the right shape;
real tensors are copied as they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def has_data(t: torch.Tensor) -> bool:
    """False for a ``meta`` or fake tensor (shape and dtype only)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def host_floats(t: torch.Tensor) -> list[float]:
    """``t``'s values as Python floats, flattened (one device sync); NaNs for a tensor without data."""
    if not has_data(t):
        return [math.nan] * t.numel()
    return t.detach().float().reshape(-1).tolist()


def host_tensor(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``t`` (same dtype); NaN-filled (zeros for integers) without data."""
    if not has_data(t):
        fill = math.nan if t.dtype.is_floating_point else 0
        return torch.full(tuple(t.shape), fill, dtype=t.dtype, device="cpu")
    return t.detach().cpu().contiguous()


def host_array(t: torch.Tensor) -> np.ndarray:
    """``t`` as a float32 numpy array; NaN-filled without data."""
    return host_tensor(t.detach().float()).numpy()
