"""The training step, and what it needs: build the trainable transformer, one flow-matching loss,
the optimizer and schedule, the fixed validation loss, and the non-finite-loss policy.

No Ray here. Every loop calls :func:`train_step`: the Ray Train per-worker loop
(:mod:`catvton.train.loop`), the plain single-process loop (:mod:`catvton.train.plain`) and the
full-size GPU benchmark (``bench/full_size_step.py``). Checkpoints: :mod:`catvton.train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from catvton.config import Config
from catvton.infer.levers import blank_garment_tokens
from catvton.model.loading import load_transformer
from catvton.model.host import host_floats
from catvton.model.lora import lora_config
from catvton.train import flow


def build_transformer(cfg: Config, device: torch.device, dtype: torch.dtype,
                      base: torch.nn.Module | None = None) -> torch.nn.Module:
    """The transformer to train: a LoRA on the frozen base (``method=lora``) or the whole model
    (``method=full``). LoRA parameters are kept in float32 even when the base is bf16.

    ``base``: an already built ``FluxTransformer2DModel`` to use instead of loading
    ``cfg.model.base`` (the full-size benchmark builds FLUX's shape with random weights)."""
    model = base if base is not None else load_transformer(cfg.model.base, cfg.model.transformer_override, dtype)
    model.to(device)
    if cfg.train.method == "lora":
        model.requires_grad_(False)
        torch.manual_seed(cfg.train.seed)  # LoRA A init
        model.add_adapter(lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], total_steps: int):
    """AdamW (8-bit with bitsandbytes on a GPU when ``optimizer`` allows) and the warmup + cosine
    (to 10%) or constant schedule."""
    t = cfg.train
    use_8bit = t.optimizer == "adamw8bit" or (t.optimizer == "auto" and torch.cuda.is_available() and _has_bnb())
    if use_8bit:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _has_bnb() -> bool:
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        return False
    return True


class TextContext:
    """The prompt's embeddings (computed once by preprocessing) and the token ids, on a device."""

    def __init__(self, embeds: dict[str, torch.Tensor], latent_hw: tuple[int, int], device, dtype):
        self.prompt = embeds["prompt_embeds"].to(device, dtype)  # (1, T, D)
        self.pooled = embeds["pooled_prompt_embeds"].to(device, dtype)  # (1, P)
        h, w = latent_hw
        self.img_ids = flow.latent_image_ids(h, w, device=device, dtype=dtype)  # (S, 3)
        self.txt_ids = flow.text_ids(self.prompt.shape[1], device=device, dtype=dtype)  # (T, 3)
        self.latent_hw = latent_hw


def fill_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], text: TextContext, cfg: Config,
              generator: torch.Generator, sigmas: torch.Tensor | None = None,
              garment_dropout: float = 0.0) -> torch.Tensor:
    """The flow-matching loss of one micro-batch.

    batch: ``target``/``masked`` (B, 16, h, w) normalised latents, ``mask`` (B, 1, 8h, 8w) in
    {0, 1}. Noise (and the noise levels, unless given) come from ``generator``. ``garment_dropout``:
    the share of samples given garment-free (:func:`catvton.infer.levers.blank_garment_tokens`);
    training passes ``train.garment_dropout``, validation leaves it at 0.
    """
    t = cfg.train
    target, masked, mask = batch["target"], batch["masked"], batch["mask"]
    b = target.shape[0]
    dev, dtype = text.prompt.device, text.prompt.dtype
    x0 = flow.pack_latents(target.float())  # (B, S, 64)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    if sigmas is None:
        sigmas = flow.sample_sigmas(b, generator, mode=t.timesteps, device=x0.device)
        if t.flux_shift:
            sigmas = flow.flux_shift(sigmas, x0.shape[1])
    xt = flow.add_noise(x0, noise, sigmas)
    inp = flow.fill_input(xt, flow.pack_latents(masked.float()), flow.pack_mask(mask.float()))
    if garment_dropout > 0:
        drop = torch.rand(b, generator=generator, device=generator.device) < garment_dropout
        inp = blank_garment_tokens(inp, text.img_ids[:, 2].to(inp.device), drop.to(inp.device))
    pred = model(
        hidden_states=inp.to(dev, dtype),
        timestep=sigmas.to(dev, dtype),
        guidance=flow.guidance_tensor(t.guidance, b, device=dev),
        pooled_projections=text.pooled.expand(b, -1),
        encoder_hidden_states=text.prompt.expand(b, -1, -1),
        txt_ids=text.txt_ids,
        img_ids=text.img_ids,
        return_dict=False,
    )[0]
    h, w = text.latent_hw
    weights = flow.token_region_weights(mask.float(), t.loss_region, h, w).to(dev)
    return flow.flow_loss(pred, flow.flow_target(x0, noise).to(dev), weights)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports."""

    loss: float
    """Mean loss of the step's micro-batches (this worker's; the Ray loop all-reduces it)."""
    grad_norm: float
    """Total gradient norm before clipping; nan when clipping is off (``max_grad_norm <= 0``)."""


LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
"""``loss_fn(model, micro_batch)`` -> the micro-batch's scalar loss (e.g. :func:`fill_loss` with its
text, config and generator bound)."""


def train_step(model: torch.nn.Module, micro_batches: Sequence[dict], loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               params: list[torch.nn.Parameter], max_grad_norm: float) -> StepResult:
    """One optimizer step over the gradient accumulation's ``micro_batches``.

    Each micro-batch: ``loss_fn(model, batch)`` (a scalar), backward of it divided by the number
    of micro-batches, so that equal-size micro-batches give the gradient of their mean loss. Under
    DDP only the last backward all-reduces the gradients (``no_sync`` for the others). Then clip
    the gradients of ``params`` to ``max_grad_norm`` (0 disables), ``optimizer.step()``,
    ``scheduler.step()``, ``zero_grad``. ``model`` is what ``loss_fn`` calls: the DDP wrapper
    when there is one. A non-finite loss is returned, not raised: callers apply
    :func:`non_finite_message` (every Ray rank must see the all-reduced loss before stopping).
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    n = len(micro_batches)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    losses = []
    for i, batch in enumerate(micro_batches):
        # the forward belongs inside no_sync too: DDP decides in the forward whether the
        # backward all-reduces
        with model.no_sync() if ddp and i < n - 1 else contextlib.nullcontext():
            loss = loss_fn(model, batch)
            (loss / n).backward()
        losses.append(loss.detach())
    if max_grad_norm > 0:
        grad_norm = host_floats(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))[0]
    else:
        grad_norm = float("nan")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    values = host_floats(torch.stack(losses))  # one device sync for all micro-batches
    return StepResult(loss=sum(values) / n, grad_norm=grad_norm)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stopped (its message from :func:`non_finite_message`)."""


def non_finite_message(loss: float, step: int, last_checkpoint: str = "", storage: str | None = None) -> str:
    """Why a run stopped on a non-finite ``loss`` at optimizer ``step``, and what to do.

    ``storage``: where the loop keeps checkpoints (None: a loop that keeps none); ``last_checkpoint``:
    the last one reported there (empty: none yet)."""
    message = f"loss became {loss} at step {step}; the run stopped."
    if storage is not None:
        message += f" Last good checkpoint: {last_checkpoint or 'none yet'} (under {storage})."
    return message + " Lower train.lr or check the data."


@torch.no_grad()
def fixed_val_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], text: TextContext,
                   cfg: Config) -> dict[str, float]:
    """Validation loss with noise and noise levels fixed by the batch index: the same numbers
    for the same weights, in any run. Returns ``val_loss`` and ``val_loss_<group>``."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    was_training = model.training
    model.eval()
    for i, batch in enumerate(batches):
        for j, group in enumerate(batch["group"]):
            g = torch.Generator().manual_seed(10_000 + 97 * i + j)
            one = {k: batch[k][j:j + 1] for k in ("target", "masked", "mask")}
            # spread over noise levels; made where the latents are: a (1,) CPU tensor beside CUDA
            # latents stops the step ("Expected all tensors to be on the same device")
            sigma = torch.linspace(0.05, 0.95, 7, device=one["target"].device)[(i + j) % 7].reshape(1)
            loss = host_floats(fill_loss(model, one, text, cfg, g, sigmas=sigma))[0]
            for key in ("val_loss", f"val_loss_{group}"):
                sums[key] = sums.get(key, 0.0) + loss
                counts[key] = counts.get(key, 0) + 1
    model.train(was_training)
    return {k: sums[k] / counts[k] for k in sums}
