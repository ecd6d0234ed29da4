"""Memory and FLOP plan for training the full-size FLUX.1-Fill-dev transformer, without downloading it.

The parameter and LoRA counts come from the real diffusers module tree built on the meta device
(no memory allocated); memory and compute come from a small model calibrated on measurements
(FACTS.md), so the plan answers "does batch 2 at 768x1024 fit an L40S, and how fast can it be"
before any GPU is rented::

    python -m catvton.train.planner --gpu L40S --batch 1 --half 768x1024 --rank 16
    python -m catvton.train.planner --config configs/l40s.yaml --gpu H100
    python -m catvton.train.planner --gpu L40S --batch 1 --no-checkpointing

Units: bytes and FLOPs are plain counts; tables print GB = 1e9 bytes and TFLOP = 1e12.

Memory model (per GPU, transformer only)
    ``weights``  every base parameter in bf16 (2 B).
    ``trainable state``  per trainable parameter: fp32 copy 4 + fp32 grad 4 + AdamW m, v 4 + 4
        = 16 B (``adamw8bit``: states 1 + 1, 10 B). For ``full`` that is every parameter, on top
        of the bf16 weights (mixed precision keeps an fp32 master copy); nothing is sharded.
    ``activations``  measured per token in bf16 with LoRA, linear in sequence length: ~124 KB a
        double block, ~118 KB a single block. Without checkpointing all are kept until the
        backward pass. With per-block checkpointing only each block's input is kept (tokens x
        3072 x 2 B a block) plus one block's full activations while it is recomputed. Scaled
        linearly by batch. Full fine-tuning is assumed to save about the same.
    ``context``  CUDA context, cuBLAS/attention workspaces, allocator slack: 3 GB (2-4 seen).
    The peak is the sum. FACTS' measured ~70 GB (no checkpointing) and ~28 GB (checkpointing)
    at 6,656 tokens are without the context; the plan's 73 / 31 GB include it. Not counted: the
    VAE and text encoders (latents and prompt embeddings are computed beforehand by a Ray Data
    stage; a resident T5-XXL would add ~9.5 GB), and the few MB of rotary tables and timestep
    embeddings.

Compute model (per sample; a step is ``batch`` samples)
    ``forward``  2 x in x out for every linear layer and every token that passes through it (in
        a double block image tokens use the image-stream weights and text tokens the context-
        stream ones; single blocks see all tokens; the AdaLN modulation linears see one vector a
        sample), plus the LoRA path 2 x r x (in + out) a token, plus attention 4 x seq^2 x 3072 a
        block (QK^T and AV over the joint sequence).
    ``backward``  activation gradients: linear forward again, attention twice (dQ, dK, dV, dP);
        the LoRA path twice (its input and weight gradients); ``full`` adds the base weights'
        gradients (linear forward once more).
    ``recompute``  with checkpointing, the forward again.
    At 768x1024 (6,656 tokens) with r=16 attention+ff this gives 117.6 TFLOP forward (86.6
    linear, 31.0 attention), 149.3 backward, 267.0 total, 384.6 with recompute (FACTS: ~117 /
    148 / 265 / ~400). The floor time is FLOPs / dense bf16 peak, i.e. 100% utilisation: real runs reach
    perhaps 40-60% of it.
"""

from __future__ import annotations

import argparse
import functools
import re
from dataclasses import dataclass

import torch

from catvton.config import Config, load_config
from catvton.model.lora import TARGET_PRESETS, count_lora_params, target_regex

GB = 1e9
TFLOP = 1e12

TEXT_TOKENS = 512
"""T5 tokens a sample (FLUX.1-Fill-dev's ``max_sequence_length``)."""
ACT_BYTES_PER_TOKEN_DOUBLE = 124e3
"""Saved activations a token a double block, bf16 with LoRA (measured)."""
ACT_BYTES_PER_TOKEN_SINGLE = 118e3
"""Saved activations a token a single block, bf16 with LoRA (measured)."""
CONTEXT_BYTES = 3e9
"""CUDA context, workspaces and allocator slack."""
WEIGHT_BYTES = 2
"""bf16 base weights."""
STATE_BYTES = {"adamw": 16, "adamw8bit": 10}
"""Bytes a trainable parameter: fp32 param + fp32 grad + two optimizer states (fp32 or 8-bit)."""


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    """Nominal memory; the plan "fits" when its peak is at most this."""
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""


GPUS: dict[str, GPU] = {
    "L40S": GPU("L40S", 48 * GB, 362 * TFLOP),
    "H100": GPU("H100", 80 * GB, 989 * TFLOP),
    "H200": GPU("H200", 141 * GB, 989 * TFLOP),
}


@functools.lru_cache(maxsize=1)
def full_size_transformer_meta():
    """FLUX.1-Fill-dev's ``FluxTransformer2DModel`` on the meta device (11,902,391,360 params).

    Same config as the hub's ``transformer/config.json``; built once and cached (~1 s plus the
    diffusers import). Do not move it to a device: it holds no data.
    """
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(
            in_channels=384, out_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )


# Which tokens pass through a linear layer, by name.
_PER_SAMPLE = re.compile(r"time_text_embed\..*|norm_out\.linear|.*\.norm1(_context)?\.linear|.*\.norm\.linear")
_TEXT = re.compile(r"context_embedder|transformer_blocks\.\d+\.(attn\.(add_[qkv]_proj|to_add_out)|ff_context\..*)")
_IMAGE = re.compile(r"x_embedder|proj_out|transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0)|ff\..*)")
_ALL = re.compile(r"single_transformer_blocks\.\d+\..*")


def _tokens_through(name: str, image: int, text: int) -> int:
    if _PER_SAMPLE.fullmatch(name):
        return 1
    if _ALL.fullmatch(name):
        return image + text
    if _TEXT.fullmatch(name):
        return text
    if _IMAGE.fullmatch(name):
        return image
    raise ValueError(f"planner: no token rule for linear layer {name!r} (diffusers changed?)")


@functools.lru_cache(maxsize=1)
def _linears() -> tuple[tuple[str, int, int], ...]:
    m = full_size_transformer_meta()
    return tuple((n, mod.in_features, mod.out_features) for n, mod in m.named_modules()
                 if isinstance(mod, torch.nn.Linear))


@dataclass
class Plan:
    """What one training step of the full-size transformer costs on one GPU."""

    half_width: int
    half_height: int
    batch_size: int
    method: str
    rank: int
    targets: str
    gradient_checkpointing: bool
    optimizer: str
    gpu: str
    params_total: int
    params_trainable: int
    image_tokens: int
    """Packed image tokens a sample: (H/16) x (2W/16)."""
    text_tokens: int
    tokens_per_sample: int
    weights_bytes: float
    trainable_state_bytes: float
    activations_bytes: float
    """Saved activations for the whole batch in the chosen mode."""
    activations_no_ckpt_bytes: float
    activations_ckpt_bytes: float
    context_bytes: float
    peak_bytes: float
    gpu_memory_bytes: float
    fits: bool
    flops_linear_forward: float
    """Per step (whole batch), LoRA path included."""
    flops_attention_forward: float
    flops_forward: float
    flops_backward: float
    flops_recompute: float
    flops_total: float
    """forward + backward + recompute, per step."""
    seconds_per_sample: float
    """Floor: flops_total / batch / the GPU's dense bf16 peak."""

    def to_table(self) -> str:
        what = f"lora r={self.rank} {self.targets}" if self.method == "lora" else "full fine-tune"
        ckpt = "on" if self.gradient_checkpointing else "off"
        b = self.batch_size
        free = self.gpu_memory_bytes - self.peak_bytes
        rows = [
            ("parameters", f"{self.params_total:,} total, {self.params_trainable:,} trainable "
                           f"({100 * self.params_trainable / self.params_total:.2f}%)"),
            ("tokens / sample", f"{self.tokens_per_sample:,} ({self.image_tokens:,} image + {self.text_tokens} text)"),
            ("weights", f"{self.weights_bytes / GB:6.2f} GB  bf16"),
            ("trainable state", f"{self.trainable_state_bytes / GB:6.2f} GB  {self.optimizer}, "
                                f"{STATE_BYTES[self.optimizer]} B a trainable param"),
            ("activations", f"{self.activations_bytes / GB:6.2f} GB  batch {b} (checkpointing on: "
                            f"{self.activations_ckpt_bytes / GB:.2f}, off: {self.activations_no_ckpt_bytes / GB:.2f})"),
            ("context", f"{self.context_bytes / GB:6.2f} GB  CUDA context, workspaces"),
            ("peak", f"{self.peak_bytes / GB:6.2f} GB  of {self.gpu_memory_bytes / GB:.0f} GB: "
                     + (f"fits ({free / GB:.1f} GB free)" if self.fits else f"DOES NOT FIT ({-free / GB:.1f} GB over)")),
            ("TFLOP / step", f"forward {self.flops_forward / TFLOP:.1f} (linear {self.flops_linear_forward / TFLOP:.1f}, "
                             f"attention {self.flops_attention_forward / TFLOP:.1f}) + backward "
                             f"{self.flops_backward / TFLOP:.1f} + recompute {self.flops_recompute / TFLOP:.1f} "
                             f"= {self.flops_total / TFLOP:.1f}"),
            ("floor", f"{self.seconds_per_sample:.2f} s / sample, {self.seconds_per_sample * b:.2f} s / step at "
                      f"{GPUS[self.gpu].bf16_flops / TFLOP:.0f} TFLOP/s dense bf16 (100% utilisation)"),
        ]
        head = (f"plan: {what}, canvas 2 x {self.half_width}x{self.half_height}, batch {b}, "
                f"checkpointing {ckpt}, {self.gpu}")
        width = max(len(k) for k, _ in rows)
        return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])

    __str__ = to_table


def plan(
    half_width: int,
    half_height: int,
    batch_size: int,
    rank: int,
    targets: str,
    method: str = "lora",
    gradient_checkpointing: bool = True,
    gpu: str = "L40S",
    optimizer: str = "adamw",
    text_tokens: int = TEXT_TOKENS,
) -> Plan:
    """The plan for a canvas of two ``half_width x half_height`` halves side by side."""
    problems = []
    if half_width <= 0 or half_height <= 0 or half_width % 16 or half_height % 16:
        problems.append(f"half size {half_width}x{half_height}: both must be positive multiples of 16")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size}: must be at least 1")
    if method not in ("lora", "full"):
        problems.append(f"method={method!r}: choose lora or full")
    if method == "lora" and rank < 1:
        problems.append(f"rank={rank}: must be at least 1")
    if targets not in TARGET_PRESETS:
        problems.append(f"targets={targets!r}: choose from {list(TARGET_PRESETS)}")
    if gpu not in GPUS:
        problems.append(f"gpu={gpu!r}: choose from {list(GPUS)}")
    if optimizer not in STATE_BYTES:
        problems.append(f"optimizer={optimizer!r}: choose from {list(STATE_BYTES)}")
    if problems:
        raise ValueError("invalid plan:\n  - " + "\n  - ".join(problems))

    model = full_size_transformer_meta()
    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    hidden = model.inner_dim
    params_total = sum(p.numel() for p in model.parameters())
    lora = method == "lora"
    params_trainable = count_lora_params(model, rank, targets) if lora else params_total

    image = (half_height // 16) * (2 * half_width // 16)
    seq = image + text_tokens

    # memory
    weights = params_total * WEIGHT_BYTES
    state = params_trainable * STATE_BYTES[optimizer]
    per_token_blocks = n_double * ACT_BYTES_PER_TOKEN_DOUBLE + n_single * ACT_BYTES_PER_TOKEN_SINGLE
    act_off = batch_size * seq * per_token_blocks
    act_on = batch_size * seq * ((n_double + n_single) * hidden * 2
                                 + max(ACT_BYTES_PER_TOKEN_DOUBLE, ACT_BYTES_PER_TOKEN_SINGLE))
    act = act_on if gradient_checkpointing else act_off
    peak = weights + state + act + CONTEXT_BYTES
    g = GPUS[gpu]

    # compute, per sample
    rx = re.compile(target_regex(targets))
    lin = lora_fwd = 0.0
    for name, fin, fout in _linears():
        t = _tokens_through(name, image, text_tokens)
        lin += 2.0 * fin * fout * t
        if lora and rx.fullmatch(name):
            lora_fwd += 2.0 * rank * (fin + fout) * t
    attn = (n_double + n_single) * 4.0 * seq**2 * hidden
    fwd = lin + lora_fwd + attn
    bwd = lin + 2 * attn + 2 * lora_fwd + (0.0 if lora else lin)
    rec = fwd if gradient_checkpointing else 0.0
    total = fwd + bwd + rec

    return Plan(
        half_width=half_width, half_height=half_height, batch_size=batch_size, method=method, rank=rank,
        targets=targets, gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, gpu=gpu,
        params_total=params_total, params_trainable=params_trainable, image_tokens=image,
        text_tokens=text_tokens, tokens_per_sample=seq, weights_bytes=weights, trainable_state_bytes=state,
        activations_bytes=act, activations_no_ckpt_bytes=act_off, activations_ckpt_bytes=act_on,
        context_bytes=CONTEXT_BYTES, peak_bytes=peak, gpu_memory_bytes=g.memory_bytes,
        fits=peak <= g.memory_bytes, flops_linear_forward=batch_size * (lin + lora_fwd),
        flops_attention_forward=batch_size * attn, flops_forward=batch_size * fwd,
        flops_backward=batch_size * bwd, flops_recompute=batch_size * rec, flops_total=batch_size * total,
        seconds_per_sample=total / g.bf16_flops,
    )


def plan_from_config(cfg, gpu: str = "L40S", optimizer: str = "adamw") -> Plan:
    """The plan of a :class:`catvton.config.Config` (canvas, batch, method, checkpointing, LoRA)."""
    return plan(
        half_width=cfg.canvas.half_width, half_height=cfg.canvas.half_height, batch_size=cfg.train.batch_size,
        rank=cfg.lora.rank, targets=cfg.lora.targets, method=cfg.train.method,
        gradient_checkpointing=cfg.train.gradient_checkpointing, gpu=gpu, optimizer=optimizer,
    )


def _half(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--half {text!r}: expected WIDTHxHEIGHT, e.g. 768x1024") from None
    return w, h


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m catvton.train.planner",
        description="Memory and FLOP plan of training full-size FLUX.1-Fill-dev (CatVTON-Flux) on one GPU. "
                    "Values not given come from --config, else from the code defaults of catvton.config.",
    )
    p.add_argument("--config", help="a YAML config (configs/*.yaml) to plan; the flags below override it")
    p.add_argument("--gpu", default="L40S", choices=list(GPUS))
    p.add_argument("--batch", type=int, help="samples a GPU a step")
    p.add_argument("--half", type=_half, help="size of each canvas half, WIDTHxHEIGHT (768x1024)")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--targets", choices=list(TARGET_PRESETS), help="LoRA target preset")
    p.add_argument("--method", choices=["lora", "full"])
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", default=None,
                   help="keep every block's activations (faster, far more memory)")
    p.add_argument("--optimizer", default="adamw", choices=list(STATE_BYTES))
    a = p.parse_args(argv)

    cfg = load_config(a.config) if a.config else Config()
    hw, hh = a.half or (cfg.canvas.half_width, cfg.canvas.half_height)
    print(plan(
        half_width=hw, half_height=hh,
        batch_size=a.batch if a.batch is not None else cfg.train.batch_size,
        rank=a.rank if a.rank is not None else cfg.lora.rank,
        targets=a.targets or cfg.lora.targets,
        method=a.method or cfg.train.method,
        gradient_checkpointing=cfg.train.gradient_checkpointing if a.checkpointing is None else a.checkpointing,
        gpu=a.gpu, optimizer=a.optimizer,
    ).to_table())


if __name__ == "__main__":
    main()
