"""The try-on pipeline: [garment | person] canvas + mask -> the person wearing the garment.

One code path for the sample grids during training, the evaluation and (later) the server:
diffusers' ``FluxFillPipeline`` regenerates the whole canvas, then the generated pixels are
pasted back only inside the mask on the person half, as CatVTON does, so every unmasked pixel
of the output is the input's.

:meth:`TryOn.load` is where every inference path (server replicas, evaluation, Ray Data batch
inference) gets its pipeline, so the speed levers of ``cfg.infer`` (step caching, a fused LoRA,
torch.compile) are applied there, once (:mod:`catvton.infer.levers`). It is also where a loaded
pipeline gives back the memory it no longer needs (issue 24: the full-size model did not fit a 48 GB
L40S with a batch of 4): the one prompt is encoded once, then T5-XXL (~9.5 GB in bf16) and CLIP are
dropped (no request carries a prompt, and nothing after loading encodes one), and on CUDA the VAE
encodes and decodes a batch one image at a time (slicing: the same pixels, a batch's peak no
higher than one image's). ``from_parts`` (the training grids) keeps its encoders: its caller owns them.

Arrays: canvases ``(N, H, 2W, 3)`` float32 in [0, 1], masks ``(N, H, 2W)`` in {0, 1} (zero
over the garment half).
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from catvton.config import Config
from catvton.data.canvas import to_uint8
from catvton.infer.levers import StepCache, apply_levers, calibrate_mag_ratios, garment_guidance, probe_canvas
from catvton.model.host import host_array
from catvton.model.loading import load_pipeline, pipeline_around


class TryOn:
    """A loaded pipeline and the prompt's embeddings (computed once); ``cache``: the step cache
    armed around each call (None: every step a full pass); ``levers``: what :meth:`load` applied."""

    def __init__(self, pipe, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, cfg: Config):
        self.pipe = pipe
        self.prompt_embeds = prompt_embeds
        self.pooled = pooled_prompt_embeds
        self.cfg = cfg
        self.cache: StepCache | None = None
        self.levers: dict = {"cache": "none", "fused_lora": False, "compiled": False}
        self.memory: dict = {"text_encoders": "kept" if getattr(pipe, "text_encoder_2", None) is not None else "none",
                             "vae_slicing": bool(getattr(getattr(pipe, "vae", None), "use_slicing", False))}
        """What the pipeline holds beside the transformer and the VAE (/v1/info shows it)."""
        self._levers_applied = False

    @classmethod
    def load(cls, cfg: Config, lora: str | Path | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32, vae_slicing: bool | None = None) -> "TryOn":
        """Base (+ transformer override) from the config, plus a LoRA folder if given, with the
        levers of ``cfg.infer`` applied (:func:`~catvton.infer.levers.apply_levers`). The prompt is
        encoded here and the text encoders are freed (:func:`free_text_encoders`). ``vae_slicing``:
        the VAE takes a batch one image at a time; None: where the pipeline runs on CUDA
        (:func:`wants_vae_slicing`)."""
        pipe = load_pipeline(cfg.model.base, cfg.model.transformer_override, torch_dtype=dtype, device=device)
        if lora is not None:
            pipe.load_lora_weights(str(lora))  # before encoding: a LoRA may carry text-encoder layers
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            prompt, pooled, _ = pipe.encode_prompt(cfg.model.prompt, prompt_2=None, device=device,
                                                   max_sequence_length=cfg.model.max_sequence_length)
        free_text_encoders(pipe)
        if wants_vae_slicing(vae_slicing, device):
            pipe.vae.enable_slicing()
        tryon = cls(pipe, prompt, pooled, cfg)
        tryon.memory = {"text_encoders": "freed after encoding the prompt", "vae_slicing": bool(pipe.vae.use_slicing)}
        return tryon.with_levers(device, lora_loaded=lora is not None)

    def with_levers(self, device: str | torch.device, lora_loaded: bool) -> "TryOn":
        """This try-on with the levers of ``cfg.infer`` applied to its pipeline (once: fusing twice
        would add the LoRA twice)."""
        if self._levers_applied:
            raise RuntimeError("the levers are already applied to this pipeline")
        self._levers_applied = True
        self.cache, self.levers = apply_levers(self.pipe, self.cfg.infer, device, lora_loaded, self.calibrate_mag)
        return self

    def calibrate_mag(self, steps: int, canvases: np.ndarray | None = None, masks: np.ndarray | None = None) -> list[float]:
        """MagCache's magnitude ratios of this pipeline at ``steps`` steps, measured on ``canvases``
        (one uncached batch call: their average), or on a seeded noise canvas when none is given."""
        if canvases is None:
            canvases, masks = probe_canvas(self.cfg.canvas.half_height, self.cfg.canvas.half_width, self.cfg.infer.seed)
        cache, self.cache = self.cache, None
        if cache is not None:
            cache.disarm()  # calibration needs every block to run
        try:
            return calibrate_mag_ratios(self.pipe.transformer, steps, lambda: self.fill_canvases(canvases, masks, steps=steps))
        finally:
            self.cache = cache

    @classmethod
    def from_parts(cls, cfg: Config, transformer: torch.nn.Module,
                   text_embeds: dict[str, torch.Tensor] | None = None) -> "TryOn":
        """Around a transformer being trained (its current weights), without reloading it. On a GPU
        the VAE is sliced: rank 0's sample grid decodes ``run.samples`` canvases beside the training
        state, unsliced ~2.4 GB an image at 1536x1024 (measured, ``catvton.train.dryrun``)."""
        device = next(transformer.parameters()).device
        # the frozen base's dtype (LoRA parameters are float32 even on a bf16 base)
        frozen = [p.dtype for p in transformer.parameters() if not p.requires_grad]
        dtype = frozen[0] if frozen else next(transformer.parameters()).dtype
        pipe = pipeline_around(cfg.model.base, transformer, dtype, text_encoders=text_embeds is None)
        pipe.vae.to(device).eval()
        if wants_vae_slicing(None, device):
            pipe.vae.enable_slicing()
        pipe.set_progress_bar_config(disable=True)
        if text_embeds is None:
            pipe.text_encoder.to(device).eval()
            pipe.text_encoder_2.to(device).eval()
            with torch.no_grad():
                prompt, pooled, _ = pipe.encode_prompt(cfg.model.prompt, prompt_2=None, device=device,
                                                       max_sequence_length=cfg.model.max_sequence_length)
        else:
            prompt, pooled = text_embeds["prompt_embeds"], text_embeds["pooled_prompt_embeds"]
        return cls(pipe, prompt.to(device, dtype), pooled.to(device, dtype), cfg)

    @torch.no_grad()
    def fill_canvases(self, canvases: np.ndarray, masks: np.ndarray, seed: int | Sequence[int] | None = None,
                      steps: int | None = None, guidance: float | None = None) -> np.ndarray:
        """Generate and paste back: returns ``(N, H, 2W, 3)`` float32 in [0, 1].

        ``seed``: one seed for the batch's noise, or one per canvas (then each result depends only
        on its own canvas and seed, not on how canvases were batched)."""
        n, h, w2, _ = canvases.shape
        seed = self.cfg.infer.seed if seed is None else seed
        if isinstance(seed, (int, np.integer)):
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        else:
            if len(seed) != n:
                raise ValueError(f"{len(seed)} seeds for {n} canvases: give one seed, or one per canvas")
            generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
        device = self.prompt_embeds.device
        image = torch.from_numpy(np.ascontiguousarray(canvases.transpose(0, 3, 1, 2))).float()
        mask = torch.from_numpy(np.ascontiguousarray(masks[:, None])).float()
        steps = steps or self.cfg.infer.steps
        with (self.cache.around(steps) if self.cache is not None else contextlib.nullcontext(),
              garment_guidance(self.pipe.transformer, self.cfg.infer.garment_guidance)):
            out = self.pipe(
                image=image, mask_image=mask, height=h, width=w2,
                prompt_embeds=self.prompt_embeds.expand(n, -1, -1),
                pooled_prompt_embeds=self.pooled.expand(n, -1),
                num_inference_steps=steps,
                guidance_scale=self.cfg.infer.guidance if guidance is None else guidance,
                generator=generator,
                max_sequence_length=self.cfg.model.max_sequence_length,
                output_type="pt",
            ).images  # (N, 3, H, 2W) in [0, 1], on the device: read once through the host seam
        return paste_back(canvases, masks, host_array(out).transpose(0, 2, 3, 1))


def free_text_encoders(pipe) -> None:
    """Drop CLIP and T5 (and their tokenizers) from ``pipe``, once the prompt's embeddings are
    computed: on the full-size model ~9.5 GB of the GPU. The pipeline then runs on
    ``prompt_embeds`` only; asked to encode a prompt it fails loudly instead of re-encoding."""
    cuda = any(p.is_cuda for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None for p in m.parameters())
    pipe.text_encoder = pipe.text_encoder_2 = None
    pipe.tokenizer = pipe.tokenizer_2 = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # give the encoders' blocks back to the driver, not only to torch's cache


def wants_vae_slicing(setting: bool | None, device: str | torch.device) -> bool:
    """VAE slicing as asked, or (``setting`` None) where the pipeline runs on CUDA (or ``meta``, the
    dry run's stand-in for it): there a batch's decode at a 1536x1024 canvas is the replica's memory
    peak; on a CPU the batched decode is kept."""
    return torch.device(device).type in ("cuda", "meta") if setting is None else bool(setting)


def paste_back(canvases: np.ndarray, masks: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Keep the input outside the mask, the generated pixels inside it."""
    m = masks[..., None].astype(np.float32)
    return canvases * (1.0 - m) + generated * m


def grid_image(canvases: np.ndarray, masks: np.ndarray, results: np.ndarray | dict[str, np.ndarray]) -> Image.Image:
    """One line per sample: garment | masked person | result(s) | ground truth (person halves).

    ``results``: one array, or several by name (e.g. ``{"base": ..., "LoRA": ...}``)."""
    named = results if isinstance(results, dict) else {"result": results}
    n, h, w2, _ = canvases.shape
    w = w2 // 2
    lines = []
    for i in range(n):
        m = masks[i, :, w:, None]
        person = canvases[i, :, w:]
        panels = [canvases[i, :, :w], person * (1 - m) + 0.5 * m]
        panels += [r[i, :, w:] for r in named.values()]
        panels.append(person)
        lines.append(np.concatenate([to_uint8(p) for p in panels], axis=1))
    grid = np.concatenate(lines, axis=0)
    scale = max(1, 160 // h)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    out = Image.new("RGB", (img.width, img.height + 14), "white")
    out.paste(img, (0, 14))
    draw = ImageDraw.Draw(out)
    names = ["garment", "masked person", *named, "ground truth"]
    for k, name in enumerate(names):
        draw.text((k * w * scale + 2, 1), name, fill="black")
    return out
