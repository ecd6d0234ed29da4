"""The model side of training: build the trainable transformer, one flow-matching loss, the
optimizer and schedule, and the checkpoint format. No Ray here: the per-worker loop
(:mod:`catvton.train.loop`) and the plain-loop benchmark both call these.

Checkpoint folder (one per save)::

    pytorch_lora_weights.safetensors   method=lora: diffusers LoRA format, alpha in the metadata
    transformer/                       method=full: the whole transformer (save_pretrained)
    training_state.pt                  optimizer, scheduler, step, RNG state, loss history
    config.json                        the run's full configuration
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from catvton.config import Config
from catvton.train import flow

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
STATE = "training_state.pt"


def build_transformer(cfg: Config, device: torch.device, dtype: torch.dtype,
                      base: torch.nn.Module | None = None) -> torch.nn.Module:
    """The transformer to train: a LoRA on the frozen base (``method=lora``) or the whole model
    (``method=full``). LoRA parameters are kept in float32 even when the base is bf16.

    ``base``: an already built ``FluxTransformer2DModel`` to use instead of loading
    ``cfg.model.base`` (the full-size benchmark builds FLUX's shape with random weights)."""
    from catvton.model.loading import load_transformer
    from catvton.model.lora import lora_config

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
        import bitsandbytes  # noqa: F401
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
              generator: torch.Generator, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """The flow-matching loss of one micro-batch.

    batch: ``target``/``masked`` (B, 16, h, w) normalised latents, ``mask`` (B, 1, 8h, 8w) in
    {0, 1}. Noise (and the noise levels, unless given) come from ``generator``.
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
            sigma = torch.linspace(0.05, 0.95, 7)[(i + j) % 7].reshape(1)  # spread over noise levels
            loss = float(fill_loss(model, one, text, cfg, g, sigmas=sigma))
            for key in ("val_loss", f"val_loss_{group}"):
                sums[key] = sums.get(key, 0.0) + loss
                counts[key] = counts.get(key, 0) + 1
    model.train(was_training)
    return {k: sums[k] / counts[k] for k in sums}


def lora_metadata(model: torch.nn.Module) -> dict[str, Any]:
    return model.peft_config["default"].to_dict()


def save_weights(model: torch.nn.Module, folder: Path, cfg: Config) -> None:
    """The trained weights in a diffusers-loadable form (see module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.train.method == "lora":
        from diffusers import FluxFillPipeline
        from peft.utils import get_peft_model_state_dict

        state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        FluxFillPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                           transformer_lora_adapter_metadata=lora_metadata(model))
    else:
        model.save_pretrained(folder / "transformer")


def load_weights(model: torch.nn.Module, folder: Path, cfg: Config) -> None:
    """Load what :func:`save_weights` wrote into a model built by :func:`build_transformer`."""
    if cfg.train.method == "lora":
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(folder / LORA_WEIGHTS))
        # diffusers prefixes the keys with "transformer."; peft's own names do not have it
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint {folder} has LoRA keys the model lacks: {unexpected[:3]}...")
    else:
        from diffusers import FluxTransformer2DModel

        src = FluxTransformer2DModel.from_pretrained(folder / "transformer")
        model.load_state_dict(src.state_dict())


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, history: list[dict],
                    cfg: Config, generator: torch.Generator) -> None:
    save_weights(model, folder, cfg)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "history": history, "torch_rng": torch.get_rng_state(), "generator": generator.get_state()},
               folder / STATE)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_checkpoint(folder: Path, model, optimizer, scheduler, cfg: Config,
                    generator: torch.Generator) -> tuple[int, list[dict]]:
    """Restore a checkpoint; returns (step, loss history)."""
    load_weights(model, folder, cfg)
    state = torch.load(folder / STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["generator"])
    return int(state["step"]), list(state["history"])
