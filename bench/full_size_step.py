"""The full-size FLUX.1-Fill-dev training step and try-on on one GPU, measured, not guessed.

Builds the real transformer shape (11.9B parameters, the planner's config) with random weights
directly on the GPU in bf16 (no download, no Hub token), attaches the production LoRA (r=16,
attention + feed-forward) through the training code (``catvton.train.engine``), and times the same
step the workers run (``engine.train_step``: ``fill_loss`` + backward, clipping, AdamW, schedule) at
the production canvas, 768x1024 per half (6,144 image + 512 text tokens), batch 1 and 2, with and
without gradient checkpointing. Each row reports seconds per sample, peak memory, MFU (the
planner's model FLOPs, forward + backward, over the GPU's dense bf16 peak; HFU adds the recomputed
forward) and the planner's memory prediction error. Then a 28-step try-on (``FluxFillPipeline``,
random-weight FLUX VAE, precomputed prompt embeddings) at the same canvas. Levers, each a row of
its own at batch 1: the SDPA kernels (flash, efficient, cudnn), ``torch.compile`` of every block,
and fewer recomputed blocks where the planner says the memory allows; for the try-on, the
inference levers of ``infer`` (step caches first_block, taylorseer, mag at their defaults; a fused
LoRA) applied by the serving code (``catvton.infer.levers``), transformer passes counted.

    python bench/full_size_step.py --out outputs/bench/full_size.json        # on a GPU (~10 min)
    python bench/full_size_step.py --rows base --no-tryon                     # the four base rows only
    python bench/full_size_step.py --rows preset --fake                        # bench/gpu_check.sh's row
    python bench/full_size_step.py --tiny --device cpu                        # tiny shape on CPU (the test)

Rows that run out of memory are recorded as OOM, a lever the card cannot run (an SDPA kernel
it lacks) as ERROR with the message; neither stops the other rows. Results go to docs/PERFORMANCE.md
with the card's name (printed). No timing is asserted anywhere. The module is long because it is one
benchmark: the training rows, their planner figures and the try-on rows share its builders.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TINY_TRANSFORMER = dict(in_channels=384, out_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(4, 6, 6))
"""A FLUX Fill transformer of the same family, small enough for a CPU test."""

FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
"""FLUX.1's VAE config (``vae/config.json`` of the hub repo)."""

TINY_VAE = dict(FLUX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)


@dataclass
class Shape:
    """What is built and at which canvas."""

    tiny: bool
    half_width: int
    half_height: int
    text_tokens: int
    text_dim: int
    pooled_dim: int

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.half_height // 8, 2 * self.half_width // 8


FULL = Shape(False, 768, 1024, 512, 4096, 768)
TINY = Shape(True, 32, 32, 8, 32, 32)


def bench_config(batch: int, checkpointing: bool, dtype: torch.dtype):
    """The production training config (``Config()`` defaults: LoRA r=16 alpha 32 on attention +
    feed-forward, canvas loss, guidance 1) at ``batch``; plain AdamW, which the planner assumes; one
    micro-batch per optimizer step, the step the planner's figures (and MFU) describe (accumulation
    only spreads the optimizer's share over more micro-batches)."""
    from catvton.config import Config

    cfg = Config()
    cfg.train.batch_size = batch
    cfg.train.grad_accum = 1
    cfg.train.gradient_checkpointing = checkpointing
    cfg.train.optimizer = "adamw"
    cfg.train.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    cfg.train.warmup_steps = 0
    return cfg


def build_base(shape: Shape, device: torch.device, dtype: torch.dtype):
    """The frozen base transformer, random weights, built where it will run (no fp32 copy: at full
    size that would be 47.6 GB)."""
    from diffusers import FluxTransformer2DModel

    from catvton.train.planner import full_size_transformer_meta

    config = dict(TINY_TRANSFORMER) if shape.tiny else dict(full_size_transformer_meta().config)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with device:
            model = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(old)
    # Random weights at FLUX's init scale make bf16 activations overflow after 57 blocks; shrink
    # them so the loss stays finite. Speed and memory do not depend on the values.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def synthetic_batch(shape: Shape, batch: int, device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Latents and a person-half mask in the cache's layout (see ``catvton.cache.read.decode_batch``)."""
    h, w = shape.latent_hw
    H, W2 = shape.half_height, 2 * shape.half_width
    mask = torch.zeros(batch, 1, H, W2)
    mask[:, :, H // 3:, W2 // 2 + W2 // 8: W2 - W2 // 8] = 1  # a lower-body box on the person half
    out = {"target": torch.randn(batch, 16, h, w, generator=generator),
           "masked": torch.randn(batch, 16, h, w, generator=generator), "mask": mask}
    return {k: v.to(device) for k, v in out.items()}


def text_context(shape: Shape, device, dtype):
    from catvton.train.engine import TextContext

    g = torch.Generator().manual_seed(1)
    embeds = {"prompt_embeds": torch.randn(1, shape.text_tokens, shape.text_dim, generator=g),
              "pooled_prompt_embeds": torch.randn(1, shape.pooled_dim, generator=g)}
    return TextContext(embeds, shape.latent_hw, device, dtype)


class Recompute(torch.nn.Module):
    """One transformer block whose activations are recomputed in the backward pass (the
    ``--keep-blocks`` lever: only some blocks checkpointed)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def recompute_all_but(model, keep: int) -> int:
    """Checkpoint every block except the last ``keep`` single blocks (their activations stay in
    memory: those are recomputed last in the backward, so keeping them saves the most time per
    byte). Returns how many blocks recompute."""
    model.disable_gradient_checkpointing()
    blocks = [(model.transformer_blocks, i) for i in range(len(model.transformer_blocks))]
    blocks += [(model.single_transformer_blocks, i) for i in range(len(model.single_transformer_blocks))]
    wrapped = blocks[:max(0, len(blocks) - keep)]
    for seq, i in wrapped:
        seq[i] = Recompute(seq[i])
    return len(wrapped)


def peak_memory(device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # whole-process RSS on CPU


def reset_memory(device) -> None:
    gc.collect()  # peft and diffusers modules hold reference cycles: free the last row's 24 GB now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdpa_context(backend: str):
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend])


def gpu_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def planner_gpu(name: str) -> str | None:
    """The planner's GPU entry for a CUDA device name (None: no dense bf16 peak known)."""
    for key in ("H200", "H100", "L40S"):
        if key in name.upper():
            return key
    return None


def time_row(shape: Shape, device, dtype, batch: int, checkpointing: bool, steps: int, warmup: int,
             sdpa: str = "default", compile_blocks: bool = False, keep_blocks: int | None = None) -> dict:
    """Build base + LoRA (the training code's ``build_transformer``), run ``warmup + steps``
    optimizer steps (the training code's ``train_step``), and report the timed ones. An OOM
    becomes ``{"oom": True}``."""
    from catvton.train import engine as S

    row = {"batch": batch, "checkpointing": checkpointing, "sdpa": sdpa, "compile": compile_blocks,
           "keep_blocks": keep_blocks}
    reset_memory(device)
    model = None
    try:
        cfg = bench_config(batch, checkpointing and keep_blocks is None, dtype)
        model = S.build_transformer(cfg, device, dtype, base=build_base(shape, device, dtype))
        if keep_blocks is not None:
            row["recomputed_blocks"] = recompute_all_but(model, keep_blocks)
        if compile_blocks:
            for seq in (model.transformer_blocks, model.single_transformer_blocks):
                for b in seq:
                    b.compile()
        params = S.trainable_parameters(model)
        row["trainable_params"] = sum(p.numel() for p in params)
        optimizer, scheduler = S.make_optimizer(cfg, params, steps + warmup)
        gen = torch.Generator().manual_seed(0)
        text = text_context(shape, device, dtype)
        data = synthetic_batch(shape, batch, device, gen)
        loss_fn = functools.partial(S.fill_loss, text=text, cfg=cfg, generator=gen)
        times, losses = [], []
        with sdpa_context(sdpa):
            for i in range(warmup + steps):
                sync(device)
                t0 = time.perf_counter()
                result = S.train_step(model, [data] * cfg.train.grad_accum, loss_fn, optimizer, scheduler, params,
                                      cfg.train.max_grad_norm)
                sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                    losses.append(result.loss)
        sec = sorted(times)[len(times) // 2]
        row.update(sec_per_step=sec, sec_per_sample=sec / batch, peak_bytes=peak_memory(device),
                   loss=losses[-1], steps_timed=len(times), oom=False)
    except torch.OutOfMemoryError:
        row.update(oom=True, peak_bytes=peak_memory(device))
    except RuntimeError as e:  # e.g. "No available kernel" for an SDPA backend this card lacks
        row.update(oom=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        del model
        reset_memory(device)
    return row


def add_plan(row: dict, shape: Shape, gpu: str | None) -> dict:
    """Planner figures for the row (full size only): prediction error and MFU/HFU."""
    from catvton.train import planner as P

    if shape.tiny or row.get("error"):
        return row
    p = P.plan(shape.half_width, shape.half_height, row["batch"], rank=16, targets="attention+ff",
               gradient_checkpointing=row["checkpointing"], gpu=gpu or "H100")
    predicted, recompute = p.peak_bytes, p.flops_recompute
    if row.get("recomputed_blocks") is not None:  # partial checkpointing: interpolate per block
        blocks = 57
        kept = blocks - row["recomputed_blocks"]
        predicted += kept * (p.activations_no_ckpt_bytes - p.activations_ckpt_bytes) / blocks
        recompute *= row["recomputed_blocks"] / blocks
    tensors = predicted - p.context_bytes  # the planner's peak minus CUDA context = what torch allocates
    row["predicted_peak_bytes"] = predicted
    row["predicted_fits"] = predicted <= P.GPUS[gpu or "H100"].memory_bytes
    if not row["oom"]:
        row["prediction_error"] = row["peak_bytes"] / tensors - 1.0
        if gpu is not None:
            peak = P.GPUS[gpu].bf16_flops
            model_flops = p.flops_forward + p.flops_backward
            row["mfu"] = model_flops / row["sec_per_step"] / peak
            row["hfu"] = (model_flops + recompute) / row["sec_per_step"] / peak
            row["floor_sec_per_sample"] = (model_flops + recompute) / row["batch"] / peak
    return row


def keep_blocks_for(shape: Shape, batch: int, gpu: str | None, device) -> int:
    """How many blocks can keep their activations (not recompute) in the free memory the planner
    leaves at full checkpointing, with 10% of the GPU spare."""
    from catvton.train import planner as P

    if shape.tiny or gpu is None:
        return 1
    p = P.plan(shape.half_width, shape.half_height, batch, rank=16, targets="attention+ff", gpu=gpu)
    per_block = (p.activations_no_ckpt_bytes - p.activations_ckpt_bytes) / 57
    total = torch.cuda.get_device_properties(device).total_memory
    free = 0.9 * total - p.peak_bytes
    return max(0, min(57, int(free // per_block)))


TRYON_LEVERS = {"none": {}, "first_block": dict(cache="first_block"), "taylorseer": dict(cache="taylorseer"),
                "mag": dict(cache="mag"), "fused": dict(fuse_lora=True)}
"""The try-on rows: ``infer`` fields over ``InferConfig()``'s defaults (thresholds included), applied by
the serving code's :func:`~catvton.infer.levers.apply_levers`; ``mag`` calibrates its ratios first."""


def time_tryon(shape: Shape, device, dtype, steps: int, lever: str = "none") -> dict:
    """A ``steps``-step try-on through ``FluxFillPipeline`` at the canvas: random-weight transformer
    with the LoRA attached, FLUX's VAE shape, precomputed prompt embeddings (T5/CLIP left out: the
    service encodes its one prompt once); ``lever``: a :data:`TRYON_LEVERS` row. With random weights
    the passes that first_block and mag skip are not the real model's: read their seconds per pass."""
    from diffusers import AutoencoderKL, FluxFillPipeline

    from catvton.config import InferConfig
    from catvton.infer.levers import PassCounter, apply_levers, calibrate_mag_ratios
    from catvton.offline.tiny_base import build_scheduler
    from catvton.train import engine as S

    reset_memory(device)
    cfg = bench_config(1, False, dtype)
    model = S.build_transformer(cfg, device, dtype, base=build_base(shape, device, dtype)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE if shape.tiny else FLUX_VAE)).to(device, dtype).eval()
    pipe = FluxFillPipeline(scheduler=build_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    text = text_context(shape, device, dtype)
    H, W2 = shape.half_height, 2 * shape.half_width
    image = torch.rand(1, 3, H, W2)
    mask = torch.zeros(1, 1, H, W2)
    mask[:, :, H // 3:, W2 // 2:] = 1
    cache = None

    def run(n: int):
        with torch.no_grad(), cache.around(n) if cache is not None else contextlib.nullcontext():
            return pipe(image=image, mask_image=mask, prompt_embeds=text.prompt, pooled_prompt_embeds=text.pooled,
                        height=H, width=W2, num_inference_steps=n, guidance_scale=30.0, output_type="np",
                        generator=torch.Generator().manual_seed(0), max_sequence_length=shape.text_tokens).images

    infer = InferConfig(steps=steps, **TRYON_LEVERS[lever])
    cache, applied = apply_levers(pipe, infer, device, lora_loaded=True,
                                  calibrate=lambda n: calibrate_mag_ratios(model, n, lambda: run(n)))
    run(1)  # warm-up: kernels, allocator
    reset_memory(device)
    sync(device)
    t0 = time.perf_counter()
    with PassCounter(pipe.transformer) as counter:
        out = run(steps)
    sync(device)
    sec = time.perf_counter() - t0
    result = {"lever": lever, "steps": steps, "seconds": sec, "sec_per_step": sec / steps, "passes": counter.passes,
              "fused_lora": applied["fused_lora"], "peak_bytes": peak_memory(device), "output_shape": list(out.shape),
              "finite": bool(torch.isfinite(torch.as_tensor(out)).all())}
    pipe = model = vae = cache = None  # release them (run() holds pipe) for reset_memory to free
    reset_memory(device)
    return result


def add_fake(row: dict) -> dict:
    """The fake-tensor measurement of the same step (``catvton.train.dryrun``, CPU work, no GPU
    memory), beside ``torch.cuda.max_memory_allocated``: what the dry run claims, checked. One
    micro-batch and no optimizer priming here would differ from the dry run's steady state, so the
    row's own conditions are measured: 1 micro-batch, AdamW state present (the timed steps are not
    the first)."""
    from catvton.model.skeleton import write_skeleton
    from catvton.train.full_size import dry_config
    from catvton.train.measure import measure_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dry_config(bench_config(row["batch"], row["checkpointing"], torch.bfloat16),
                                write_skeleton(Path(tmp) / "flux-fill"), Path(tmp))
        m = measure_step(cfg, row["batch"], 16, row["checkpointing"], accum=1)
    row["fake_tensor_peak_bytes"] = m.tensor_peak
    row["fake_categories"] = m.categories
    if not row.get("oom"):
        row["fake_error"] = row["peak_bytes"] / m.tensor_peak - 1.0
    return row


def run(shape: Shape, device: torch.device, rows: str, steps: int, warmup: int, tryon_steps: int | None,
        log=print, fake: bool = False) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = gpu_name(device)
    gpu = planner_gpu(name) if device.type == "cuda" else None
    result = {"device": name, "planner_gpu": gpu, "torch": torch.__version__, "shape": shape.__dict__,
              "tokens_per_sample": shape.latent_hw[0] * shape.latent_hw[1] // 4 + shape.text_tokens, "rows": []}
    if rows == "preset":  # the L40S preset's step (bench/gpu_check.sh): batch 2, checkpointing on
        plan = [dict(batch=2, checkpointing=True)]
    else:
        plan = [dict(batch=b, checkpointing=c) for c in (True, False) for b in (1, 2)]
    if rows == "all":
        backends = ["flash", "efficient", "cudnn"] if device.type == "cuda" else ["math"]
        plan += [dict(batch=1, checkpointing=True, sdpa=s) for s in backends]
        plan += [dict(batch=1, checkpointing=True, compile_blocks=True)]
        plan += [dict(batch=1, checkpointing=True, keep_blocks=keep_blocks_for(shape, 1, gpu, device))]
    for spec in plan:
        row = add_plan(time_row(shape, device, dtype, steps=steps, warmup=warmup, **spec), shape, gpu)
        if fake and not shape.tiny and not row.get("error") and set(spec) == {"batch", "checkpointing"}:
            add_fake(row)
        result["rows"].append(row)
        log(format_row(row))
    levers = list(TRYON_LEVERS) if rows == "all" else (["none", "first_block"] if rows == "preset" else ["none"])
    for lever in levers if tryon_steps else []:
        t = time_tryon(shape, device, dtype, tryon_steps, lever)
        result.setdefault("tryon", []).append(t)
        log(f"try-on {lever:11s} {t['steps']} steps: {t['seconds']:.2f} s ({t['sec_per_step']:.3f} s/step, "
            f"{t['passes']:.1f} passes), peak {t['peak_bytes'] / 1e9:.1f} GB")
    return result


def format_row(r: dict) -> str:
    lever = (f"sdpa={r['sdpa']}" if r["sdpa"] != "default" else "") + (" compile" if r["compile"] else "") + \
        (f" keep_blocks={r['keep_blocks']}" if r.get("keep_blocks") is not None else "")
    head = f"batch {r['batch']} ckpt {'on ' if r['checkpointing'] else 'off'} {lever.strip() or 'baseline':<22}"
    if r.get("error"):
        return f"{head} ERROR {r['error']}"
    if r["oom"]:
        return f"{head} OOM (predicted peak {r.get('predicted_peak_bytes', math.nan) / 1e9:.1f} GB)"
    extra = ""
    if "mfu" in r:
        extra = f"  MFU {100 * r['mfu']:.1f}%  HFU {100 * r['hfu']:.1f}%"
    if "prediction_error" in r:
        extra += f"  planner error {100 * r['prediction_error']:+.1f}%"
    if "fake_error" in r:
        extra += f"  fake-tensor peak {r['fake_tensor_peak_bytes'] / 1e9:.2f} GB ({100 * r['fake_error']:+.1f}%)"
    return (f"{head} {r['sec_per_sample']:.3f} s/sample  peak {r['peak_bytes'] / 1e9:.2f} GB  "
            f"loss {r['loss']:.3f}{extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny transformer and canvas (CPU test of this code)")
    p.add_argument("--rows", choices=["preset", "base", "all"], default="all",
                   help="preset: the L40S preset's step (batch 2, checkpointing) and try-on with and without the "
                        "first-block cache; base: batch 1/2 x checkpointing; all: + levers")
    p.add_argument("--fake", action="store_true",
                   help="beside each base row, the dry run's fake-tensor peak of the same step (CPU, ~1 min a row)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps a row (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tryon-steps", type=int, default=28)
    p.add_argument("--no-tryon", action="store_true")
    p.add_argument("--out", help="write the JSON result here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # shared cores: a second thread costs more than it gives (PERFORMANCE.md)
        if not a.tiny:
            p.error("the full-size step needs a GPU (~31 GB at batch 1); use --tiny on CPU")
    shape = TINY if a.tiny else FULL
    print(f"device: {gpu_name(device)}; canvas 2 x {shape.half_width}x{shape.half_height}, "
          f"{shape.latent_hw[0] * shape.latent_hw[1] // 4} image + {shape.text_tokens} text tokens")
    result = run(shape, device, a.rows, a.steps, a.warmup, None if a.no_tryon else a.tryon_steps, fake=a.fake)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
