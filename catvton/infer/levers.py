"""Inference levers on a loaded ``FluxFillPipeline``, read from ``cfg.infer``: a fused LoRA, step
caching and torch.compile; and :class:`PassCounter`, which counts the transformer work actually done.

:func:`apply_levers` runs once, where every inference path loads its pipeline
(:meth:`catvton.infer.tryon.TryOn.load`: the server's replicas, the evaluation, Ray Data batch
inference). The training sample grids (:meth:`TryOn.from_parts`) take none: their transformer is
still being trained, and hooks or fused weights would stay on it. In order:

1. ``fuse_lora``: the LoRA folded into the base weights (``pipe.fuse_lora``), then the adapter layers
   removed (``unload_lora_weights``), so a LoRA try-on runs exactly the base's modules;
2. ``cache``: diffusers 0.42 hooks (``transformer.enable_cache``) with ``FirstBlockCacheConfig``,
   ``TaylorSeerCacheConfig`` (lite mode: on an extrapolated step every block is skipped and the
   output projection's result is extrapolated) or ``MagCacheConfig`` (its per-step magnitude
   ratios from ``infer.mag_ratios``, or calibrated here with diffusers' own calibration);
3. ``compile``: ``compile_repeated_blocks`` (regional compilation of each transformer block), GPU
   only.

:func:`garment_guidance` is armed around every pipeline call (:meth:`TryOn.fill_canvases`, the
training grids included): it changes what a step computes, not the loaded pipeline.

``FluxFillPipeline`` (unlike ``FluxPipeline``) gives the cache hooks no context: :class:`StepCache`
wraps each pipeline call in one, and clears the hooks' state first.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import threading
from typing import Any, Callable, Iterator

import numpy as np
import torch

from catvton.config import ConfigError, InferConfig


def cache_config(infer: InferConfig, steps: int, mag_ratios: list[float] | None = None):
    """The diffusers cache config of ``infer.cache`` for a ``steps``-step call (None for ``none``)."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if infer.cache == "none":
        return None
    if infer.cache == "first_block":
        return FirstBlockCacheConfig(threshold=infer.first_block_threshold)
    if infer.cache == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=infer.taylorseer_interval, max_order=infer.taylorseer_order,
                                     disable_cache_before_step=infer.taylorseer_warmup,
                                     taylor_factors_dtype=torch.float32, use_lite_mode=True)
    if infer.cache == "mag":
        ratios = mag_ratios or infer.mag_ratios
        if not ratios:
            raise ValueError("infer.cache=mag needs magnitude ratios: set infer.mag_ratios or calibrate "
                             "(calibrate_mag_ratios)")
        # diffusers interpolates the ratios (nearest) to the call's step count
        return MagCacheConfig(threshold=infer.mag_threshold, max_skip_steps=infer.mag_max_skip,
                              retention_ratio=infer.mag_retention, num_inference_steps=steps,
                              mag_ratios=torch.tensor(ratios, dtype=torch.float32))
    raise ValueError(f"infer.cache={infer.cache!r}: unknown cache kind")


class StepCache:
    """The configured cache hooks of one transformer, armed around each pipeline call."""

    def __init__(self, transformer: torch.nn.Module, infer: InferConfig, mag_ratios: list[float] | None = None):
        self.transformer = transformer
        self.infer = infer
        self.mag_ratios = list(mag_ratios or infer.mag_ratios)
        self._armed_steps: int | None = None

    @contextlib.contextmanager
    def around(self, steps: int) -> Iterator[None]:
        """One pipeline call of ``steps`` steps: hooks (re-)armed, state cleared, a cache context set.
        MagCache's schedule depends on the step count: it is re-armed when a call asks for another."""
        t = self.transformer
        if self._armed_steps is None or (self.infer.cache == "mag" and steps != self._armed_steps):
            if t.is_cache_enabled:
                t.disable_cache()
            t.enable_cache(cache_config(self.infer, steps, self.mag_ratios))
            self._armed_steps = steps
        t._reset_stateful_cache()  # a call that failed half-way leaves no stale residuals behind
        with t.cache_context("cond"):
            yield

    def disarm(self) -> None:
        """Remove the hooks (the next :meth:`around` arms them again): an uncached call in between."""
        if self.transformer.is_cache_enabled:
            self.transformer.disable_cache()
        self._armed_steps = None


def calibrate_mag_ratios(transformer: torch.nn.Module, steps: int, run: Callable[[], Any]) -> list[float]:
    """The per-step magnitude ratios of ``transformer`` for MagCache, from diffusers' calibration
    mode (nothing skipped; it prints the ratios at the last step) over one call of ``run``, an
    uncached ``steps``-step try-on (a batch of canvases gives their average)."""
    from diffusers.hooks import MagCacheConfig

    if transformer.is_cache_enabled:
        raise ValueError("calibrate MagCache on a transformer without a cache enabled")
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), transformer.cache_context("cond"):
            run()
    finally:
        transformer.disable_cache()
    lines = printed.getvalue().splitlines()
    found = [ast.literal_eval(lines[i + 1].strip()) for i, line in enumerate(lines[:-1]) if "Calibration Complete" in line]
    if not found or len(found[-1]) != steps:
        raise RuntimeError(f"diffusers' MagCache calibration printed no {steps} ratios (got {printed.getvalue()[-300:]!r})")
    return [float(r) for r in found[-1]]


def probe_canvas(half_height: int, half_width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded noise canvas ``(1, H, 2W, 3)`` and a mask ``(1, H, 2W)`` over the lower two thirds of
    the person half: the input of a calibration when no real pair is at hand."""
    rng = np.random.default_rng(seed)
    canvas = rng.random((1, half_height, 2 * half_width, 3), dtype=np.float32)
    mask = np.zeros((1, half_height, 2 * half_width), np.float32)
    mask[:, half_height // 3:, half_width:] = 1.0
    return canvas, mask


def apply_levers(pipe, infer: InferConfig, device: str | torch.device, lora_loaded: bool,
                 calibrate: Callable[[int], list[float]] | None = None) -> tuple[StepCache | None, dict[str, Any]]:
    """Fuse, cache and compile ``pipe`` as ``infer`` says; returns the cache (None for ``none``) and
    what was applied. ``calibrate(steps)``: MagCache ratios when ``infer.mag_ratios`` is empty.
    ``compile`` on a CPU is refused (regional compilation there only adds start-up time)."""
    if infer.compile and torch.device(device).type != "cuda":
        raise ConfigError([f"infer.compile=true needs a CUDA device, this pipeline runs on {device}: set "
                           "infer.compile=false (torch.compile is the GPU lever)"])
    applied: dict[str, Any] = {"cache": infer.cache, "fused_lora": False, "compiled": False}
    if infer.fuse_lora and lora_loaded:
        pipe.fuse_lora(components=["transformer"])
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
        applied["fused_lora"] = True
    cache = None
    if infer.cache != "none":
        ratios = list(infer.mag_ratios)
        if infer.cache == "mag" and not ratios:
            if calibrate is None:
                raise ValueError("infer.cache=mag without infer.mag_ratios needs a calibration run")
            ratios = calibrate(infer.steps)
        cache = StepCache(pipe.transformer, infer, ratios)
        applied["mag_ratios"] = ratios if infer.cache == "mag" else None
    if infer.compile:
        pipe.transformer.compile_repeated_blocks()
        applied["compiled"] = True
    return cache, applied


GARMENT_FREE_CHANNELS = slice(0, 128)
"""What the garment-free condition blanks on the garment half's tokens: the noisy latent (64) and the
masked-image latent (64) of the Fill transformer's 384 input channels (noisy, masked image, mask:
:func:`catvton.train.flow.fill_input`). Both: the noisy garment half carries the garment too, more
of it with every denoising step."""


def blank_garment_tokens(hidden: torch.Tensor, cols: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden`` (B, S, 384) with the garment half's tokens (``cols``, the ``img_ids`` column of each
    token, in the left half of the grid) set to 0 in :data:`GARMENT_FREE_CHANNELS`, in the samples
    where ``which`` (B,) is true (None: all). The condition ``train.garment_dropout`` trains and
    :func:`garment_guidance` guides away from."""
    out = hidden.clone()
    garment = cols < (cols.max() + 1) / 2
    rows = slice(None) if which is None else which
    picked = out[rows]
    picked[:, garment, GARMENT_FREE_CHANNELS] = 0
    out[rows] = picked
    return out


_GUIDANCE_LOCK = threading.Lock()
"""Guards arming and disarming: a Serve replica runs batches in threads (``asyncio.to_thread``)."""


@contextlib.contextmanager
def garment_guidance(transformer: torch.nn.Module, scale: float) -> Iterator[None]:
    """Classifier-free guidance on the garment while armed: each transformer call runs twice, with
    the canvas as given and garment-free (:func:`blank_garment_tokens`), and returns
    ``free + scale * (given - free)``. ``scale`` 1: one plain call, nothing changed. Two passes a
    step: twice the transformer work. Calls that overlap in threads share one arming (same scale);
    the class's own ``forward`` is back when the last one ends."""
    if scale == 1.0:
        yield
        return
    with _GUIDANCE_LOCK:
        armed = transformer.__dict__.get("_garment_guidance")
        if armed is None:
            armed = {"scale": scale, "calls": 0, "forward": transformer.forward}
            transformer.__dict__["_garment_guidance"] = armed
            transformer.forward = functools.partial(_guided_forward, armed)
        elif armed["scale"] != scale:
            raise RuntimeError(f"garment guidance {scale} asked while {armed['scale']} is armed on this transformer")
        armed["calls"] += 1
    try:
        yield
    finally:
        with _GUIDANCE_LOCK:
            armed["calls"] -= 1
            if armed["calls"] == 0:
                del transformer.forward  # the class's forward again
                del transformer.__dict__["_garment_guidance"]


def _guided_forward(armed: dict, *args, **kwargs):
    forward, scale = armed["forward"], armed["scale"]
    free = blank_garment_tokens(kwargs["hidden_states"], kwargs["img_ids"][:, 2])
    given = forward(*args, **kwargs)
    blank = forward(*args, **{**kwargs, "hidden_states": free})
    if isinstance(given, tuple):
        return (blank[0] + scale * (given[0] - blank[0]), *given[1:])
    given.sample = blank.sample + scale * (given.sample - blank.sample)
    return given


class PassCounter:
    """The transformer work done while attached (``with PassCounter(pipe.transformer) as n: ...``).

    ``calls``: transformer calls (one per denoising step, whatever is cached); ``blocks``: block
    computations, counted on each block's first norm layer, which runs only when the block's own
    forward runs (a cache hook that skips a block skips it); ``full``: calls of the last block (steps
    on which the whole stack ran); ``passes``: full-pass equivalents, ``blocks`` / blocks per pass
    (First Block Cache always runs the first block, so it counts there and not in ``full``)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self._norms = [b.norm1 if hasattr(b, "norm1") else b.norm for b in blocks]
        self.n_blocks = len(blocks)
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.calls = self.blocks = self.full = 0

    @property
    def passes(self) -> float:
        return self.blocks / self.n_blocks

    def _count_block(self, last: bool):
        def hook(module, args):
            self.blocks += 1
            self.full += int(last)
        return hook

    def _count_call(self, module, args, kwargs):
        self.calls += 1

    def __enter__(self) -> "PassCounter":
        self._handles = [n.register_forward_pre_hook(self._count_block(i == len(self._norms) - 1))
                         for i, n in enumerate(self._norms)]
        self._handles.append(self.transformer.register_forward_pre_hook(self._count_call, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
