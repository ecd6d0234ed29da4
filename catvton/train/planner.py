"""Memory and FLOP plan of training the transformer a config names, without loading its weights.

The model is the one the job trains (the override, else the base's ``transformer/``): a local
folder's ``config.json`` found as :mod:`catvton.model.loading` finds it (the tiny model once
:func:`catvton.offline.resolve` built it), built on the meta device, so the plan counts the loaded
model. Hub ids are not fetched: planned as FLUX.1-Fill-dev (built-in config, 11,902,391,360
parameters), which CatVTON-Flux checkpoints share. Does batch 2 at 768x1024 fit an L40S, how fast::

    python -m catvton.train.planner --gpu L40S --batch 1 --half 768x1024 --rank 16
    python -m catvton.train.planner --config configs/l40s.yaml --gpu H100
    python -m catvton.train.planner --gpu L40S --batch 1 --no-checkpointing
    python easy_train.py test          # the tiny preset: the tiny model's own plan, on CPU

Units: plain counts; tables print GB = 1e9 bytes (MB below 0.1 GB), TFLOP = 1e12 (else GFLOP).
Device: ``L40S``, ``H100``, ``H200``: one GPU a worker, the peak is per GPU. ``CPU`` (a run with
``train.use_gpu: false``): all workers' peaks share this machine's RAM; no floor time.

Memory model (per worker, transformer only)
    ``weights``  every base parameter at ``train.precision`` (bf16 2 B, fp32 4 B).
    ``trainable state``  per trainable parameter: fp32 copy 4 + fp32 grad 4 + AdamW m, v 4 + 4
        = 16 B (``adamw8bit``: states 1 + 1, 10 B). For ``full`` that is every parameter, on top
        of the bf16 weights (mixed precision keeps an fp32 master copy; fp32 weights are that
        copy: 4 B less); nothing is sharded.
    ``activations``  measured on FLUX (3072 wide, bf16, LoRA attention+ff) per token, linear in
        sequence length: ~124 / ~118 KB a double / single block, +80 KB (an fp32 LoRA's inputs) on a
        bf16 base, measured by ``python -m catvton.train.dryrun``. Other widths: scaled by
        width / 3072 (a block saves a few width-sized vectors a token; the fused attention
        kernels, on CPU too, keep no seq x seq matrix), fp32 by 2, plus r values a token for
        each LoRA-wrapped linear's bottleneck (0.15% at FLUX width, 1/8 of the tiny model at
        r=32). Against what the tiny model's training forward saves: its preset (fp32) 29.4 MB
        planned for 27.8 MB (tests/test_planner.py); measured once, bf16 40% under (14.7 vs
        24.6 MB: the fp32 LoRA keeps fp32 copies of its inputs), ``attention`` targets 42% over
        (19.7 MB: frozen linears keep no inputs). Without checkpointing all are kept until the
        backward pass; with per-block checkpointing only each block's input (tokens x width)
        plus one block's activations while it is recomputed. Linear in batch; ``full`` alike.
    ``context``  on a GPU: CUDA context, cuBLAS/attention workspaces, allocator slack, 3 GB (2-4
        seen). Not counted on CPU: the Python, torch and Ray process itself.
    The peak is the sum. FACTS' measured ~70 GB (no checkpointing) and ~28 GB (checkpointing)
    at 6,656 tokens are without the context; the plan's 73 / 31 GB include it. Not counted: the
    VAE and text encoders (their outputs are cached beforehand by a Ray Data stage; a resident
    T5-XXL would add ~9.5 GB), and the few MB of rotary tables and timestep embeddings.

Compute model (per sample; a step is ``batch`` samples)
    ``forward``  2 x in x out for every linear layer and every token that passes through it (in
        a double block image tokens use the image-stream weights and text tokens the context-
        stream ones; single blocks see all tokens; the AdaLN modulation linears see one vector a
        sample), plus the LoRA path 2 x r x (in + out) a token, plus attention 4 x seq^2 x width a
        block (QK^T and AV over the joint sequence).
    ``backward``  activation gradients: linear forward again, attention twice (dQ, dK, dV, dP);
        the LoRA path twice (its input and weight gradients); ``full`` adds the base weights'
        gradients (linear forward once more).
    ``recompute``  with checkpointing, the forward again.
    At 768x1024 (6,656 tokens) with r=16 attention+ff this gives 117.6 TFLOP forward (86.6
    linear, 31.0 attention), 149.3 backward, 267.0 total, 384.6 with recompute (FACTS: ~117 /
    148 / 265 / ~400). The floor time is FLOPs / dense bf16 peak, i.e. 100% utilisation: real
    runs reach perhaps 40-60% of it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from catvton.config import Config, load_config
from catvton.model.loading import BaseModelError, _local_path, _override_config, resolve_base
from catvton.model.lora import TARGET_PRESETS, count_lora_params, target_regex
from catvton.model.skeleton import FLUX_FILL_TRANSFORMER

GB, TFLOP = 1e9, 1e12

TEXT_TOKENS = 512
"""T5 tokens a sample (FLUX.1-Fill-dev's ``max_sequence_length``)."""
FLUX_WIDTH = 3072  # FLUX.1-Fill-dev's block width, where the activations below were measured
ACT_BYTES_PER_TOKEN_DOUBLE = 124e3
"""Saved activations a token a double block, bf16 with LoRA (measured at FLUX width)."""
ACT_BYTES_PER_TOKEN_SINGLE = 118e3
"""Saved activations a token a single block, bf16 with LoRA (measured at FLUX width)."""
LORA_FP32_INPUT_BYTES_PER_TOKEN = 80e3  # a token a block, fp32 LoRA on a bf16 base: peft's fp32 input copies
CONTEXT_BYTES = 3e9
"""CUDA context, workspaces and allocator slack (GPU only)."""
PRECISION_BYTES = {"bf16": 2, "fp32": 4}
"""Bytes an element: base weights and activations at the run's ``train.precision``."""
STATE_BYTES = {"adamw": 16, "adamw8bit": 10}
"""Bytes a trainable parameter: fp32 param + fp32 grad + two optimizer states (fp32 or 8-bit)."""

FLUX_FILL_DEV = "black-forest-labs/FLUX.1-Fill-dev"
FULL_SIZE_CONFIG = FLUX_FILL_TRANSFORMER  # the hub's transformer/config.json, built in: no download


@dataclass(frozen=True)
class GPU:
    """A device the plan is checked against (``CPU`` included: its RAM, no FLOP/s peak)."""

    name: str
    memory_bytes: float
    """Nominal memory; the plan "fits" when its peak is at most this."""
    bf16_flops: float | None
    """Dense bf16 tensor-core peak, FLOP/s (None: not known, no floor time)."""


GPUS: dict[str, GPU] = {
    "L40S": GPU("L40S", 48 * GB, 362 * TFLOP),
    "H100": GPU("H100", 80 * GB, 989 * TFLOP),
    "H200": GPU("H200", 141 * GB, 989 * TFLOP),
}
CPU = "CPU"  # the device of a CPU run: this machine's RAM, shared by all workers


@dataclass(frozen=True)
class PlannedModel:
    """The transformer a plan describes: its name, where its config came from, and the config as
    sorted JSON (hashable: the meta model is cached by it)."""

    name: str
    source: str
    config_json: str


FULL_SIZE = PlannedModel("FLUX.1-Fill-dev", f"built-in config of {FLUX_FILL_DEV}",
                         json.dumps(FULL_SIZE_CONFIG, sort_keys=True))


def trained_transformer(base: str, override: str | None = None) -> PlannedModel:
    """The transformer a run on ``base`` (+ ``override``) trains, without its weights: a local
    folder's ``config.json``, found by the loader's own lookup (:mod:`catvton.model.loading`); a
    hub id is planned as FLUX.1-Fill-dev, not fetched. What the job refuses is refused here, with
    its message: an unresolved offline name (``tiny``: resolve it first), a missing folder."""
    from diffusers import FluxTransformer2DModel

    resolve_base(base)
    ref = override or base
    if _local_path(ref) is None:
        return PlannedModel(FULL_SIZE.name, f"{FULL_SIZE.source}; {ref} planned with it, not fetched",
                            FULL_SIZE.config_json)
    if override:
        path, subfolder, config = _override_config(override)  # its root config.json, else transformer/
    else:
        path, subfolder = base, "transformer"
        config = FluxTransformer2DModel.load_config(path, subfolder=subfolder)
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    name = Path(path).name + (f"/{subfolder}" if subfolder else "")
    return PlannedModel(name, str(Path(path) / (subfolder or "") / "config.json"), json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=4)
def meta_transformer(config_json: str):
    """A ``FluxTransformer2DModel`` of this config on the meta device (allocates nothing; cached).
    Do not move it to a device: it holds no data."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(json.loads(config_json))


def full_size_transformer_meta():
    """FLUX.1-Fill-dev's ``FluxTransformer2DModel`` on the meta device (11,902,391,360 params)."""
    return meta_transformer(FULL_SIZE.config_json)  # the bench builds its real-weights twin from .config


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


@functools.lru_cache(maxsize=4)
def _linears(config_json: str) -> tuple[tuple[str, int, int], ...]:
    m = meta_transformer(config_json)
    return tuple((n, mod.in_features, mod.out_features) for n, mod in m.named_modules()
                 if isinstance(mod, torch.nn.Linear))


def _size(n: float) -> str:
    return f"{n / GB:6.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:6.2f} MB"


def _flop(n: float) -> str:
    return f"{n / TFLOP:.1f} TFLOP" if n >= 0.1 * TFLOP else f"{n / 1e9:.3g} GFLOP"


@dataclass
class Plan:
    """What one training step of the planned transformer costs on one worker's device (``gpu``: a
    name of :data:`GPUS`, or ``CPU``): bytes per worker, FLOPs per step (whole batch; the linear
    ones include the LoRA path), ``precision`` that of the base weights and activations."""

    model: str
    """The transformer's name: ``FLUX.1-Fill-dev``, or the folder it is loaded from."""
    model_source: str
    """Where its config came from (a ``config.json``, or the built-in FLUX.1-Fill-dev config)."""
    architecture: str
    half_width: int
    half_height: int
    batch_size: int
    method: str
    rank: int
    targets: str
    gradient_checkpointing: bool
    optimizer: str
    precision: str
    gpu: str
    num_workers: int
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
    memory_bytes: float
    """The GPU's memory, or on CPU this machine's RAM."""
    fits: bool
    """GPU: the peak fits one GPU. CPU: ``num_workers`` peaks fit the RAM."""
    flops_linear_forward: float
    flops_attention_forward: float
    flops_forward: float
    flops_backward: float
    flops_recompute: float
    flops_total: float
    """forward + backward + recompute."""
    seconds_per_sample: float | None
    """Floor: flops_total / batch / the GPU's dense bf16 peak (None on CPU: no peak known)."""

    def to_table(self) -> str:
        what = f"lora r={self.rank} {self.targets}" if self.method == "lora" else "full fine-tune"
        b, cpu = self.batch_size, self.gpu == CPU
        free = self.memory_bytes - self.peak_bytes * (self.num_workers if cpu else 1)
        verdict = f"fits ({_size(free).strip()} free)" if self.fits else f"DOES NOT FIT ({_size(-free).strip()} over)"
        peak = (f"{_size(self.peak_bytes)} a worker x {self.num_workers} of {self.memory_bytes / GB:.1f} GB RAM "
                f"(this machine): {verdict}" if cpu else f"{_size(self.peak_bytes)} of {self.memory_bytes / GB:.0f} GB: {verdict}")
        rows = [
            ("model", f"FluxTransformer2DModel, {self.architecture} (config: {self.model_source})"),
            ("parameters", f"{self.params_total:,} total, {self.params_trainable:,} trainable "
                           f"({100 * self.params_trainable / self.params_total:.2f}%)"),
            ("tokens / sample", f"{self.tokens_per_sample:,} ({self.image_tokens:,} image + {self.text_tokens} text)"),
            ("weights", f"{_size(self.weights_bytes)}  {self.precision}"),
            ("trainable state", f"{_size(self.trainable_state_bytes)}  {self.optimizer}, "
                                f"{STATE_BYTES[self.optimizer]} B a trainable param"),
            ("activations", f"{_size(self.activations_bytes)}  {self.precision}, batch {b} (checkpointing on: "
                            f"{_size(self.activations_ckpt_bytes).strip()}, off: "
                            f"{_size(self.activations_no_ckpt_bytes).strip()})"),
            ("context", "  not counted on CPU (the Python, torch and Ray process itself)" if cpu
             else f"{_size(self.context_bytes)}  CUDA context, workspaces"),
            ("peak", peak),
            ("FLOP / step", f"forward {_flop(self.flops_forward)} (linear {_flop(self.flops_linear_forward)}, "
                            f"attention {_flop(self.flops_attention_forward)}) + backward "
                            f"{_flop(self.flops_backward)} + recompute {_flop(self.flops_recompute)} "
                            f"= {_flop(self.flops_total)}"),
            ("floor", "not estimated: no peak FLOP/s known for CPUs" if self.seconds_per_sample is None else
             f"{self.seconds_per_sample:.2f} s / sample, {self.seconds_per_sample * b:.2f} s / step at "
             f"{GPUS[self.gpu].bf16_flops / TFLOP:.0f} TFLOP/s dense bf16 (100% utilisation)"),
        ]
        device = f"CPU {self.precision}, {self.num_workers} worker(s)" if cpu else f"{self.gpu} {self.precision}"
        head = (f"plan: {self.model}, {what}, canvas 2 x {self.half_width}x{self.half_height}, batch {b}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, {device}")
        width = max(len(k) for k, _ in rows)
        return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])

    __str__ = to_table


def plan(half_width: int, half_height: int, batch_size: int, rank: int, targets: str, method: str = "lora",
         gradient_checkpointing: bool = True, gpu: str = "L40S", optimizer: str = "adamw",
         text_tokens: int = TEXT_TOKENS, model: PlannedModel = FULL_SIZE, precision: str = "bf16",
         num_workers: int = 1) -> Plan:
    """The plan for a canvas of two ``half_width x half_height`` halves side by side, training
    ``model`` (FLUX.1-Fill-dev unless given) on ``gpu`` (or ``CPU``) at ``precision``."""
    problems = [problem for bad, problem in (
        (half_width <= 0 or half_height <= 0 or half_width % 16 or half_height % 16,
         f"half size {half_width}x{half_height}: both must be positive multiples of 16"),
        (batch_size < 1, f"batch_size={batch_size}: must be at least 1"),
        (method not in ("lora", "full"), f"method={method!r}: choose lora or full"),
        (method == "lora" and rank < 1, f"rank={rank}: must be at least 1"),
    ) if bad]
    problems += [f"{name}={value!r}: choose from {choices}" for name, value, choices in (
        ("targets", targets, list(TARGET_PRESETS)), ("gpu", gpu, [*GPUS, CPU]),
        ("optimizer", optimizer, list(STATE_BYTES)), ("precision", precision, list(PRECISION_BYTES)),
    ) if value not in choices]
    if problems:
        raise ValueError("invalid plan:\n  - " + "\n  - ".join(problems))

    m = meta_transformer(model.config_json)
    n_double, n_single, hidden = len(m.transformer_blocks), len(m.single_transformer_blocks), m.inner_dim
    params_total = sum(p.numel() for p in m.parameters())
    lora = method == "lora"
    params_trainable = count_lora_params(m, rank, targets) if lora else params_total
    rx = re.compile(target_regex(targets))

    image = (half_height // 16) * (2 * half_width // 16)  # packed image tokens
    seq, elem = image + text_tokens, PRECISION_BYTES[precision]

    # memory
    weights = params_total * elem
    state = params_trainable * (STATE_BYTES[optimizer] - (4 if not lora and precision == "fp32" else 0))
    scale = hidden / FLUX_WIDTH * elem / 2  # the measured bf16 FLUX figures, at this width and precision
    act_double, act_single = ACT_BYTES_PER_TOKEN_DOUBLE * scale, ACT_BYTES_PER_TOKEN_SINGLE * scale
    cast = LORA_FP32_INPUT_BYTES_PER_TOKEN * hidden / FLUX_WIDTH if lora and precision != "fp32" else 0.0
    act_double, act_single = act_double + cast, act_single + cast  # the fp32 LoRA's inputs, cast and kept
    # each LoRA-wrapped linear also saves its rank-r bottleneck, r values a token it sees
    lora_act = sum(rank * elem * _tokens_through(n, image, text_tokens)
                   for n, _, _ in _linears(model.config_json) if lora and rx.fullmatch(n))
    act_off = batch_size * (seq * (n_double * act_double + n_single * act_single) + lora_act)
    act_on = batch_size * (seq * ((n_double + n_single) * hidden * elem + max(act_double, act_single))
                           + lora_act / (n_double + n_single))
    act = act_on if gradient_checkpointing else act_off
    context = 0.0 if gpu == CPU else CONTEXT_BYTES
    peak = weights + state + act + context
    dev = GPUS[gpu] if gpu != CPU else GPU(CPU, float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), None)
    fits = peak * (num_workers if gpu == CPU else 1) <= dev.memory_bytes

    # compute, per sample
    lin = lora_fwd = 0.0
    for name, fin, fout in _linears(model.config_json):
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
        model=model.name, model_source=model.source,
        architecture=f"{n_double} double + {n_single} single blocks, {hidden} wide",
        half_width=half_width, half_height=half_height, batch_size=batch_size, method=method, rank=rank,
        targets=targets, gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, precision=precision,
        gpu=gpu, num_workers=num_workers, params_total=params_total, params_trainable=params_trainable,
        image_tokens=image, text_tokens=text_tokens, tokens_per_sample=seq, weights_bytes=weights,
        trainable_state_bytes=state, activations_bytes=act, activations_no_ckpt_bytes=act_off,
        activations_ckpt_bytes=act_on, context_bytes=context, peak_bytes=peak, memory_bytes=dev.memory_bytes,
        fits=fits, flops_linear_forward=batch_size * (lin + lora_fwd), flops_attention_forward=batch_size * attn,
        flops_forward=batch_size * fwd, flops_backward=batch_size * bwd, flops_recompute=batch_size * rec,
        flops_total=batch_size * total,
        seconds_per_sample=None if dev.bf16_flops is None else total / dev.bf16_flops,
    )


def plan_from_config(cfg: Config, gpu: str = "L40S", optimizer: str = "adamw") -> Plan:
    """The plan of a :class:`catvton.config.Config`: its transformer (:func:`trained_transformer`:
    offline names must be resolved first), canvas, prompt length, batch, method, precision,
    checkpointing and LoRA, on one ``gpu`` (``train.use_gpu``) or on this machine's CPUs."""
    return plan(
        half_width=cfg.canvas.half_width, half_height=cfg.canvas.half_height, batch_size=cfg.train.batch_size,
        rank=cfg.lora.rank, targets=cfg.lora.targets, method=cfg.train.method,
        gradient_checkpointing=cfg.train.gradient_checkpointing, gpu=gpu if cfg.train.use_gpu else CPU,
        optimizer=optimizer, text_tokens=cfg.model.max_sequence_length,
        model=trained_transformer(cfg.model.base, cfg.model.transformer_override),
        precision=cfg.train.precision, num_workers=cfg.train.num_workers,
    )


def _half(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--half {text!r}: expected WIDTHxHEIGHT, e.g. 768x1024") from None
    return w, h


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m catvton.train.planner", description=(
        "Memory and FLOP plan of training the transformer a config names (default: full-size FLUX.1-Fill-dev, "
        "CatVTON-Flux) on one GPU. Values not given come from --config, else from the code defaults of "
        "catvton.config. The offline tiny preset's plan: python easy_train.py test."))
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
    t = cfg.train
    cfg.canvas.half_width, cfg.canvas.half_height = a.half or (cfg.canvas.half_width, cfg.canvas.half_height)
    t.batch_size = t.batch_size if a.batch is None else a.batch
    cfg.lora.rank = cfg.lora.rank if a.rank is None else a.rank
    cfg.lora.targets, t.method, t.use_gpu = a.targets or cfg.lora.targets, a.method or t.method, True
    t.gradient_checkpointing = t.gradient_checkpointing if a.checkpointing is None else a.checkpointing
    try:
        print(plan_from_config(cfg, gpu=a.gpu, optimizer=a.optimizer).to_table())
    except BaseModelError as e:
        p.error(f"{e}. The tiny preset's own plan: `python easy_train.py test` prints it")


if __name__ == "__main__":
    main()
